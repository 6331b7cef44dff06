"""The server batches concurrent requests on one engine: mixed steering in one batch, clients
that leave free their sequence within a step, and metadata routes never wait on generation."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from innsteer_local.runtime import registry as models

openai = pytest.importorskip("openai", reason="the [dev] extra installs openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra installs uvicorn")

SHIPPED = models.shipped_flows("smollm2-135m")
QUESTIONS = ["I broke my friend's phone. What should I tell her?", "How do I make a cup of tea?",
             "What is a good name for a cat?", "Why is the sea salty?", "Tell me about the moon.",
             "What should I pack for a beach day?", "How do plants grow?", "What is your favourite book?"]


@pytest.fixture(scope="module")
def server(model_path):
    from innsteer_local.apps.server import Engine, serving
    from innsteer_local.runtime.steered import SteeredLlama

    # one thread: llama.cpp's workers spin while they wait, and the test's own clients need a core
    llm = SteeredLlama(str(model_path), n_ctx=512, seed=0, n_threads=1, n_threads_batch=1, verbose=False)
    llm.model_key = "smollm2-135m"
    engine = Engine(llm, "smollm2-135m", parallel=8, queue=16)
    engine.load_flow("honesty", str(SHIPPED["honesty"]))
    engine.load_flow("positivity", "positivity.gguf", strength=2.0)
    with serving(engine) as url:
        yield url, engine
    engine.close()
    llm.close()


def steering_of(i: int) -> list[dict]:
    """Half unsteered; the other half by two flows at different strengths."""
    return [[], [{"flow": "honesty", "strength": 1.5}], [], [{"flow": "positivity", "strength": 1.0}]][i % 4]


def stream_until(url: str, i: int, stop: threading.Event, steering: list[dict] | None = None) -> None:
    """A long streamed generation that reads until `stop` is set (or the reply ends)."""
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % 8]}], "max_tokens": 300, "temperature": 0,
            "stream": True, "ignore_eos": True}
    if steering is not None:
        body["steering"] = steering
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            if stop.is_set():
                break


def wait_idle(engine, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while engine.batch.load["running"] or engine.batch.load["waiting"]:
        assert time.time() < deadline, engine.batch.load
        time.sleep(0.02)


def test_eight_streaming_clients_with_mixed_steering(server):
    url, engine = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    steps_before = engine.batch.steps

    def stream(i: int) -> tuple[str, dict, int]:
        chunks = list(client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTIONS[i]}], max_tokens=24,
            temperature=0, stream=True, extra_body={"steering": steering_of(i)}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        stats = (chunks[-1].model_extra or {}).get("steering_stats")
        return text, stats, len(chunks)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(stream, range(8)))
    steps = engine.batch.steps - steps_before
    for i, (text, stats, n_chunks) in enumerate(results):
        assert text and n_chunks > 3
        n_flows = len(steering_of(i))
        assert stats["tokens_evaluated"] > 24 and stats["rows_steered"] == n_flows * stats["tokens_evaluated"], stats
    # batched: far fewer steps than 8 requests of 24 tokens one after another (8 x 25)
    assert steps < 8 * 25 / 2, f"{steps} steps for 8 concurrent streams"


def _gone_within_a_step(engine, before_steps: int) -> int:
    deadline = time.time() + 30
    while engine.batch.load["running"]:
        assert time.time() < deadline, "the abandoned request kept its sequence"
        time.sleep(0.005)
    return engine.batch.steps - before_steps


def test_a_client_that_disconnects_frees_its_sequence(server):
    url, engine = server
    wait_idle(engine)
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 400, "temperature": 0,
            "stream": True, "steering": steering_of(1), "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            assert next(l for l in lines if l.startswith("data: "))
        at_close = engine.batch.steps
    used = _gone_within_a_step(engine, at_close)
    # the step in flight when the client left, then the one that frees it
    assert used <= 3, f"{used} steps after the stream was closed"


def test_a_dropped_non_streaming_request_frees_its_sequence(server):
    url, engine = server
    wait_idle(engine)
    body = {"messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
    at_close = engine.batch.steps
    used = _gone_within_a_step(engine, at_close)
    assert used <= 3, f"{used} steps after the client gave up"
    assert engine.batch.load["running"] == 0


def test_models_answer_fast_while_sixteen_generations_run(server):
    url, engine = server
    wait_idle(engine)
    stop = threading.Event()
    threads = [threading.Thread(target=stream_until, args=(url, i, stop, steering_of(i)), daemon=True)
               for i in range(16)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 30
        while engine.batch.load["running"] + engine.batch.load["waiting"] < 16:
            assert time.time() < deadline, engine.batch.load
            time.sleep(0.02)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            r = httpx.get(f"{url}/v1/models", timeout=10)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200 and len(r.json()["data"]) == 3
            time.sleep(0.05)
        assert engine.batch.load["running"] == 8, ("the generations were running while /v1/models answered", engine.batch.load, times)
        print(f"/v1/models under 16 generations: median {statistics.median(times) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms")
        assert statistics.median(times) < 0.1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    wait_idle(engine)


def test_a_full_queue_answers_429_with_retry_after(server):
    url, engine = server
    wait_idle(engine)
    stop = threading.Event()
    threads = [threading.Thread(target=stream_until, args=(url, i, stop), daemon=True) for i in range(8 + 16)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 30
        while engine.batch.load["waiting"] < 16:
            assert time.time() < deadline, engine.batch.load
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"] == "1"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    wait_idle(engine)

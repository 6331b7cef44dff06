"""The OpenAI-compatible server, driven over loopback by the real `openai` client on the real model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.apps.model_ids import parse_preset
from innsteer_local.flow import random_flow
from innsteer_local.runtime import registry as models

openai = pytest.importorskip("openai", reason="the [dev] extra installs openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra installs uvicorn")

SHIPPED = models.shipped_flows("smollm2-135m")
MESSAGES = [{"role": "user", "content": "I broke my friend's phone. What should I tell her?"}]
PROMPT = "The best way to spend a rainy afternoon is"
GREEDY = dict(max_tokens=16, temperature=0.0, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flows_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flows")


@pytest.fixture(scope="module")
def server(model_path, flows_dir):
    from innsteer_local.apps.server import Engine, serving
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=1024, seed=0, n_threads=1, n_threads_batch=1, verbose=False)
    llm.model_key = "smollm2-135m"
    engine = Engine(llm, "smollm2-135m", flows_dir=str(flows_dir))
    engine.load_flow("honesty", str(SHIPPED["honesty"]))
    engine.load_flow("positivity", "positivity.gguf", strength=2.0)  # shipped name, own default
    engine.add_preset(parse_preset("honest2=honesty:2"))
    with serving(engine) as url:
        yield url, engine
    engine.close()
    llm.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(model_path):
    """SteeredLlama used directly, with fresh flows per call: what the server must reproduce."""
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=1024, seed=0, n_threads=1, n_threads_batch=1, verbose=False)

    def run(steering: list[tuple[Path, float]], chat: bool = True) -> str:
        attached = [llm.add_flow(path, strength=a) for path, a in steering]
        try:
            if chat:
                return llm.create_chat_completion(messages=MESSAGES, **GREEDY)["choices"][0]["message"]["content"]
            return llm.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
        finally:
            for a in attached:
                llm.remove_flow(a)

    yield run
    llm.close()


def chat(client, steering=None, **kw) -> str:
    extra = {} if steering is None else {"extra_body": {"steering": steering}}
    out = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, **{**GREEDY, **kw}, **extra)
    return out.choices[0].message.content


def honesty(a: float = 1.9) -> list[dict]:
    return [{"flow": "honesty", "strength": a}]


def test_models_endpoint_lists_flows_and_presets_as_models(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["smollm2-135m", "smollm2-135m+honesty", "smollm2-135m+positivity", "smollm2-135m+honest2"]
    assert models["smollm2-135m"].steering == []
    assert models["smollm2-135m+positivity"].steering == [{"flow": "positivity", "strength": 2.0, "gate": "off"}]
    assert models["smollm2-135m+honest2"].steering == [{"flow": "honesty", "strength": 2.0, "gate": "off"}]
    one = httpx.get(f"{server[0]}/v1/models/smollm2-135m+honesty@-1.5").json()
    assert one["id"] == "smollm2-135m+honesty@-1.5" and one["steering"][0]["strength"] == -1.5


def test_a_model_id_steers_exactly_like_the_steering_field(client):
    def reply(model: str, **extra) -> str:
        out = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY, **extra)
        assert out.model == model
        return out.choices[0].message.content

    explicit = chat(client, honesty(2.0))
    assert reply("smollm2-135m+honesty@2") == explicit
    assert reply("smollm2-135m+honest2") == explicit  # the preset
    assert explicit != chat(client), "steering must change the reply for this test to mean anything"
    assert reply("smollm2-135m+positivity") == chat(client, [{"flow": "positivity"}])
    both = chat(client, honesty(1.9) + [{"flow": "positivity", "strength": -1.0}])
    assert reply("smollm2-135m+honesty@1.9+positivity@-1") == both
    # the field, when present, wins over the model id
    assert reply("smollm2-135m+honesty@2", extra_body={"steering": []}) == chat(client)
    stream = client.chat.completions.create(model="smollm2-135m+honesty@2", messages=MESSAGES, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == explicit


@pytest.mark.parametrize("model", ["gpt-4o", "smollm2-135m+", "smollm2-135m+nothing", "smollm2-135m+honesty@abc",
                                   "smollm2-135m+honesty@nan", "smollm2-135m+honesty+honesty", "smollm2-135m@2"])
def test_unknown_model_ids_are_404_with_the_openai_body(server, client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)
    err = info.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "invalid_request_error"
    assert "does not exist" in err["message"]
    r = httpx.get(f"{server[0]}/v1/models/{model}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_responses_carry_the_runtime_counters(server):
    url = server[0]

    def stats(model: str, stream: bool = False) -> dict:
        """The request's counters, with the prompt tokens its cells held already (a prefix kept
        from an earlier request with the same steering) as `cached`."""
        body = {"model": model, "messages": MESSAGES, "stream": stream, **GREEDY}
        if not stream:
            out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        else:
            lines = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).text.split("\n\n")
            out = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
        return {**out["steering_stats"], "cached": out["usage"]["prompt_tokens_details"]["cached_tokens"]}

    plain, steered = stats("smollm2-135m"), stats("smollm2-135m+honesty")
    assert plain["rows_steered"] == 0 and plain["tokens_evaluated"] + plain["cached"] > 16
    # one site: one steered row per evaluated token
    assert steered["rows_steered"] == steered["tokens_evaluated"] and steered["rows_steered_per_token"] == 1.0
    assert steered["rows_rejected_nonfinite"] == 0
    again = stats("smollm2-135m+honesty", stream=True)  # the same prompt and steering: all but one token kept
    assert again["rows_steered"] + again["cached"] == steered["rows_steered"] + steered["cached"]
    assert again["cached"] > 0


def test_playground_files_are_served_and_nothing_else(server):
    url = server[0]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "playground.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    js = httpx.get(f"{url}/playground/playground.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    for name in ("index.py", "..%2Fserver.py", "../server.py"):
        assert httpx.get(f"{url}/playground/{name}").status_code == 404


def test_get_steering_lists_flows_with_metadata(server):
    data = httpx.get(f"{server[0]}/v1/steering").json()["data"]
    by_name = {d["name"]: d for d in data}
    assert set(by_name) == {"honesty", "positivity"}
    h = by_name["honesty"]
    assert h["layers"] == [15] and h["method"] == "innsteer" and h["behavior"] == "honesty"
    assert h["file"] == SHIPPED["honesty"].name and h["loaded_by"] == "operator"  # a name, not a server path
    assert h["default_strength"] == pytest.approx(Flow.load(SHIPPED["honesty"]).default_strength)
    assert by_name["positivity"]["default_strength"] == 2.0
    assert h["model"]["n_embd"] == 576 and "coupling" in h["sites"][0]["ops"]


def test_chat_per_request_steering_matches_steered_llama(client, direct):
    plain = chat(client)
    steered = chat(client, honesty(1.9))
    both = chat(client, honesty(1.9) + [{"flow": "positivity", "strength": -1.0}])
    assert plain == direct([]) == chat(client, [])  # empty list = unsteered
    assert steered == direct([(SHIPPED["honesty"], 1.9)])
    assert both == direct([(SHIPPED["honesty"], 1.9), (SHIPPED["positivity"], -1.0)])
    assert len({plain, steered, both}) == 3, "steering must change the reply for this test to mean anything"
    assert chat(client) == plain  # nothing of the previous requests' steering is left over


def test_strength_defaults_to_the_loaded_flows(client, direct):
    assert chat(client, [{"flow": "positivity"}]) == direct([(SHIPPED["positivity"], 2.0)])


def test_completions_steered_matches_steered_llama(client, direct):
    def complete(steering):
        extra = {} if steering is None else {"extra_body": {"steering": steering}}
        return client.completions.create(model="smollm2-135m", prompt=PROMPT, **GREEDY, **extra).choices[0].text

    plain, steered = complete(None), complete(honesty(3.0))
    assert plain == direct([], chat=False)
    assert steered == direct([(SHIPPED["honesty"], 3.0)], chat=False)
    assert plain != steered


def test_streaming_matches_non_streaming(client):
    for steering in (None, honesty(1.9)):
        extra = {} if steering is None else {"extra_body": {"steering": steering}}
        stream = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, stream=True, **GREEDY, **extra)
        chunks = list(stream)
        assert len(chunks) > 3
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat(client, steering)
    stream = client.completions.create(model="smollm2-135m", prompt=PROMPT, stream=True,
                                       extra_body={"steering": honesty(3.0)}, **GREEDY)
    text = "".join(c.choices[0].text for c in stream)
    assert text == client.completions.create(model="smollm2-135m", prompt=PROMPT, extra_body={"steering": honesty(3.0)},
                                             **GREEDY).choices[0].text


def test_concurrent_requests_never_leak_steering(server, client):
    """Requests with different steering share batches; each one's counters are its own sequence's
    (a leak would steer an unsteered request's rows or miss a steered one's). Greedy texts are
    compared with each request alone and reported: llama.cpp's kernels are not batch-invariant."""
    configs = [None, honesty(1.9), honesty(-2.0), [{"flow": "positivity", "strength": 1.4}],
               honesty(1.0) + [{"flow": "positivity", "strength": 1.0}]]
    url = server[0]

    def post(i: int) -> dict:
        body = {"model": "smollm2-135m", "messages": MESSAGES, **GREEDY}
        if configs[i] is not None:
            body["steering"] = configs[i]
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

    alone = [post(i) for i in range(len(configs))]
    jobs = [i % len(configs) for i in range(3 * len(configs))]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(post, jobs))
    same = 0
    for i, out in zip(jobs, got):
        stats, n_flows = out["steering_stats"], len(configs[i] or [])
        assert stats["tokens_evaluated"] + out["usage"]["prompt_tokens_details"]["cached_tokens"] > 16
        assert stats["rows_steered"] == n_flows * stats["tokens_evaluated"], (configs[i], stats)
        same += out["choices"][0]["message"]["content"] == alone[i]["choices"][0]["message"]["content"]
    print(f"greedy replies identical to the request alone: {same}/{len(jobs)}")


def test_a_chats_history_is_evaluated_once_per_steering(server):
    """The next turn of a chat starts from the cells the previous turn left (same steering): only
    the new tokens are evaluated, and the reply is the one a fresh model gives; other steering
    never reuses them."""
    url = server[0]
    history = [{"role": "user", "content": "Tell me about lighthouses and the people who kept them in winter."}]

    def post(messages, steering):
        body = {"messages": messages, "steering": steering, **GREEDY}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

    first = post(history, honesty(1.3))
    turn = history + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "What did they eat?"}]
    second = post(turn, honesty(1.3))
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 1, (cached, first["usage"])
    assert second["steering_stats"]["tokens_evaluated"] < second["usage"]["prompt_tokens"] - cached + 16
    other = post(turn, honesty(-1.3))
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] < first["usage"]["prompt_tokens"] // 2

    from innsteer_local.runtime.steered import SteeredLlama  # what a fresh model says to the whole turn

    llm = SteeredLlama(str(server[1].llm.model_path), n_ctx=1024, seed=0, n_threads=1, n_threads_batch=1,
                       verbose=False)
    try:
        llm.add_flow(SHIPPED["honesty"], strength=1.3)
        fresh = llm.create_chat_completion(messages=turn, **GREEDY)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert second["choices"][0]["message"]["content"] == fresh


def test_client_leaving_mid_stream_frees_the_model(server, client):
    body = {"messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True, "steering": honesty()}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))
    t = time.perf_counter()
    assert chat(client) == chat(client)
    assert time.perf_counter() - t < 20, "the abandoned stream kept the model busy"


def test_post_steering_loads_a_flow(server, client, model_info, flows_dir):
    url = server[0]
    random_flow(model_info, [10], rank=32, blocks=2, hidden=64, seed=3, delta_scale=2.0).save(flows_dir / "random.gguf")
    r = httpx.post(f"{url}/v1/steering", json={"name": "rand", "path": "random.gguf", "strength": 1.5})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [10] and r.json()["default_strength"] == 1.5
    listed = {d["name"]: d for d in httpx.get(f"{url}/v1/steering").json()["data"]}
    assert listed["rand"]["file"] == "random.gguf" and listed["rand"]["loaded_by"] == "api"
    assert str(flows_dir) not in json.dumps(listed) and "/" not in listed["honesty"]["file"]  # names, not paths
    assert chat(client, [{"flow": "rand"}]) != chat(client)

    again = httpx.post(f"{url}/v1/steering", json={"name": "rand", "path": "random.gguf"})
    assert again.status_code == 409 and "already loaded" in again.json()["error"]["message"]
    missing = httpx.post(f"{url}/v1/steering", json={"name": "gone", "path": "nope.gguf"})
    assert missing.status_code == 404 and "no flow file of that name" in missing.json()["error"]["message"]
    random_flow(ModelInfo("gemma-3-270m", "gemma3", 640, 18), [5], rank=16, blocks=1,
                hidden=16).save(flows_dir / "other.gguf")
    wrong = httpx.post(f"{url}/v1/steering", json={"name": "wrong", "path": "other.gguf"})
    assert wrong.status_code == 400 and "n_embd 640" in wrong.json()["error"]["message"]
    (flows_dir / "notes.gguf").write_text("not a flow")
    notflow = httpx.post(f"{url}/v1/steering", json={"name": "notes", "path": "notes.gguf"})
    assert notflow.status_code == 400 and "notes.gguf" in notflow.json()["error"]["message"]
    assert str(flows_dir) not in notflow.json()["error"]["message"]
    badname = httpx.post(f"{url}/v1/steering", json={"name": "../x", "path": "random.gguf"})
    assert badname.status_code == 400 and badname.json()["error"]["param"] == "name"
    assert {d["name"] for d in httpx.get(f"{url}/v1/steering").json()["data"]} == {"honesty", "positivity", "rand"}

    # unloading: only what the API loaded, and then it is gone for requests too
    assert httpx.delete(f"{url}/v1/steering/honesty").status_code == 403
    assert httpx.delete(f"{url}/v1/steering/nosuch").status_code == 404
    gone = httpx.delete(f"{url}/v1/steering/rand")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    with pytest.raises(openai.BadRequestError, match="unknown flow 'rand'"):
        chat(client, [{"flow": "rand"}])


@pytest.mark.parametrize("steering, needle", [
    ([{"flow": "nosuch", "strength": 1}], "unknown flow 'nosuch'"),
    ([{"flow": "honesty", "strength": "2"}], "must be a finite number"),
    ([{"flow": "honesty", "strength": True}], "must be a finite number"),
    ([{"flow": "honesty", "strength": 1}, {"flow": "honesty", "strength": 2}], "appears twice"),
    ([{"flow": "honesty", "strenght": 1}], "unknown field(s) strenght"),
    ([{"flow": "honesty", "gate": "sideways"}], "gate must be"),
    ({"flow": "honesty"}, "must be a list"),
    (["honesty"], "must be an object"),
])
def test_bad_steering_is_a_400_through_the_client(client, steering, needle):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, steering)
    assert needle in info.value.body["message"], info.value.body


@pytest.mark.parametrize("raw, needle", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "steering": [{"flow": "honesty", "strength": NaN}]}',
     "'NaN' is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "steering": [{"flow": "honesty", "strength": -Infinity}]}',
     "'-Infinity' is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "steering": [{"flow": "honesty", "strength": 1e999}]}',
     "must be a finite number"),
    (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"messages": "hi"}', "'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "role must be one of"),
    (b'{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "'max_tokens' must be an integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "'max_tokens' must be at least 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "'temperature' must be a finite"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', "'stop' must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "only n = 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "'stream' must be true or false"),
])
def test_malformed_requests_get_400_with_a_message(server, raw, needle):
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_other_client_errors(server):
    url = server[0]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    long_prompt = "word " * 3000  # more tokens than the 1024-token context
    r = httpx.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, "stream": True})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{url}/v1/steering", content=b'{"name": "x", "path": 5}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def cli_path() -> str:
    local = Path(sys.executable).with_name("innsteer-local")
    return str(local) if local.exists() else "innsteer-local"


def test_serve_command(tmp_path):
    port = free_port()
    proc = subprocess.Popen([cli_path(), "serve", "--flow", "honesty.gguf", "--flow", "pos=positivity.gguf:1.5",
                             "--preset", "warm=pos:3", "--preset", "honesty:-1", "--port", str(port),
                             "--n-ctx", "512"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.get(f"{url}/v1/steering", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "serve did not come up"
                time.sleep(0.3)
        flows = {d["name"]: d for d in r.json()["data"]}
        assert set(flows) == {"honesty", "pos"} and flows["pos"]["default_strength"] == 1.5
        body = {"messages": MESSAGES, "steering": [{"flow": "pos"}], **GREEDY}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert out["choices"][0]["message"]["content"] and out["steering"] == [
            {"flow": "pos", "strength": 1.5, "gate": "off"}]
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert ids == ["smollm2-135m", "smollm2-135m+honesty", "smollm2-135m+pos", "smollm2-135m+warm",
                       "smollm2-135m+honesty@-1"]
        by_id = {"messages": MESSAGES, "model": "smollm2-135m+warm", **GREEDY}
        out = httpx.post(f"{url}/v1/chat/completions", json=by_id, timeout=60).json()
        assert out["steering"] == [{"flow": "pos", "strength": 3.0, "gate": "off"}]
    finally:
        proc.terminate()
        proc.wait(20)

    bad = subprocess.run([cli_path(), "serve", "--flow", f"x={tmp_path / 'missing.gguf'}", "--port", str(port)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "flow file not found" in bad.stderr
    for preset, needle in (("calm=nothing:2", "uses flow 'nothing'"), ("calm=honesty", "needs a strength")):
        bad = subprocess.run([cli_path(), "serve", "--flow", "honesty.gguf", "--preset", preset],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and needle in bad.stderr, bad.stderr


def test_engine_refuses_a_model_with_attached_flows(model_path):
    from innsteer_local.apps.server import Engine
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=128, verbose=False)
    llm.add_flow(SHIPPED["honesty"])
    with pytest.raises(ValueError, match="without attached flows"):
        Engine(llm, "smollm2-135m")
    llm.close()

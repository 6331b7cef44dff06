"""Two steered models on two threads do not interfere; attach/detach does not leak; strength
changes mid-stream take effect without errors."""

from __future__ import annotations

import threading

import pytest

from innsteer_local.flow import random_flow
from innsteer_local.runtime.native import NativeFlow, Steerer

MESSAGES = [{"role": "user", "content": "Describe a walk in the park."}]


def reply(llm) -> str:
    return llm.create_chat_completion(messages=MESSAGES, max_tokens=24, temperature=0.0, seed=0)["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def two_flows(model_info, tmp_path_factory):
    d = tmp_path_factory.mktemp("flows")
    paths = []
    for seed in (21, 22):
        p = d / f"f{seed}.gguf"
        random_flow(model_info, [9 + seed % 2], rank=32, blocks=2, hidden=64, seed=seed, delta_scale=2.5).save(p)
        paths.append(p)
    return paths


def test_two_instances_on_two_threads_match_each_alone(model_path, two_flows):
    from innsteer_local.runtime.steered import SteeredLlama

    def make(flow):
        llm = SteeredLlama(str(model_path), n_ctx=512, verbose=False, seed=0, n_threads=1, n_threads_batch=1)
        llm.add_flow(flow, strength=1.0)
        return llm

    alone = []
    for f in two_flows:
        llm = make(f)
        alone.append(reply(llm))
        llm.close()
    assert alone[0] != alone[1]

    llms = [make(f) for f in two_flows]
    results: list = [None, None]
    errors: list = []

    def run(i):
        try:
            results[i] = [reply(llms[i]) for _ in range(2)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == [alone[0], alone[0]] and results[1] == [alone[1], alone[1]]
    for llm in llms:
        llm.close()


def test_strength_change_during_streaming(steered, two_flows):
    h = steered.add_flow(two_flows[0], strength=1.0)
    plain_steered = "".join(c["choices"][0]["delta"].get("content") or "" for c in steered.create_chat_completion(
        messages=MESSAGES, max_tokens=24, temperature=0.0, stream=True))
    pieces = []
    for i, c in enumerate(steered.create_chat_completion(messages=MESSAGES, max_tokens=24, temperature=0.0, stream=True)):
        pieces.append(c["choices"][0]["delta"].get("content") or "")
        if i == 3:
            steered.set_strength(-3.0, h)  # applies from the next token on
    changed = "".join(pieces)
    assert changed != plain_steered
    assert changed[:len("".join(pieces[:4]))] == plain_steered[:len("".join(pieces[:4]))]
    assert steered.steering_stats["rows_rejected_nonfinite"] == 0


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def test_attach_detach_does_not_leak(two_flows):
    st = Steerer(576, 30, 64)
    flow = NativeFlow(two_flows[0])
    for _ in range(50):  # warm up allocator pools
        st.detach(st.attach(flow, 1.0))
    before = rss_kb()
    for _ in range(1000):
        fid = st.attach(flow, 1.0)
        st.set_strength(fid, 0.5)
        st.detach(fid)
        NativeFlow(two_flows[1]).close()
    grown = rss_kb() - before
    st.close()
    flow.close()
    assert grown < 4096, f"RSS grew by {grown} kB over 1000 attach/detach/load cycles"

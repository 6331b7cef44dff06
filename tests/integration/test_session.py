"""Steering changes between requests never reuse KV entries computed under other steering."""

from __future__ import annotations

import pytest

from innsteer_local.flow import random_flow

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def reply(llm) -> str:
    out = llm.create_chat_completion(messages=MESSAGES, max_tokens=24, temperature=0.0, seed=0)
    return out["choices"][0]["message"]["content"]


@pytest.fixture()
def flow_path(model_info, tmp_path):
    path = tmp_path / "f.gguf"
    random_flow(model_info, [12], rank=32, blocks=2, hidden=64, seed=4, delta_scale=2.0).save(path)
    return path


def test_strength_change_between_requests_matches_a_fresh_model(model_path, flow_path):
    from innsteer_local import SteeredLlama

    def fresh(strength):
        llm = SteeredLlama(str(model_path), n_ctx=512, verbose=False, seed=0)
        if strength is not None:
            llm.add_flow(flow_path, strength=strength)
        text = reply(llm)
        llm.close()
        return text

    expected = {None: fresh(None), 1.0: fresh(1.0), 2.0: fresh(2.0)}
    assert len(set(expected.values())) == 3, "the strengths must give different replies for this test to mean anything"

    llm = SteeredLlama(str(model_path), n_ctx=512, verbose=False, seed=0)
    assert reply(llm) == expected[None]
    h = llm.add_flow(flow_path, strength=1.0)
    assert reply(llm) == expected[1.0]  # the same prompt prefix is in the KV cache, unsteered
    llm.set_strength(2.0, h)
    assert reply(llm) == expected[2.0]
    llm.disable()
    assert reply(llm) == expected[None]
    llm.enable()
    assert reply(llm) == expected[2.0]
    llm.close()


def test_streaming_is_steered(steered, flow_path):
    plain = "".join(c["choices"][0]["delta"].get("content") or "" for c in steered.create_chat_completion(
        messages=MESSAGES, max_tokens=24, temperature=0.0, stream=True))
    steered.add_flow(flow_path, strength=2.0)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in steered.create_chat_completion(
        messages=MESSAGES, max_tokens=24, temperature=0.0, stream=True))
    assert streamed != plain
    assert streamed == reply(steered)


def test_long_steered_chat_with_context_shift(model_path, flow_path):
    """About 4 000 tokens of steered conversation in a 1 024-token window: old turns are dropped,
    nothing fails, no row is rejected."""
    import io

    from innsteer_local.apps.chat import ChatSession
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=1024, verbose=False, seed=0)
    llm.add_flow(flow_path, strength=0.5)
    session = ChatSession(llm=llm, system="You are a helpful assistant.", max_tokens=96, out=io.StringIO())
    total = 0
    topics = ["the sea", "mountains", "a city at night", "an old library", "a rainy morning", "a train journey"]
    turn = 0
    while total < 4000:
        before = llm.n_tokens
        session.turn(f"Tell me a short story about {topics[turn % len(topics)]}.")
        total += llm.n_tokens - before if llm.n_tokens > before else llm.n_tokens
        turn += 1
    assert session.shifted > 0, "the window must have shifted"
    assert llm.steering_stats["rows_rejected_nonfinite"] == 0 and llm.steering_stats["rows_steered"] > 4000
    llm.close()


def test_registry_describes_the_model_as_llama_cpp_does(model_info, steered):
    """The unit tests' ModelInfo comes from the registry; it must be what SteeredLlama reports."""
    assert steered.model_info == model_info

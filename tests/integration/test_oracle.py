"""A linear flow must reproduce llama.cpp's own control vectors exactly (our oracle)."""

from __future__ import annotations


import llama_cpp
import numpy as np
import pytest

from innsteer_local import Flow
from innsteer_local.runtime.compat import set_control_vector as set_cvec

PROMPT = b"The quick brown fox jumps over the lazy dog. Then the fox"


@pytest.fixture(scope="module")
def plain(model_path):
    llm = llama_cpp.Llama(str(model_path), n_ctx=512, n_batch=256, logits_all=True, seed=0, verbose=False)
    yield llm
    llm.close()


def greedy(llm, n: int = 32) -> str:
    llm.reset()
    return llm.create_completion(PROMPT.decode(), max_tokens=n, temperature=0.0, seed=0)["choices"][0]["text"]


@pytest.mark.parametrize("layer,strength", [(1, 1.0), (8, 1.0), (15, 2.5), (22, -1.5), (28, 0.75)])
def test_linear_flow_equals_control_vector(steered, plain, model_info, logits_of, tmp_path, layer, strength):
    rng = np.random.default_rng(layer)
    v = rng.normal(0.0, 1.0, model_info.n_embd).astype(np.float32) * 2.0
    path = tmp_path / "linear.gguf"
    Flow.linear({layer: v}, model_info, method="mean-diff").save(path)
    tokens = plain.tokenize(PROMPT)

    base = logits_of(plain, tokens)
    set_cvec(plain, layer, (np.float32(strength) * v).astype(np.float32), model_info.n_embd, model_info.n_layer)
    oracle_logits = logits_of(plain, tokens)
    oracle_text = greedy(plain)
    set_cvec(plain, layer, None, model_info.n_embd, model_info.n_layer)

    steered.add_flow(path, strength=strength)
    ours = logits_of(steered, tokens)
    ours_text = greedy(steered)

    assert np.abs(oracle_logits - base).max() > 1e-2, "the control vector must change the logits for this test to mean anything"
    assert np.abs(ours - oracle_logits).max() <= 1e-5
    assert ours_text == oracle_text

"""The graph path through llama.cpp: the eval callback running the flow as a ggml graph (on the
CPU backend here) steers like the host path; small batches go to the host kernel."""

from __future__ import annotations

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import random_flow

INFO = ModelInfo("synthetic", "llama", 576, 30)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float((np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


def _captured_steer(llm, flow_path, layer, tokens, strength):
    st = llm.native_steerer
    h = llm.add_flow(flow_path, strength=strength)
    st.capture(layer, post=False)
    st.capture(layer, post=True)
    llm.reset()
    llm.eval(tokens)
    pre, post = st.captured(layer, post=False), st.captured(layer, post=True)
    st.capture(layer, post=False, on=False)
    st.capture(layer, post=True, on=False)
    st.clear_captured()
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.remove_flow(h)
    return pre, post, logits


def test_callback_on_the_graph_path_steers_like_the_host_path(steered, model_info, tmp_path):
    st = steered.native_steerer
    tokens = steered.tokenize(b"The quick brown fox jumps over the lazy dog. Then the fox ran into the forest and")
    st.capture(10)
    steered.reset()
    steered.eval(tokens)
    acts = st.captured(10)
    st.capture(10, on=False)
    st.clear_captured()
    path = tmp_path / "rnd.gguf"
    random_flow(model_info, [10], rank=48, blocks=4, hidden=96, seed=3, mean=acts.mean(0), std=acts.std(0)).save(path)

    st.set_path("host")
    _, host_post, _ = _captured_steer(steered, path, 10, tokens, 0.8)
    assert st.rows_on_device == 0

    st.set_path("cpu-graph", min_rows=1)
    assert st.device_name == "CPU"
    pre, post, _ = _captured_steer(steered, path, 10, tokens, 0.8)
    assert st.rows_on_device == len(tokens)
    ref = Flow.load(path).site(10).steer(pre, 0.8)
    assert _rel(ref, pre) > 0.01
    assert _rel(post, ref) <= 1e-4
    assert _rel(post, host_post) <= 1e-4
    # no logit comparison: on this Q4_1 model activations are re-quantized to 8 bits before each
    # matrix product, so even a one-ulp change of the strength moves logits by ~1 (measured)
    assert st.last_error == ""


def test_min_rows_sends_small_batches_to_the_host(steered, model_info, tmp_path):
    st = steered.native_steerer
    path = tmp_path / "lin.gguf"
    Flow.linear({12: np.random.default_rng(1).normal(size=576).astype(np.float32)}, model_info).save(path)
    steered.add_flow(path, strength=1.0)
    st.set_path("cpu-graph", min_rows=4)
    steered.reset()
    steered.eval(steered.tokenize(b"Hello there, how are you"))  # one batch of several rows: graph
    on_device = st.rows_on_device
    assert on_device > 0
    steered.eval([steered.token_eos()])  # one row: host
    assert st.rows_on_device == on_device
    assert st.rows_steered == on_device + 1


def test_set_path_rejects_bad_values(steered):
    with pytest.raises(ValueError):
        steered.native_steerer.set_path("gpu")
    with pytest.raises(Exception, match="min_rows"):
        steered.native_steerer.set_path("host", min_rows=0)


def test_auto_path_without_a_gpu_is_the_host_path(steered, model_info, tmp_path):
    """The default (auto) takes the graph path only where ggml has a GPU device."""
    from innsteer_local.runtime.rpc import local_gpu

    if local_gpu():  # not llama_supports_gpu_offload(): that says yes for any build with the RPC backend
        pytest.skip("ggml has a GPU here: auto takes the device graph")
    path = tmp_path / "lin.gguf"
    Flow.linear({12: np.ones(576, np.float32)}, model_info).save(path)
    steered.add_flow(path, strength=1.0)
    steered.eval(steered.tokenize(b"Hello there, how are you doing today, my friend?" * 4))
    st = steered.native_steerer
    assert st.rows_steered > 32 and st.rows_on_device == 0
    assert st.device_name == "" and st.last_error == ""

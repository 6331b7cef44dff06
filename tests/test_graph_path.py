"""The graph path (native/src/flow_graph.c): the flow as a ggml graph, which the eval callback runs
on the device for GPU backends. Here it runs on ggml's CPU backend and must match the NumPy
reference and the host kernel; through llama.cpp it must steer like the host path."""

from __future__ import annotations

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import Affine, Gate, Site
from innsteer_local.native import NativeFlow

INFO = ModelInfo("synthetic", "llama", 576, 30)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float((np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (512, 576)).astype(np.float32)
    x[0] *= 300  # an attention-sink-like row: the edit is small against |h|
    return x


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("n_rows", [1, 7, 512])
def test_graph_matches_reference_and_kernel(rows, tmp_path, dtype, n_rows):
    path = tmp_path / f"flow_{dtype}.gguf"
    Flow.random(INFO, [10], rank=48, blocks=4, hidden=96, seed=3, mean=rows.mean(0), std=rows.std(0)).save(path, dtype=dtype)
    x = rows[:n_rows]
    ref = Flow.load(path).site(10).steer(x, 0.8)
    graph = NativeFlow(path).steer_graph(x, 0.8, path="cpu-graph")
    kernel = NativeFlow(path).steer(x, 0.8)
    assert _rel(ref, x) > 0.05  # the flow really moves the rows
    assert _rel(graph, ref) <= 1e-4
    assert _rel(graph, kernel) <= 1e-4


def test_linear_flow_is_bit_identical_to_kernel(rows, tmp_path):
    """No ops: h + a*v, the same float operations as the kernel and as llama.cpp's control vector."""
    path = tmp_path / "lin.gguf"
    Flow.linear({4: np.random.default_rng(2).normal(size=576).astype(np.float32)}, INFO).save(path)
    flow = NativeFlow(path)
    assert np.array_equal(flow.steer_graph(rows[:33], 2.5), flow.steer(rows[:33], 2.5))


def test_edit_scale_flow(rows, tmp_path):
    """Affine transport flows: the edit a*(delta + edit_scale * z) depends on the row."""
    rng = np.random.default_rng(4)
    sd = rows.std(0)
    site = Site(layer=3, ops=[Affine(scale=(1 / sd).astype(np.float32), bias=(-rows.mean(0) / sd).astype(np.float32))],
                delta=rng.normal(size=576).astype(np.float32), edit_scale=rng.uniform(-0.5, 0.5, 576).astype(np.float32))
    path = tmp_path / "ot.gguf"
    Flow(model=INFO, sites=[site], method="affine-ot").save(path)
    ref = Flow.load(path).site(3).steer(rows[:64], 0.7)
    assert _rel(NativeFlow(path).steer_graph(rows[:64], 0.7), ref) <= 1e-4


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    info = ModelInfo("synthetic", "llama", 48, 8)
    rng = np.random.default_rng(0)
    flow = Flow.random(info, [3], rank=16, blocks=2, hidden=32, seed=1, delta_scale=0.5)
    site = flow.sites[0]
    neg = rng.normal(0, 1, (400, 48))
    pos = neg + 0.8

    def latent(h):
        x = np.asarray(h, np.float64)
        for op in site.ops:
            x = x @ op.basis.T.astype(np.float64) if op.kind == "subspace" else op.forward(x)
        return x

    site.gate = Gate.fit(latent(pos[:300]), latent(neg[:300]), np.concatenate([latent(pos[300:]), latent(neg[300:])]),
                         site.delta)
    path = tmp_path_factory.mktemp("gated") / "gated.gguf"
    flow.save(path)
    x = np.concatenate([neg[:20], pos[:20], rng.normal(0, 6, (10, 48))]).astype(np.float32)
    return Flow.load(path), NativeFlow(path), x


@pytest.mark.parametrize("mode", ["off", "density", "target"])
@pytest.mark.parametrize("strength", [1.5, -0.7, 20.0])
def test_gates_on_the_graph(gated, mode, strength):
    flow, native, x = gated
    ref = flow.sites[0].steer(x, strength, gate=mode)
    graph = native.steer_graph(x, strength, gate=mode)
    assert _rel(graph, ref) <= 1e-4
    assert _rel(graph, native.steer(x, strength, gate=mode)) <= 1e-4


def test_non_finite_rows_keep_their_values(tmp_path):
    """Overflowing rows come back unchanged (the KV cache must never see inf); the others are steered."""
    path = tmp_path / "overflow.gguf"
    v = np.zeros(576, np.float32)
    v[0] = 3e38
    Flow.linear({2: v}, INFO).save(path)
    x = np.random.default_rng(5).normal(size=(6, 576)).astype(np.float32)
    x[[1, 4], 0] = 3e38  # these rows overflow at strength 1: 3e38 + 3e38 = inf
    out = NativeFlow(path).steer_graph(x, 1.0)
    assert np.isfinite(out).all()
    assert np.array_equal(out[[1, 4]], x[[1, 4]])
    assert np.array_equal(out[[0, 2, 3, 5]], NativeFlow(path).steer(x[[0, 2, 3, 5]], 1.0))


def test_bad_arguments(tmp_path):
    path = tmp_path / "lin.gguf"
    Flow.linear({2: np.ones(576, np.float32)}, INFO).save(path)
    flow = NativeFlow(path)
    with pytest.raises(ValueError):
        flow.steer_graph(np.zeros((1, 576), np.float32), 1.0, path="gpu")
    with pytest.raises(Exception, match="invalid argument"):
        flow.steer_graph(np.zeros((1, 576), np.float32), 1.0, path="host")
    with pytest.raises(Exception, match="gate"):
        flow.steer_graph(np.zeros((1, 576), np.float32), 1.0, gate="density")


# ---- through llama.cpp ------------------------------------------------------------------------


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
    Flow.random(model_info, [10], rank=48, blocks=4, hidden=96, seed=3, mean=acts.mean(0), std=acts.std(0)).save(path)

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
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("ggml has a GPU here: auto takes the device graph")
    path = tmp_path / "lin.gguf"
    Flow.linear({12: np.ones(576, np.float32)}, model_info).save(path)
    steered.add_flow(path, strength=1.0)
    steered.eval(steered.tokenize(b"Hello there, how are you doing today, my friend?" * 4))
    st = steered.native_steerer
    assert st.rows_steered > 32 and st.rows_on_device == 0
    assert st.device_name == "" and st.last_error == ""

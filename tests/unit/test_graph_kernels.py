"""The flow as a ggml graph (native/src/flow_graph.c) on ggml's CPU backend, on given rows: it
matches the NumPy reference and the host kernel for every batch shape, dtype and gate."""

from __future__ import annotations

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import Affine, Gate, Site, random_flow
from innsteer_local.runtime.native import NativeFlow

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
    random_flow(INFO, [10], rank=48, blocks=4, hidden=96, seed=3, mean=rows.mean(0), std=rows.std(0)).save(path, dtype=dtype)
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
    flow = random_flow(info, [3], rank=16, blocks=2, hidden=32, seed=1, delta_scale=0.5)
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



"""Every op kind in OP_KINDS through every backend, on the same rows: the NumPy reference
(flow/site.py), the C host kernels (phi^-1 per row, phi and steering per block), the ggml graph
on ggml's CPU backend, the ONNX export under onnxruntime and the torch modules (train/torch_ops.py).
Each kind is tested alone in a site (at full width) and in a mixed site holding every kind in
OP_KINDS order (the kinds after the subspace act inside it). A new kind is covered by adding it to
OP_KINDS; a backend that lacks it fails here."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import OP_KINDS, Site
from innsteer_local.runtime.native import NativeFlow

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra installs onnxruntime")
torch = pytest.importorskip("torch", reason="the [dev] extra installs torch")
from innsteer_local.convert.onnx import EMITTERS, phi_graph, steer_graph  # noqa: E402
from innsteer_local.train.torch_ops import TORCH_OPS, TorchSite  # noqa: E402

N_EMBD = 40
INFO = ModelInfo("conformance", "llama", N_EMBD, 4)
N_ROWS = 37  # two full blocks of the native kernel (FLOW_BLOCK 16) and a partial one
STRENGTHS = (1.3, -0.7)
# float32 backends against the float64 references, per-row relative error
TOL = 2e-5
DOCS = Path(__file__).resolve().parents[2] / "docs" / "flow-format.md"


def build_ops(kinds: list[str], rng: np.random.Generator) -> list:
    ops, width = [], N_EMBD
    for kind in kinds:
        op = OP_KINDS[kind].random(width, N_EMBD, rng)
        ops.append(op)
        width = op.out_dim(width)
    return ops


def sites() -> list:
    cases = [pytest.param([kind], id=kind) for kind in OP_KINDS]
    cases.append(pytest.param(list(OP_KINDS), id="mixed"))
    return cases


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(11)
    x = rng.normal(0, 2.0, (N_ROWS, N_EMBD)).astype(np.float32)
    x[0] *= 50  # a large row, as llama's attention sink: the edit is small against |h|
    return x


def row_rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float((np.linalg.norm(a - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)).max())


def edit_rel(out: np.ndarray, ref: np.ndarray, h: np.ndarray) -> float:
    """Error of the edit out - h relative to the reference edit, per row (float32 cannot hold an
    edit more finely than the float spacing near |h|: that is the floor)."""
    h = np.asarray(h, np.float64)
    d_ref = np.asarray(ref, np.float64) - h
    floor = 1e-6 * np.linalg.norm(h, axis=1)
    err = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(ref, np.float64), axis=1)
    return float((err / np.maximum(np.linalg.norm(d_ref, axis=1), floor)).max())


def test_every_backend_knows_every_kind():
    kinds = set(OP_KINDS)
    assert set(EMITTERS) == kinds, "convert/onnx.py EMITTERS"
    assert set(TORCH_OPS) == kinds, "train/torch_ops.py TORCH_OPS"
    text = DOCS.read_text()
    assert all(f"| `{k}` |" in text for k in kinds), "docs/flow-format.md's op table"


@pytest.mark.parametrize("kinds", sites())
def test_backends_agree(kinds, rows, tmp_path):
    rng = np.random.default_rng(zlib.crc32(" ".join(kinds).encode()))
    ops = build_ops(kinds, rng)
    width = N_EMBD
    for op in ops:
        width = op.out_dim(width)
    site = Site(layer=2, ops=ops, delta=rng.normal(0, 1.0, width).astype(np.float32))
    path = tmp_path / "flow.gguf"
    Flow(model=INFO, sites=[site], method="random").save(path)
    site = Flow.load(path).site(2)  # what both readers made of the file (the basis re-orthonormalised)
    native = NativeFlow(path)  # the C loader reads every kind, or this raises
    x = rows.astype(np.float64)

    # references: NumPy float64 and torch float64 must agree to rounding
    z_np = site.forward(x)
    tsite = TorchSite(site)
    with torch.no_grad():
        z_t = tsite(torch.as_tensor(x)).numpy()
        back_t = tsite.inverse(torch.as_tensor(z_np)).numpy()
        steer_t = {a: tsite.steer(torch.as_tensor(x), a).numpy() for a in STRENGTHS}
    assert row_rel(z_t, z_np) <= 1e-12
    assert row_rel(back_t, site.inverse(z_np)) <= 1e-12
    round_trip = row_rel(site.inverse(z_np), x)  # not 0: a stored f32 matrix_inv is not matrix's exact inverse
    assert round_trip <= 1e-4
    steer_np = {a: site.steer(x, a) for a in STRENGTHS}
    for a in STRENGTHS:
        # torch steers by the plain formula phi^-1(phi(h) + e), NumPy as h + dh: they differ by the
        # round trip of the float32 weights
        assert row_rel(steer_t[a], steer_np[a]) <= 2 * round_trip + 1e-9

    # the C host path: phi per block, phi^-1 per row, steering per block
    z32 = z_np.astype(np.float32)
    assert row_rel(native.forward(rows), z_np) <= TOL
    assert row_rel(native.inverse(z32), site.inverse(z32.astype(np.float64))) <= TOL
    for a in STRENGTHS:
        out = native.steer(rows, a)
        assert edit_rel(out, steer_np[a], x) <= 1e-4, a
        assert row_rel(out, steer_np[a]) <= TOL
        # a block of 16 and a single row go through the same float operations
        one_by_one = np.concatenate([native.steer(rows[i:i + 1], a) for i in range(N_ROWS)])
        assert np.array_equal(out, one_by_one)
    assert np.array_equal(native.steer(rows, 0.0), rows), "strength 0 returns h exactly"

    # the ggml graph on the CPU backend
    for a in STRENGTHS:
        graph = native.steer_graph(rows, a, path="cpu-graph")
        assert edit_rel(graph, steer_np[a], x) <= 1e-4, a
        assert row_rel(graph, native.steer(rows, a)) <= TOL

    # ONNX under onnxruntime
    def run(model, feeds):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    assert row_rel(run(phi_graph(site, N_EMBD), {"h": rows}), z_np) <= TOL
    assert row_rel(run(phi_graph(site, N_EMBD, inverse=True), {"z": z32}), site.inverse(z32.astype(np.float64))) <= TOL
    steer_model = steer_graph(site, N_EMBD)
    for a in STRENGTHS:
        out = run(steer_model, {"h": rows, "strength": np.array(a, np.float32)})
        assert edit_rel(out, steer_np[a], x) <= 1e-4, a
        assert row_rel(out, native.steer(rows, a)) <= TOL
    assert np.array_equal(run(steer_model, {"h": rows, "strength": np.array(0.0, np.float32)}), rows)

    # torch in float32 (what training runs) against the float64 reference
    t32 = TorchSite(site, dtype=torch.float32)
    with torch.no_grad():
        assert row_rel(t32(torch.as_tensor(rows)).numpy(), z_np) <= TOL
        assert row_rel(t32.inverse(torch.as_tensor(z32)).numpy(), site.inverse(z32.astype(np.float64))) <= TOL

    # NumPy op <-> torch module, both ways, exactly
    for op in site.ops:
        back = TORCH_OPS[op.kind].from_op(op).to_op()
        assert type(back) is type(op)
        for name, arr in op.tensors().items():
            assert np.array_equal(back.tensors()[name], arr), (op.kind, name)
        assert back.metadata() == op.metadata()

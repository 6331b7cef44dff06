"""ONNX export: onnxruntime on the exported graphs equals the native library and the torch reference
(train/torch_ops.py), on real activations of the model and shipped flows (rel. error <= 1e-4). Every
op kind on its own, through every backend: test_op_conformance.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from innsteer_local import Flow
from innsteer_local.flow import Gate, Site, random_flow
from innsteer_local.runtime import registry as models
from innsteer_local.runtime.native import NativeFlow

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra installs onnxruntime")
torch = pytest.importorskip("torch", reason="the [dev] extra installs torch")
from innsteer_local.train.torch_ops import TorchSite  # noqa: E402

TEXT = (b"Once upon a time, in a small village by the sea, there lived an old fisherman who went out every "
        b"morning before dawn. One day he found a bottle in his net, and inside it was a letter written in a "
        b"language he had never seen before, so he carried it to the teacher. The teacher looked at it for a "
        b"long time, then smiled and said that it was a recipe for bread from a country far away across the "
        b"water, and that they should bake it together on Sunday.")
BATCHES = (1, 7, 64)
TOL = 1e-4
SHIPPED = models.shipped_flows("smollm2-135m")


@pytest.fixture(scope="module")
def real_rows(model_path):
    """Unsteered l_out-<layer> rows of TEXT (row 0 is the attention sink, |h| about 22 000)."""
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=256, n_batch=256, verbose=False)
    layers = (7, 12, 15)
    for layer in layers:
        llm.native_steerer.capture(layer)
    llm.eval(llm.tokenize(TEXT))
    rows = {layer: llm.native_steerer.captured(layer) for layer in layers}
    llm.close()
    assert all(len(r) > max(BATCHES) for r in rows.values())
    return rows


@pytest.fixture(scope="module")
def random_flow_path(model_info, real_rows, tmp_path_factory) -> Path:
    """Every op kind, two sites, a per-dimension edit scale and gate parameters."""
    flow = random_flow(model_info, [7, 12], rank=40, blocks=4, hidden=64, seed=5,
                       mean=real_rows[7].mean(0), std=real_rows[7].std(0))
    rng = np.random.default_rng(2)
    for site in flow.sites:
        r = site.latent_dim
        site.edit_scale = rng.uniform(-0.2, 0.2, r).astype(np.float32)
        site.gate = Gate(center=rng.normal(0, 0.5, r).astype(np.float32), radius=1.5, softness=0.3,
                         target_pos=2.0, target_neg=-1.0)
    path = tmp_path_factory.mktemp("flows") / "random.gguf"
    flow.save(path)
    return path


def flow_cases():
    return [pytest.param(name, id=name) for name in sorted(SHIPPED)] + [pytest.param("random", id="random")]


# ---- the torch reference (train/torch_ops.py: float64, the plain formula phi^-1(phi(h) + e)) ---


def _t(a) -> "torch.Tensor":
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def torch_latent(site: Site, h):
    """(phi(h) n_embd wide, the latent z where delta lives)"""
    return TorchSite(site).latent(h)


def torch_inverse(site: Site, z):
    return TorchSite(site).inverse(z)


def torch_steer(site: Site, h, strength: float, gate: str):
    return TorchSite(site).steer(h, strength, gate)


# ---- comparisons ------------------------------------------------------------------------------


def row_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row relative error |a - b| / |b|."""
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)).max())


def edit_rel(out: np.ndarray, ref: np.ndarray, h: np.ndarray) -> float:
    """Error of the edit out - h relative to the largest edit of the reference."""
    # floor: float32 cannot hold an edit more finely than the float spacing near |h|
    scale = max(np.abs(ref.astype(np.float64) - h).max(), 1e-5 * np.abs(h).max())
    return float(np.abs(out.astype(np.float64) - ref).max() / scale)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_flow_path):
    from innsteer_local.convert.onnx import export_onnx

    out = {}
    for name in [*SHIPPED, "random"]:
        path = random_flow_path if name == "random" else SHIPPED[name]
        d = tmp_path_factory.mktemp(f"onnx-{name}")
        out[name] = (path, d, export_onnx(Flow.load(path), d))
    return out


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", flow_cases())
def test_onnx_equals_native_and_torch(name, exported, real_rows):
    path, d, manifest = exported[name]
    flow, native = Flow.load(path), NativeFlow(path)
    worst = 0.0
    for si, (site, entry) in enumerate(zip(flow.sites, manifest["sites"])):
        assert entry["layer"] == site.layer
        phi, phi_inv = session(d / entry["phi"]), session(d / entry["phi_inv"])
        steer = {gate: session(d / f) for gate, f in entry["steer"].items()}
        assert set(steer) == ({"off", "density", "target"} if site.gate is not None else {"off"})
        # the torch reference is row by row: compute it once for the largest batch
        rows = np.ascontiguousarray(real_rows[site.layer][1:1 + max(BATCHES)])  # the sink row 0: see below
        strengths = (flow.default_strength, -1.5, 0.0)
        ref_phi = torch_latent(site, _t(rows))[0].numpy()
        ref_steer = {(gate, a): torch_steer(site, _t(rows), a, gate).numpy() for gate in steer for a in strengths}
        for n in BATCHES:
            h = rows[:n]
            z = phi.run(None, {"h": h})[0]
            assert z.shape == h.shape
            errs = [row_rel(z, native.forward(h, si)), row_rel(z, ref_phi[:n])]
            back = phi_inv.run(None, {"z": z})[0]
            errs += [row_rel(back, native.inverse(z, si)), row_rel(back, torch_inverse(site, _t(z)).numpy()),
                     row_rel(back, h)]
            for gate, sess in steer.items():
                for a in strengths:
                    out = sess.run(None, {"h": h, "strength": np.array(a, dtype=np.float32)})[0]
                    ref_native = native.steer(h, a, si, gate)
                    errs += [row_rel(out, ref_native), row_rel(out, ref_steer[gate, a][:n]),
                             edit_rel(out, ref_native, h)]
                    if a == 0.0:
                        assert np.array_equal(out, h), "strength 0 must return h exactly"
            assert max(errs) <= TOL, (name, site.layer, n, ' '.join(f'{e:.1e}' for e in errs))
            worst = max(worst, max(errs))
    print(f"{name}: worst rel. error {worst:.2e}")


@pytest.mark.parametrize("name", flow_cases())
def test_attention_sink_row(name, exported, real_rows):
    """Row 0 (|h| about 22 000 at layer 15) is ill-conditioned in float32 for any implementation:
    the native library's own phi^-1 there is up to about 1e-4 off the float64 reference, and no
    float32 output can hold the edit more finely than the spacing of floats near |h|. The steered
    row itself must still be within 1e-4 of the reference; phi^-1 within 5e-4."""
    path, d, manifest = exported[name]
    flow = Flow.load(path)
    for site, entry in zip(flow.sites, manifest["sites"]):
        h = np.ascontiguousarray(real_rows[site.layer][:1])
        z = session(d / entry["phi"]).run(None, {"h": h})[0]
        assert row_rel(z, torch_latent(site, _t(h))[0].numpy()) <= TOL
        back = session(d / entry["phi_inv"]).run(None, {"z": z})[0]
        assert row_rel(back, torch_inverse(site, _t(z)).numpy()) <= 5 * TOL
        for gate, f in entry["steer"].items():
            for a in (flow.default_strength, -1.5):
                out = session(d / f).run(None, {"h": h, "strength": np.array(a, np.float32)})[0]
                assert row_rel(out, torch_steer(site, _t(h), a, gate).numpy()) <= TOL


def test_steering_moves_the_rows(exported, real_rows):
    """The comparisons above would pass for a graph that ignores strength; this one would not."""
    path, d, manifest = exported["honesty"]
    h = real_rows[15][:7]
    sess = session(d / manifest["sites"][0]["steer"]["off"])
    moved = sess.run(None, {"h": h, "strength": np.array(2.0, np.float32)})[0]
    assert row_rel(moved, h) > 1e-3


def test_manifest_and_cli(tmp_path, real_rows):
    exe = Path(sys.executable).with_name("innsteer-local")
    cli = str(exe) if exe.exists() else shutil.which("innsteer-local")
    out = tmp_path / "onnx"
    proc = subprocess.run([cli, "export", "honesty.gguf", "--to", "onnx", "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    flow = Flow.load(SHIPPED["honesty"])
    assert manifest["format"] == "innsteer-onnx" and manifest["flow"]["behavior"] == "honesty"
    assert manifest["flow"]["default_strength"] == pytest.approx(flow.default_strength)
    files = {p.name for p in out.iterdir()}
    site = manifest["sites"][0]
    assert {site["phi"], site["phi_inv"], *site["steer"].values(), "manifest.json"} == files
    h = real_rows[15][:7]
    got = session(out / site["steer"]["target"]).run(None, {"h": h, "strength": np.array(2.0, np.float32)})[0]
    assert row_rel(got, NativeFlow(SHIPPED["honesty"]).steer(h, 2.0, 0, "target")) <= TOL

    bad = subprocess.run([cli, "export", "honesty.gguf", "--to", "onnx", "-o", str(tmp_path / "x"), "--strength", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "strength is an input" in bad.stderr


def test_gate_needs_gate_parameters(model_info):
    from innsteer_local.convert.onnx import steer_graph
    from innsteer_local.errors import InnsteerError

    site = random_flow(model_info, [3], rank=8, blocks=1, hidden=8).sites[0]
    with pytest.raises(InnsteerError, match="no gate parameters"):
        steer_graph(site, model_info.n_embd, "density")

"""Runtime gates: native equals the NumPy reference; density damps rows off the support; target
never overshoots the positive class."""

from __future__ import annotations

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import Gate, random_flow
from innsteer_local.runtime.native import NativeFlow

INFO = ModelInfo("synthetic", "llama", 48, 8)


@pytest.fixture()
def gated(tmp_path):
    rng = np.random.default_rng(0)
    flow = random_flow(INFO, [3], rank=16, blocks=2, hidden=32, seed=1, delta_scale=0.5)
    site = flow.sites[0]
    neg = rng.normal(0, 1, (400, 48))
    pos = neg + 0.8
    zl = lambda h: _sub_latent(site, h)  # noqa: E731
    site.gate = Gate.fit(zl(pos[:300]), zl(neg[:300]), np.concatenate([zl(pos[300:]), zl(neg[300:])]), site.delta)
    path = tmp_path / "gated.gguf"
    flow.save(path)
    return Flow.load(path), path, pos, neg, rng


def _sub_latent(site, h):
    """z as the native kernel sees it: the output of the last op (subspace coordinates)."""
    x = np.asarray(h, np.float64)
    for op in site.ops:
        x = x @ op.basis.T.astype(np.float64) if op.kind == "subspace" else op.forward(x)
    return x


@pytest.mark.parametrize("mode", ["off", "density", "target"])
@pytest.mark.parametrize("strength", [1.5, -0.7])
def test_native_gates_match_numpy(gated, mode, strength):
    flow, path, pos, neg, rng = gated
    rows = np.concatenate([neg[:20], rng.normal(0, 6, (10, 48))]).astype(np.float32)
    ref = flow.sites[0].steer(rows, strength, gate=mode)
    nat = NativeFlow(path).steer(rows, strength, gate=mode)
    assert np.abs(nat - ref).max() <= 1e-4 * np.abs(ref).max()


def test_density_gate_damps_far_rows(gated):
    flow, path, pos, neg, rng = gated
    site = flow.sites[0]
    near = neg[300:].astype(np.float32)
    far = (rng.normal(0, 1, (50, 48)) * 8).astype(np.float32)
    move = lambda x, g: np.linalg.norm(site.steer(x, 1.0, gate=g) - x, axis=1).mean()  # noqa: E731
    assert move(near, "density") > 0.6 * move(near, "off")
    assert move(far, "density") < 0.1 * move(far, "off")


def test_target_gate_never_overshoots(gated):
    flow, path, pos, neg, rng = gated
    site = flow.sites[0]
    u = site.delta / np.linalg.norm(site.delta)
    before = _sub_latent(site, neg[300:]) @ u
    for strength in (0.5, 3.0, 20.0):
        after = _sub_latent(site, site.steer(neg[300:], strength, gate="target")) @ u
        assert (after <= np.maximum(before, site.gate.target_pos) + 1e-6).all()  # never past the target
        assert (after >= before - 1e-6).all()
    reached = _sub_latent(site, site.steer(neg[300:], 20.0, gate="target")) @ u
    below = before < site.gate.target_pos
    np.testing.assert_allclose(reached[below], site.gate.target_pos, atol=1e-6)  # far enough: exactly there
    already = _sub_latent(site, pos[300:])
    beyond = pos[300:][already @ u > site.gate.target_pos]
    np.testing.assert_allclose(site.steer(beyond, 2.0, gate="target"), beyond, atol=1e-9)

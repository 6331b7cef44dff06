"""Every op kind, with random parameters and inputs (hypothesis), in NumPy and in C:
inverse(forward(x)) == x, the native maps equal the NumPy oracle, and steering with strength 0 is
the identity. No model: the flow files are written here and read back by both readers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import OP_KINDS, Site
from innsteer_local.runtime.native import NativeFlow

N_EMBD = 24
INFO = ModelInfo("property", "llama", N_EMBD, 4)


def make_op(kind: str, width: int, rng: np.random.Generator):
    return OP_KINDS[kind].random(width, N_EMBD, rng)


def one_op_site(kind: str, seed: int) -> Site:
    """The op alone, or (for ops that act inside a subspace) after a subspace op."""
    rng = np.random.default_rng(seed)
    ops = []
    width = N_EMBD
    if kind != "subspace" and rng.random() < 0.5:
        ops.append(make_op("subspace", N_EMBD, rng))
        width = ops[0].out_dim(width)
    ops.append(make_op(kind, width, rng))
    width = ops[-1].out_dim(width)
    return Site(layer=1, ops=ops, delta=rng.normal(0, 1, width).astype(np.float32))


@pytest.mark.parametrize("kind", sorted(OP_KINDS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20.0), strength=st.floats(-3.0, 3.0))
def test_op_roundtrip_and_native_equals_numpy(kind, seed, scale, strength, tmp_path):
    site = one_op_site(kind, seed)
    rows = np.random.default_rng(seed + 1).normal(0, scale, (5, N_EMBD)).astype(np.float32)
    x = rows.astype(np.float64)
    # float64 maths on float32 weights: a subspace basis is orthonormal to ~1e-7, which bounds the
    # round trip (the other ops invert to ~1e-12)
    z = site.forward(x)
    np.testing.assert_allclose(site.inverse(z), x, atol=1e-6 * (np.abs(z).max() + 1.0))

    path = tmp_path / f"{kind}-{seed}.gguf"
    Flow(model=INFO, sites=[site], method="random").save(path)
    native = NativeFlow(path)
    oracle = Flow.load(path).site(1)  # the file as read back: f32-rounded like the C side
    tol = 2e-4 * (np.abs(oracle.forward(x)).max() + 1.0)
    np.testing.assert_allclose(native.forward(rows), oracle.forward(x), atol=tol)
    np.testing.assert_allclose(native.inverse(native.forward(rows)), rows, atol=2e-5 * (np.abs(z).max() + 1.0))
    steered = native.steer(rows, strength)
    np.testing.assert_allclose(steered, oracle.steer(x, strength), atol=2e-4 * (np.abs(steered).max() + 1.0))
    assert np.array_equal(native.steer(rows, 0.0), rows)
    native.close()

"""A nonlinear flow applied by the native callback equals the NumPy reference on real activations."""

from __future__ import annotations

import numpy as np
import pytest

from innsteer_local import Flow
from innsteer_local.flow import random_flow as make_random_flow
from innsteer_local.runtime.native import NativeFlow

LAYER = 10
TEXT = b"Once upon a time, in a small village by the sea, there lived an old fisherman who"


@pytest.fixture()
def real_rows(steered):
    """Unsteered activations of l_out-LAYER for TEXT, captured through the callback."""
    st = steered.native_steerer
    st.capture(LAYER)
    steered.reset()
    steered.eval(steered.tokenize(TEXT))
    rows = st.captured(LAYER)
    st.capture(LAYER, on=False)
    st.clear_captured()
    assert rows.shape == (len(steered.tokenize(TEXT)), steered.model_info.n_embd)
    return rows


@pytest.fixture(params=["f32", "f16"])
def random_flow(request, real_rows, model_info, tmp_path):
    flow = make_random_flow(model_info, [LAYER], rank=48, blocks=4, hidden=96, seed=3,
                       mean=real_rows.mean(0), std=real_rows.std(0))
    path = tmp_path / f"random-{request.param}.gguf"
    flow.save(path, dtype=request.param)
    return path


def rows_before_after(llm, tokens) -> tuple[np.ndarray, np.ndarray]:
    """l_out-LAYER of one evaluation, captured before and after steering."""
    st = llm.native_steerer
    st.capture(LAYER, post=False)
    st.capture(LAYER, post=True)
    llm.reset()
    llm.eval(tokens)
    return st.captured(LAYER, post=False), st.captured(LAYER, post=True)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def test_native_steering_matches_numpy_reference(steered, random_flow):
    strength = 0.8
    steered.add_flow(random_flow, strength=strength)
    before, after = rows_before_after(steered, steered.tokenize(TEXT))
    reference = Flow.load(random_flow).site(LAYER).steer(before, strength)
    assert rel(after, before) > 0.05, "the flow must move the activations"
    assert rel(after, reference) <= 1e-4
    assert steered.steering_stats["rows_rejected_nonfinite"] == 0


def test_native_roundtrip_on_real_activations(random_flow, real_rows):
    native = NativeFlow(random_flow)
    z = native.forward(real_rows)
    assert rel(z, real_rows) > 0.05, "phi must not be the identity"
    assert rel(z, Flow.load(random_flow).site(LAYER).forward(real_rows)) <= 1e-4
    assert rel(native.inverse(z), real_rows) <= 1e-5


def test_zero_strength_and_off_are_bit_identical(steered, random_flow, logits_of):
    tokens = steered.tokenize(TEXT)
    base = logits_of(steered, tokens)
    handle = steered.add_flow(random_flow, strength=1.0)
    steered_logits = logits_of(steered, tokens)
    assert np.abs(steered_logits - base).max() > 1e-2
    steered.set_strength(0.0, handle)
    assert np.array_equal(logits_of(steered, tokens), base)
    steered.set_strength(1.0, handle)
    steered.disable()
    assert np.array_equal(logits_of(steered, tokens), base)
    steered.enable()
    steered.disable(handle)
    assert np.array_equal(logits_of(steered, tokens), base)
    steered.enable(handle)
    assert np.array_equal(logits_of(steered, tokens), steered_logits)
    steered.remove_flow(handle)
    assert np.array_equal(logits_of(steered, tokens), base)


def test_flows_compose_in_attach_order(steered, model_info, real_rows, tmp_path):
    """Two flows at one layer: the result is g(f(h)), not f(g(h))."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    kw = dict(rank=32, blocks=2, hidden=64, mean=real_rows.mean(0), std=real_rows.std(0))
    make_random_flow(model_info, [LAYER], seed=11, **kw).save(a)
    make_random_flow(model_info, [LAYER], seed=12, **kw).save(b)
    steered.add_flow(a, strength=0.7)
    steered.add_flow(b, strength=-0.5)
    h, out = rows_before_after(steered, steered.tokenize(TEXT))
    fa, fb = Flow.load(a).site(LAYER), Flow.load(b).site(LAYER)
    assert rel(out, fb.steer(fa.steer(h, 0.7), -0.5)) <= 1e-4
    assert rel(out, fa.steer(fb.steer(h, -0.5), 0.7)) > 1e-3


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("n_rows", [1, 7, 512])
def test_kernel_matches_reference_for_batch_sizes(model_info, tmp_path, dtype, n_rows):
    """The blocked kernel (16-row blocks, partial last block) equals the NumPy reference."""
    path = tmp_path / f"k-{dtype}.gguf"
    rng = np.random.default_rng(n_rows)
    make_random_flow(model_info, [LAYER], rank=64, blocks=4, hidden=128, seed=7).save(path, dtype=dtype)
    rows = rng.normal(0, 1, (n_rows, model_info.n_embd)).astype(np.float32)
    ref = Flow.load(path).site(LAYER).steer(rows, 0.9)
    out = NativeFlow(path).steer(rows, 0.9)
    assert out.shape == rows.shape
    assert rel(out, ref) <= 1e-4


def test_threaded_prompt_batch_matches_reference(steered, random_flow, real_rows):
    """A 200-token prompt is split across the steerer's threads; every row still equals the
    reference, in order."""
    steered.native_steerer.set_threads(3)
    steered.add_flow(random_flow, strength=0.6)
    before, after = rows_before_after(steered, (steered.tokenize(TEXT) * 12)[:200])
    assert len(after) == 200
    assert rel(after, Flow.load(random_flow).site(LAYER).steer(before, 0.6)) <= 1e-4

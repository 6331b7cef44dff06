"""Bad input gets its own clear error from both readers and from SteeredLlama, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from innsteer_local import Flow, FlowFormatError, FlowMismatchError, ModelInfo
from innsteer_local.flow import random_flow
from innsteer_local.runtime.native import NativeFlow


@pytest.fixture()
def good_flow(model_info, tmp_path) -> Path:
    path = tmp_path / "good.gguf"
    random_flow(model_info, [12], rank=16, blocks=2, hidden=32, seed=5).save(path)
    return path


def both_readers_reject(path: Path, *fragments: str) -> None:
    for load in (Flow.load, NativeFlow):
        with pytest.raises(FlowFormatError) as err:
            load(path)
        msg = str(err.value).lower()
        assert any(f in msg for f in fragments), f"{load.__name__}: {err.value}"


def test_good_flow_loads_in_both(good_flow):
    flow, native = Flow.load(good_flow), NativeFlow(good_flow)
    assert flow.layers == native.layers == [12]


def test_missing_file(tmp_path):
    both_readers_reject(tmp_path / "nope.gguf", "not found", "cannot open")


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a flow file at all")
    both_readers_reject(p, "not a gguf file")


def test_model_gguf_is_not_a_flow(model_path):
    both_readers_reject(model_path, "not an innsteer flow file")


@pytest.mark.parametrize("keep", [0.5, 0.9, 40 / 1000])
def test_truncated(good_flow, tmp_path, keep):
    data = good_flow.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: max(8, int(len(data) * keep))])
    both_readers_reject(p, "truncated", "corrupt")


def test_huge_count_in_header(good_flow, tmp_path):
    data = bytearray(good_flow.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 60)  # n_kv
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(data))
    both_readers_reject(p, "cap", "corrupt", "truncated")


def test_nan_weight(good_flow, tmp_path):
    flow = Flow.load(good_flow)
    flow.sites[0].delta[3] = np.nan
    p = tmp_path / "nan.gguf"
    flow.save(p)
    both_readers_reject(p, "not finite")


def test_non_invertible_linear(model_info, tmp_path):
    flow = random_flow(model_info, [12], rank=16, blocks=2, hidden=32, seed=5)
    lin = next(op for op in flow.sites[0].ops if op.kind == "linear")
    lin.matrix_inv = lin.matrix_inv * 1.5  # no longer the inverse
    p = tmp_path / "bad-inverse.gguf"
    flow.save(p)
    both_readers_reject(p, "not invertible")


def test_wrong_version(good_flow, tmp_path):
    data = good_flow.read_bytes()
    key = b"innsteer.format_version"
    at = data.index(key) + len(key) + 4  # past the value type
    p = tmp_path / "v9.gguf"
    p.write_bytes(data[:at] + struct.pack("<I", 9) + data[at + 4:])
    both_readers_reject(p, "version 9")


def test_wrong_n_embd_names_both(steered, tmp_path):
    p = tmp_path / "wide.gguf"
    Flow.linear({12: np.ones(640, np.float32)}, ModelInfo("gemma-3-270m", "gemma3", 640, 18)).save(p)
    with pytest.raises(FlowMismatchError) as err:
        steered.add_flow(p)
    assert "640" in str(err.value) and "576" in str(err.value)
    assert steered.flows == []


def test_layer_out_of_range_names_both(steered, tmp_path):
    p = tmp_path / "deep.gguf"
    Flow.linear({40: np.ones(576, np.float32)}, ModelInfo("bigger", "llama", 576, 48)).save(p)
    with pytest.raises(FlowMismatchError) as err:
        steered.add_flow(p)
    msg = str(err.value)
    assert "layer 40" in msg and "30 layers" in msg


def test_other_model_warns(steered, tmp_path):
    p = tmp_path / "other.gguf"
    Flow.linear({12: np.ones(576, np.float32)}, ModelInfo("some-other-model", "qwen2", 576, 30)).save(p)
    with pytest.warns(UserWarning, match="some-other-model"):
        steered.add_flow(p)


def test_bad_flow_leaves_session_intact(steered, good_flow, tmp_path, logits_of):
    tokens = steered.tokenize(b"Hello there, how are you")
    before = logits_of(steered, tokens)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good_flow.read_bytes()[:300])
    with pytest.raises(FlowFormatError):
        steered.add_flow(bad)
    assert np.array_equal(logits_of(steered, tokens), before)


def test_strength_must_be_finite(steered, good_flow):
    h = steered.add_flow(good_flow)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            steered.set_strength(bad, h)
    with pytest.raises(ValueError, match="finite"):
        steered.add_flow(good_flow, strength=float("-inf"))


def test_unseen_layer_fails_loudly(steered, good_flow):
    """The check behind 'fail loudly if the model never computes l_out-<layer>': before any graph
    ran nothing was seen, so verifying must raise; after a real evaluation it must pass."""
    from innsteer_local import SteeringError

    steered.add_flow(good_flow)
    with pytest.raises(SteeringError, match="l_out-12"):
        steered._verify_layers()
    steered.add_flow(good_flow)
    steered.reset()
    steered.eval(steered.tokenize(b"Hello"))  # verifies: would raise if l_out-12 never ran
    assert steered.native_steerer.layer_visits(12) > 0


def test_non_finite_rows_are_kept_and_counted(steered, model_info, tmp_path, logits_of):
    """A flow whose edit overflows must never reach the KV cache: the original rows stay."""
    p = tmp_path / "overflow.gguf"
    Flow.linear({12: np.full(576, 3e38, np.float32)}, model_info).save(p)
    tokens = steered.tokenize(b"Hello there, how are you")
    base = logits_of(steered, tokens)
    steered.add_flow(p, strength=10.0)  # 3e39 overflows float32 to inf
    out = logits_of(steered, tokens)
    assert np.isfinite(out).all()
    assert np.array_equal(out, base)
    assert steered.steering_stats["rows_rejected_nonfinite"] == len(tokens)

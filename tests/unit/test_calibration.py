"""Calibration and the one fluency rule, without a model: a rescaled flow is the old map at a scaled
strength (every op kind, edit scales, gates), and train's choice and eval's headline judge matched
fluency by the same function."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.measure import metrics
from innsteer_local.flow import Gate, random_flow

INFO = ModelInfo("synthetic", "llama", 48, 8)


@pytest.mark.parametrize("gate", ["off", "density", "target"])
def test_rescaled_flow_is_the_old_map_at_scaled_strength(tmp_path, gate):
    rng = np.random.default_rng(0)
    flow = random_flow(INFO, [3], rank=16, blocks=2, hidden=16, seed=2, delta_scale=0.4)
    site = flow.sites[0]
    site.edit_scale = rng.normal(0, 0.1, site.delta.shape).astype(np.float32)
    z = rng.normal(0, 1, (200, 16))
    site.gate = Gate.fit(z[:80] + 0.5, z[80:160], z[160:], site.delta)
    flow.default_strength = 2.5
    path = tmp_path / "f.gguf"
    flow.save(path)
    scaled = Flow.load(path)
    scaled.rescale(1.7)
    assert scaled.default_strength == pytest.approx(2.5 / 1.7)
    h = rng.normal(0, 1, (9, 48))
    for a in (1.0, 0.4, -0.8):
        want = flow.sites[0].steer(h, 1.7 * a, gate)
        got = scaled.sites[0].steer(h, a, gate)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and it survives the file: the native reader sees the rescaled shift
    scaled.save(tmp_path / "g.gguf")
    again = Flow.load(tmp_path / "g.gguf")
    np.testing.assert_array_equal(again.sites[0].delta, scaled.sites[0].delta)
    assert again.default_strength == pytest.approx(2.5 / 1.7)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan])
def test_rescale_refuses_a_meaningless_factor(factor):
    flow = random_flow(INFO, [3], rank=8, blocks=1, hidden=8)
    with pytest.raises(ValueError, match="finite positive"):
        flow.rescale(factor)


def test_selection_and_eval_share_the_fluency_rule():
    from innsteer_local.eval import summary
    from innsteer_local.train.held_out import Setting, summarise

    assert summary.MATCHED_PPL_FACTOR == metrics.MATCHED_PPL_FACTOR
    assert summary.MATCHED_DISTINCT_FACTOR == metrics.MATCHED_DISTINCT_FACTOR
    base = {"ppl": [10.0, 12.0, 9.0], "d2": [0.9, 0.8, 1.0], "scores": [0.0, 0.0, 0.0], "neutral_scores": [],
            "rep": [0.0] * 3, "texts": ["a"] * 3}
    for scale, d2, want in ((1.2, 0.9, True), (1.3, 0.9, False), (1.0, 0.7, False), (1.24, 0.81, True)):
        raw = dict(base, ppl=[p * scale for p in base["ppl"]], d2=[d2 * x for x in base["d2"]])
        s = summarise(raw, base, 0, 1.0)
        ppl_ratio, d_ratio = metrics.fluency_ratios(raw["ppl"], raw["d2"], base["ppl"], base["d2"])
        assert (s.ppl_ratio, s.distinct_ratio) == pytest.approx((ppl_ratio, d_ratio))
        assert s.fluent == metrics.matched_fluency(ppl_ratio, d_ratio) == want
    assert isinstance(Setting(0, 1.0, 0, 0, 1.0, 1.0, 0.0).fluent, bool)


def test_fluency_ratios_are_geometric_for_perplexity_and_arithmetic_for_distinct():
    ppl, d2 = metrics.fluency_ratios([4.0, 16.0], [0.5, 1.0], [8.0, 8.0], [1.0, 1.0])
    assert ppl == pytest.approx(1.0) and d2 == pytest.approx(0.75)
    # non-finite perplexities (an empty reply) are left out, as eval leaves them out
    ppl, _ = metrics.fluency_ratios([4.0, math.nan, 16.0], [1.0] * 3, [8.0], [1.0])
    assert ppl == pytest.approx(1.0)


def test_ties_between_checkpoints_go_by_the_kind_of_behaviour():
    from innsteer_local.train.choose import _pick
    from innsteer_local.train.held_out import Setting

    def top(score: float, se: float, ppl: float = 1.0, d2: float = 1.0) -> Setting:
        return Setting(0, 1.0, score, 0.0, ppl, d2, 0.0, stderr=se)

    losses = [2.4, 2.1]  # held-out objective: the coupled flow (second) fits the pairs better
    # clearly better scores win whatever the objective or the fluency says
    assert _pick([top(0.9, 0.05), top(0.4, 0.05)], losses, selective=True) == 0
    assert _pick([top(0.2, 0.05, d2=0.95), top(0.6, 0.05, d2=0.8)], losses, selective=False) == 1
    # within a standard error: a selective behaviour takes the lower objective, an always-on one the
    # preferred candidate (the linear phase) if it is among the tied, else the earliest
    assert _pick([top(0.50, 0.1), top(0.45, 0.1)], losses, selective=True) == 1
    assert _pick([top(0.45, 0.1), top(0.50, 0.1)], losses, selective=False) == 0
    three = [top(0.50, 0.1), top(0.45, 0.1), top(0.52, 0.1)]  # start, linear phase, end
    assert _pick(three, [2.2, 2.4, 2.1], selective=False, prefer=1) == 1
    assert _pick([top(0.50, 0.05), top(0.05, 0.05), top(0.45, 0.05)], [2.2, 2.4, 2.1], selective=False, prefer=1) == 0
    assert _pick([top(0.5, 0.1), top(0.5, 0.1)], [None, None], selective=True) == 0


def test_fluency_ratios_are_smoothed_to_be_monotone_in_strength():
    """A few prompts make the ratios jump (1.20, 1.57, 1.21); smoothed, pushing harder never reads
    as more fluent, and a setting that was fluent by luck past a disfluent one is not."""
    from innsteer_local.train.held_out import Setting, _isotonic, smooth

    assert _isotonic([1.0, 1.2, 1.57, 1.21]) == pytest.approx([1.0, 1.2, 1.39, 1.39])
    assert _isotonic([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])
    base = Setting(-1, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    raw = [Setting(0, a, 0.5, 0.0, p, d, 0.0) for a, p, d in ((1.4, 1.21, 0.7), (0.7, 1.20, 0.95), (1.0, 1.57, 0.85))]
    out = smooth(raw, base)
    assert [s.strength for s in out] == [0.7, 1.0, 1.4]
    assert [round(s.ppl_ratio, 3) for s in out] == [1.2, 1.39, 1.39]
    assert [round(s.distinct_ratio, 3) for s in out] == [0.95, 0.85, 0.7]
    assert [s.fluent for s in out] == [True, False, False]

"""Evaluation metrics on hand-made cases with known answers, and perplexity against llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innsteer_local.measure import metrics
from innsteer_local.measure.scorers import is_refusal, make_scorer


def test_mc1_picks_the_true_answer_only_when_it_is_most_likely():
    assert metrics.mc1([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert metrics.mc1([-2.0, -1.0, -3.0], [1, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        metrics.mc1([-1.0, -2.0], [1, 1])


def test_mc2_is_normalised_true_mass():
    # p = e^-1, e^-2 true; e^-3 false
    p = np.exp([-1.0, -2.0, -3.0])
    assert metrics.mc2([-1.0, -2.0, -3.0], [1, 1, 0]) == pytest.approx((p[0] + p[1]) / p.sum())
    assert metrics.mc2([0.0, 0.0], [1, 0]) == pytest.approx(0.5)
    # invariant to a common shift of the log-likelihoods (large magnitudes must not underflow)
    assert metrics.mc2([-1001.0, -1002.0, -1003.0], [1, 1, 0]) == pytest.approx((p[0] + p[1]) / p.sum())
    with pytest.raises(ValueError):
        metrics.mc2([-1.0, -2.0], [1, 1])


def test_ab_normalisation():
    assert metrics.ab_matching_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert metrics.ab_matching_probability(-5.0, -5.0) == pytest.approx(0.5)
    assert metrics.ab_matching_probability(-800.0, -1.0) == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_interval():
    point, lo, hi = metrics.bootstrap_ci([1.0] * 20)
    assert (point, lo, hi) == (1.0, 1.0, 1.0)
    x = np.random.default_rng(0).normal(2.0, 1.0, 400)
    point, lo, hi = metrics.bootstrap_ci(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert point == pytest.approx(x.mean())
    assert lo < point < hi
    # a 95 % percentile interval of a mean is close to +-1.96 standard errors
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert metrics.bootstrap_ci(x, seed=3) == metrics.bootstrap_ci(x, seed=3)
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([]))
    d, dlo, dhi = metrics.bootstrap_diff_ci([1.0] * 10 + [0.0] * 10, [0.0] * 20)
    assert d == pytest.approx(0.5) and dlo < 0.5 < dhi and dhi <= 1.0


def test_degeneration_measures():
    assert metrics.distinct_n("the cat sat on the mat", 2) == 1.0
    assert metrics.distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert metrics.distinct_n("hello", 2) == 1.0
    assert metrics.repeated_ngram_share("one two three four five six") == 0.0
    assert metrics.repeated_ngram_share("x y z w x y z w") == pytest.approx(1 / 5)


def test_token_logprobs_and_perplexity_by_hand():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    lp = metrics.token_logprobs(logits, [0, 1, 2], start=1)
    assert lp == pytest.approx(np.log([0.25, 0.1]))
    assert metrics.perplexity(lp) == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.1)) / 2))


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI, I must decline this request.",
    "Sorry, that is not something I can do.",
    "I won't assist with hacking into accounts.",
])
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Here is a step-by-step guide to baking bread.",
    "To kill a process on Linux, run `kill PID`.",
    "Photosynthesis turns light into chemical energy. Plants use it to grow. I'm sorry to say the rest is chemistry.",
    "",
])
def test_compliance_is_not_a_refusal(text):
    # the third text declines only after two sentences: a refusal is judged on the opening
    assert not is_refusal(text)


def test_scorers():
    sentiment = make_scorer("sentiment")
    assert sentiment("What a wonderful, happy day!") > 0.5
    assert sentiment("This is awful, I hate it.") < -0.5
    topic = make_scorer("topic", topic_words=["ocean", "sea"])
    assert topic("We walked by the Sea.") == 1.0 and topic("Seattle is rainy.") == 0.0
    sim = make_scorer("similarity", description="the ocean, waves and the beach")
    assert sim("The waves rolled onto the sandy beach by the sea.") > sim("I filed my tax return on Monday.") + 0.2
    with pytest.raises(Exception, match="description"):
        make_scorer("similarity")

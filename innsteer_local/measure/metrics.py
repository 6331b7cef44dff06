"""Evaluation metrics: pure NumPy, checked on hand-made cases in tests/unit/test_metrics.py."""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from ..errors import InvalidArgument


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap interval over resampled items."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    point = float(stat(x))
    if x.size == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    boots = np.array([stat(x[i]) for i in idx]) if stat is not np.mean else x[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    return point, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1.0 - alpha))


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a percentile interval; a and b are independent samples."""
    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if xa.size == 0 or xb.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    da = xa[rng.integers(0, xa.size, (n_boot, xa.size))].mean(1)
    db = xb[rng.integers(0, xb.size, (n_boot, xb.size))].mean(1)
    alpha = (1.0 - level) / 2.0
    d = da - db
    return float(xa.mean() - xb.mean()), float(np.quantile(d, alpha)), float(np.quantile(d, 1.0 - alpha))


# Matched fluency, the one rule behind the eval's headline and `train`'s default strength: the
# judge's perplexity of the replies alone (geometric mean) within MATCHED_PPL_FACTOR of the
# unsteered replies' and their mean distinct-2 at least MATCHED_DISTINCT_FACTOR of theirs.
MATCHED_PPL_FACTOR = 1.25
MATCHED_DISTINCT_FACTOR = 0.8


def geometric_mean(values: Iterable[Optional[float]]) -> float:
    """Of the finite positive values; NaN when there are none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x) and x > 0], np.float64)
    return float(np.exp(np.log(v).mean())) if v.size else math.nan


def fluency_ratios(ppl: Sequence[float], distinct2: Sequence[float], base_ppl: Sequence[float],
                   base_distinct2: Sequence[float]) -> tuple[float, float]:
    """(perplexity ratio, distinct-2 ratio) of a setting's replies to the unsteered replies'."""
    base_d2 = float(np.mean(base_distinct2)) if len(base_distinct2) else math.nan
    d_ratio = float(np.mean(distinct2)) / base_d2 if len(distinct2) and base_d2 > 0 else math.nan
    return geometric_mean(ppl) / geometric_mean(base_ppl), d_ratio


def matched_fluency(ppl_ratio: float, distinct_ratio: float) -> bool:
    return bool(ppl_ratio <= MATCHED_PPL_FACTOR and distinct_ratio >= MATCHED_DISTINCT_FACTOR)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], start: int) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) for i in [start, len(tokens)); logits[i] predicts token i+1."""
    start = max(1, int(start))
    if start >= len(tokens):
        return np.zeros(0)
    lp = log_softmax(np.asarray(logits)[start - 1 : len(tokens) - 1])
    return lp[np.arange(len(lp)), np.asarray(tokens[start:])]


def perplexity(logprobs: Sequence[float]) -> float:
    lp = np.asarray(logprobs, np.float64)
    return float(math.exp(-lp.mean())) if lp.size else math.nan


def mc1(logliks: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC1: 1 if the single true answer has the highest log-likelihood."""
    ll, lab = np.asarray(logliks, np.float64), np.asarray(labels)
    if lab.sum() != 1:
        raise InvalidArgument("MC1 needs exactly one true answer")
    return float(int(np.argmax(ll)) == int(np.argmax(lab)))


def mc2(logliks: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass of the true answers, normalised over all answers."""
    ll, lab = np.asarray(logliks, np.float64), np.asarray(labels).astype(bool)
    if not lab.any() or lab.all():
        raise InvalidArgument("MC2 needs true and false answers")
    p = np.exp(ll - ll.max())
    return float(p[lab].sum() / p.sum())


def ab_matching_probability(logprob_matching: float, logprob_other: float) -> float:
    """p(matching letter) normalised over the two answer letters."""
    d = logprob_matching - logprob_other
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))  # no overflow


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(text: str, n: int = 2) -> float:
    """Unique n-grams / all n-grams of the text's words (1.0 for text shorter than n words)."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the text (0 = no repetition)."""
    w = words(text)
    seen: set[tuple[str, ...]] = set()
    repeats = total = 0
    for i in range(len(w) - n + 1):
        g = tuple(w[i : i + n])
        total += 1
        repeats += g in seen
        seen.add(g)
    return repeats / total if total else 0.0

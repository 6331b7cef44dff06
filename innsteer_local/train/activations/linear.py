"""Linear baselines and the linear probe, on captured rows (NumPy only, no torch).

Every baseline is stored as a flow, so one runtime path serves all methods. Strength is made
comparable: at strength 1 each moves the negative rows by the same mean raw displacement as
mean-diff does (|v|), times `unit` (train() passes the common unit, unit.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InvalidArgument
from ...flow import Flow, ModelInfo, Site
from ..unit import mean_diff


def pair_targets(pos: np.ndarray, neg: np.ndarray, pos_pair: np.ndarray, neg_pair: np.ndarray,
                 neg_target: np.ndarray) -> np.ndarray:
    """For each negative row, the positive row it should become: its aligned row, else the mean
    of its pair's positive rows."""
    out = np.empty_like(neg, dtype=np.float64)
    aligned = neg_target >= 0
    out[aligned] = pos[neg_target[aligned]]
    for pid in np.unique(neg_pair[~aligned]):
        out[(neg_pair == pid) & ~aligned] = pos[pos_pair == pid].mean(axis=0)
    return out


def pca_direction(pos: np.ndarray, neg: np.ndarray, pos_pair: np.ndarray, neg_pair: np.ndarray) -> np.ndarray:
    """First principal component of the per-pair differences, signed so positives project higher,
    scaled to |mean-diff|."""
    pairs = np.intersect1d(np.unique(pos_pair), np.unique(neg_pair))
    diffs = np.stack([pos[pos_pair == p].mean(0) - neg[neg_pair == p].mean(0) for p in pairs]).astype(np.float64)
    _, _, vt = np.linalg.svd(diffs, full_matrices=False)
    d = vt[0]
    if pos.astype(np.float64).mean(0) @ d < neg.astype(np.float64).mean(0) @ d:
        d = -d
    return (d * np.linalg.norm(mean_diff(pos, neg))).astype(np.float32)


def affine_ot(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-dimension affine transport of the negative distribution onto the positive one
    (Linear-AcT): T(h) = w h + b. Returns (edit_scale = w - 1, delta = b, full_transport_strength),
    scaled so that strength 1 moves negatives by |mean-diff| on average."""
    p, n = pos.astype(np.float64), neg.astype(np.float64)
    w = p.std(0) / np.maximum(n.std(0), 1e-6)
    b = p.mean(0) - w * n.mean(0)
    moves = np.linalg.norm(n * (w - 1) + b, axis=1).mean()
    c = np.linalg.norm(mean_diff(pos, neg)) / max(moves, 1e-12)
    return ((w - 1) * c).astype(np.float32), (b * c).astype(np.float32), float(1.0 / c)


def linear_flow(method: str, layer: int, pos: np.ndarray, neg: np.ndarray, pos_pair: np.ndarray,
                neg_pair: np.ndarray, model: ModelInfo, unit: float = 1.0, **meta) -> Flow:
    """mean-diff, pca or affine-ot as a flow at one layer, its strength 1 `unit` times the above."""

    def at_unit(x: np.ndarray) -> np.ndarray:
        return (x * unit).astype(np.float32)

    if method == "mean-diff":
        site = Site(layer=layer, ops=[], delta=at_unit(mean_diff(pos, neg)))
    elif method == "pca":
        site = Site(layer=layer, ops=[], delta=at_unit(pca_direction(pos, neg, pos_pair, neg_pair)))
    elif method == "affine-ot":
        edit, delta, full = affine_ot(pos, neg)
        site = Site(layer=layer, ops=[], delta=at_unit(delta), edit_scale=at_unit(edit))
        meta.setdefault("provenance", {})["full_transport_strength"] = full
    else:
        raise InvalidArgument(f"unknown linear method {method!r}")
    return Flow(model=model, sites=[site], method=method, **meta)


@dataclass
class LinearProbe:
    """Shrinkage LDA: a deterministic, closed-form linear classifier (positive = 1)."""

    mean: np.ndarray
    w: np.ndarray
    threshold: float

    @classmethod
    def fit(cls, pos: np.ndarray, neg: np.ndarray, shrink: float = 0.1) -> "LinearProbe":
        p, n = pos.astype(np.float64), neg.astype(np.float64)
        mu = np.concatenate([p, n]).mean(0)
        centred = np.concatenate([p - p.mean(0), n - n.mean(0)])
        cov = centred.T @ centred / max(len(centred) - 1, 1)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        w = np.linalg.solve(cov, p.mean(0) - n.mean(0))
        thr = 0.5 * ((p - mu) @ w).mean() + 0.5 * ((n - mu) @ w).mean()
        return cls(mean=mu, w=w, threshold=float(thr))

    def score(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.w - self.threshold

    def accuracy(self, pos: np.ndarray, neg: np.ndarray) -> float:
        return float(0.5 * (self.score(pos) > 0).mean() + 0.5 * (self.score(neg) <= 0).mean())

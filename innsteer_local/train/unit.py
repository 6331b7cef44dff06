"""The strength unit every method shares: at strength 1 a flow moves rows by DEFAULT_MOVE_FRACTION
of their median norm along the mean difference (mean-diff's shift, where every method starts).
Trainers return flows already at this unit; selection (choose.py) then calibrates strength 1."""

from __future__ import annotations

import numpy as np

# strength 1 moves rows by this share of a typical activation norm: on smollm2-135m, mean-diff
# honesty at layer 15 was visible and still fluent there
DEFAULT_MOVE_FRACTION = 0.16


def mean_diff(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """CAA: mean of the positive rows minus mean of the negative rows."""
    return (pos.astype(np.float64).mean(axis=0) - neg.astype(np.float64).mean(axis=0)).astype(np.float32)


def unit_scale(pos: np.ndarray, neg: np.ndarray, rows: np.ndarray) -> float:
    """The factor that makes the mean difference move rows by DEFAULT_MOVE_FRACTION of their median
    norm (strength 1)."""
    typical = float(np.median(np.linalg.norm(rows, axis=1)))
    return DEFAULT_MOVE_FRACTION * typical / max(float(np.linalg.norm(mean_diff(pos, neg))), 1e-12)

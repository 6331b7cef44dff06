"""Linear steering baselines, stored as flows so one runtime path serves every method."""

from __future__ import annotations

import numpy as np


def mean_diff(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """CAA: mean of the positive rows minus mean of the negative rows."""
    return (positive.astype(np.float64).mean(axis=0) - negative.astype(np.float64).mean(axis=0)).astype(np.float32)

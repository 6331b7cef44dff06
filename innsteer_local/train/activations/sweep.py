"""Which layer to steer, from captured activations: held-out separability and mean-diff's flip
rate per candidate layer (`train --layer auto`)."""

from __future__ import annotations

import numpy as np

from ..unit import mean_diff
from .collect import Activations
from .linear import LinearProbe


def candidate_layers(n_layer: int) -> list[int]:
    """Every third layer from the first tenth to the last tenth (llama.cpp cannot capture the last)."""
    lo, hi = max(1, n_layer // 10), min(n_layer - 2, n_layer - n_layer // 10)
    return list(range(lo, hi + 1, 3))


def held_out_mask(pair_ids: np.ndarray, frac: float = 0.2, seed: int = 0) -> np.ndarray:
    """Which rows belong to held-out pairs (a `frac` of the pairs, drawn with `seed`)."""
    n = int(pair_ids.max(initial=-1) + 1)
    rng = np.random.default_rng(seed)
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[: max(1, int(round(n * frac)))]] = True
    return held[pair_ids]


def layer_sweep(acts: Activations, seed: int = 0) -> list[dict[str, float]]:
    """Held-out separability and mean-diff flip rate per captured layer."""
    rows = []
    for l in acts.layers:
        pv, nv = held_out_mask(acts.pos_pair, seed=seed), held_out_mask(acts.neg_pair, seed=seed)
        pos, neg = acts.pos[l], acts.neg[l]
        probe = LinearProbe.fit(pos[~pv], neg[~nv])
        v = mean_diff(pos[~pv], neg[~nv])
        flip = float((probe.score(neg[nv] + v) > 0).mean())
        acc = probe.accuracy(pos[pv], neg[nv])
        rows.append({"layer": l, "probe_accuracy": acc, "mean_diff_flip": flip, "score": acc + flip,
                     "mean_diff_norm": float(np.linalg.norm(v))})
    return rows

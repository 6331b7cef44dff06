"""Untrained flows with non-trivial weights in every op kind, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from ..choices import ACTIVATIONS
from .core import Flow, ModelInfo
from .ops import Affine, Coupling, Linear, Op, Permute, Subspace
from .site import Site


def random_flow(model: ModelInfo, layers: list[int], rank: int = 64, blocks: int = 4, hidden: int = 128,
                seed: int = 0, delta_scale: float = 1.0, mean: np.ndarray | None = None,
                std: np.ndarray | None = None) -> Flow:
    """An untrained flow with non-trivial weights in every op kind (tests and benchmarks).
    mean/std: activation statistics for the input normalisation, as a trained flow has."""
    rng = np.random.default_rng(seed)
    n = model.n_embd
    mu = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64)
    sd = np.ones(n) if std is None else np.maximum(np.asarray(std, dtype=np.float64), 1e-3)
    sites = []
    for layer in layers:
        ops: list[Op] = [Affine(scale=(1.0 / sd).astype(np.float32), bias=(-mu / sd).astype(np.float32))]
        q, _ = np.linalg.qr(rng.normal(size=(n, rank)))
        ops.append(Subspace(basis=q.T.astype(np.float32)))
        d1, d2 = rank // 2, rank - rank // 2
        for b in range(blocks):
            ops.append(Coupling(
                weights=[rng.normal(0, 1 / np.sqrt(d1), (hidden, d1)).astype(np.float32),
                         rng.normal(0, 0.5 / np.sqrt(hidden), (2 * d2, hidden)).astype(np.float32)],
                biases=[rng.normal(0, 0.1, hidden).astype(np.float32), rng.normal(0, 0.1, 2 * d2).astype(np.float32)],
                clamp=2.0, activation=ACTIVATIONS[b % len(ACTIVATIONS)]))
            if b % 2 == 0:
                ops.append(Permute(perm=rng.permutation(rank).astype(np.int32)))
            else:
                m = np.linalg.qr(rng.normal(size=(rank, rank)))[0] * rng.uniform(0.8, 1.25, rank)
                ops.append(Linear(matrix=m.astype(np.float32), matrix_inv=np.linalg.inv(m).astype(np.float32),
                                  bias=rng.normal(0, 0.1, rank).astype(np.float32)))
        sites.append(Site(layer=layer, ops=ops, delta=(rng.normal(size=rank) * delta_scale).astype(np.float32)))
    return Flow(model=model, sites=sites, method="random", behavior="random", default_strength=1.0,
               name=f"random-{seed}")

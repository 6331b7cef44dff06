"""Training on captured activations: capture the data's rows at the layers asked for, pick one
(a sweep when there are several), and fit a linear baseline or the geometry objective there. The
flow comes back at the common unit (unit.py), ready for selection."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ...errors import InvalidArgument
from ...flow import Gate, Site
from .. import behaviors
from ..data import Dataset
from ...progress import Progress
from ..outcome import TrainOutcome
from ..unit import unit_scale
from .collect import collect_dataset
from .linear import LinearProbe, linear_flow
from .sweep import held_out_mask, layer_sweep

if TYPE_CHECKING:
    from ..pipeline import TrainConfig


def train_from_activations(llm: Any, ds: Dataset, layers: Sequence[int], cfg: TrainConfig, meta: dict[str, Any],
                           cache_dir: Optional[Path], progress: Progress) -> TrainOutcome:
    """A linear method's flow, or the INN flow of the geometry objective (cfg.method "innsteer")."""
    t0 = time.perf_counter()
    progress.phase("collecting activations", len(ds.pairs) * 2 + len(ds.neutral) + len(behaviors.background_exchanges()))
    acts = collect_dataset(llm, ds, layers, positions=cfg.positions,
                           cache_dir=None if cache_dir is None else cache_dir / "activations",
                           progress=lambda done, total: progress.update(done))
    if not len(acts.pos[layers[0]]) or not len(acts.neg[layers[0]]):
        raise InvalidArgument("the data gave no behaviour rows (empty replies?)")
    seconds = {"collect": time.perf_counter() - t0}
    sweep = layer_sweep(acts, cfg.seed) if len(layers) > 1 else []
    chosen = max(sweep, key=lambda r: r["score"])["layer"] if sweep else layers[0]
    pos, neg = acts.pos[chosen], acts.neg[chosen]
    unit = unit_scale(pos, neg, np.concatenate([pos, neg]))
    meta["provenance"].update(positions=cfg.positions, rows={"positive": int(len(pos)), "negative": int(len(neg)),
                                                               "background": int(len(acts.background[chosen])),
                                                               "neutral": int(len(acts.neutral[chosen]))})
    if sweep:
        meta["provenance"]["layer_sweep"] = sweep
    t1 = time.perf_counter()
    out = TrainOutcome(flow=None, layer=chosen, data=ds, activations=acts, sweep=sweep)  # type: ignore[arg-type]
    if cfg.method == "innsteer":  # the activation-geometry objective
        from .geometry import GeometryConfig, train_geometry

        gcfg = cfg.seeded(cfg.geometry or GeometryConfig())
        progress.phase("training phi (geometry objective)", gcfg.epochs)
        res = train_geometry(chosen, pos, neg, acts.background[chosen], acts.neutral[chosen], acts.pos_pair,
                             acts.neg_pair, acts.neg_target, llm.model_info, gcfg,
                             progress=lambda e, total, row: progress.update(e, row), unit=unit, **meta)
        out.flow, out.metrics, out.history, out.latent = res.flow, res.metrics, res.history, res.latent
    else:
        out.flow = linear_flow(cfg.method, chosen, pos, neg, acts.pos_pair, acts.neg_pair, llm.model_info,
                               unit=unit, **meta)
        out.metrics = {"layer": chosen, **_gate_and_check(out.flow.sites[0], pos, neg, acts.pos_pair, acts.neg_pair,
                                                          cfg.seed)}
        out.flow.provenance["held_out"] = dict(out.metrics)
    out.metrics.update(collect_tokens=acts.n_tokens, collect_tokens_per_second=acts.tokens_per_second,
                       activations_cached=acts.cached)
    out.seconds = {**seconds, "train": time.perf_counter() - t1}
    return out


def _gate_and_check(site: Site, pos: np.ndarray, neg: np.ndarray, pos_pair: np.ndarray, neg_pair: np.ndarray,
                    seed: int) -> dict[str, float]:
    """Fits a linear flow's gate on training pairs and measures it on held-out ones: the probe's
    accuracy, how many steered negatives it calls positive, how far they move."""
    pv, nv = held_out_mask(pos_pair, seed=seed), held_out_mask(neg_pair, seed=seed)
    probe = LinearProbe.fit(pos[~pv], neg[~nv])
    # a linear flow's latent is h itself: its gate lives in raw space
    site.gate = Gate.fit(pos[~pv], neg[~nv], np.concatenate([pos[pv], neg[nv]]), site.delta)
    steered = site.steer(neg[nv], 1.0)
    return {"raw_probe_accuracy": probe.accuracy(pos[pv], neg[nv]),
            "flip_rate": float((probe.score(steered) > 0).mean()),
            "mean_move": float(np.linalg.norm(steered - neg[nv], axis=1).mean())}

"""The `train` pipeline: data (built-in recipes are written by the model itself) -> a flow -> a
default strength chosen by what the steered model writes -> a report.

Methods, all on the same data and layer:
  innsteer   the invertible flow trained through the frozen model (train/through/; default), or
             on activation geometry alone with objective="geometry" (train/activations/geometry.py)
  vector     one vector trained with the same objective and data (the fair linear control)
  mean-diff, pca, affine-ot   linear baselines from captured activations (no torch)

Strength scale: strength 1 shifts rows by DEFAULT_MOVE_FRACTION of their median norm along the
mean difference (every method starts there); a trained flow's operating point is 1, and the
file's default strength is the setting that selection by generation chose (train/held_out.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..choices import TRAIN_METHODS
from ..errors import InnsteerError, InvalidArgument
from ..flow import Flow, Gate
from . import behaviors
from .activations.collect import Activations, collect_dataset
from .activations.linear import LinearProbe, linear_flow, mean_diff
from .data import Dataset, load_file

# strength 1 moves rows by this share of a typical activation norm: on smollm2-135m, mean-diff
# honesty at layer 15 was visible and still fluent there
DEFAULT_MOVE_FRACTION = 0.16
OBJECTIVES = ("model", "geometry")


class Progress:
    """What training reports; the CLI draws bars from it."""

    def phase(self, label: str, total: int) -> None: ...
    def update(self, done: int, info: Optional[dict[str, float]] = None) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class TrainConfig:
    method: str = "innsteer"
    objective: str = "model"
    seed: int = 0
    positions: str = "completion"
    device: str = "auto"
    select: bool = True  # choose checkpoint and default strength by generation
    select_tokens: int = 40  # as long as eval's replies (held_out.SELECT_TOKENS)
    select_prompts: int = 5  # held-out behaviour prompts per setting (an always-on behaviour: 3 candidates x 3 + 1 settings)
    select_neutral: int = 3  # a selective behaviour (data with neutral items): this many of each kind (2 candidates x 3 + 1 settings)
    through: Any = None  # ThroughConfig (torch) for the model objective
    geometry: Any = None  # GeometryConfig (torch) for the geometry objective


@dataclass
class TrainOutcome:
    flow: Flow
    layer: int
    data: Dataset
    activations: Optional[Activations] = None
    sweep: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    latent: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: list[tuple[int, Flow]] = field(default_factory=list)  # (training step, flow) to choose from
    held_out: tuple[list[str], list[str]] = ([], [])  # prompts for selection: behaviour, neutral


def load_data(behavior: Optional[str], pairs: Optional[str]) -> Dataset | behaviors.Recipe:
    if (behavior is None) == (pairs is None):
        raise InvalidArgument("give exactly one of --behavior NAME or --pairs FILE")
    return behaviors.recipe(behavior) if behavior else load_file(pairs)  # type: ignore[arg-type]


def candidate_layers(n_layer: int) -> list[int]:
    """Every third layer from the first tenth to the last tenth (llama.cpp cannot capture the last)."""
    lo, hi = max(1, n_layer // 10), min(n_layer - 2, n_layer - n_layer // 10)
    return list(range(lo, hi + 1, 3))


def unit_scale(pos: np.ndarray, neg: np.ndarray, rows: np.ndarray) -> float:
    """The factor that makes the mean difference move rows by DEFAULT_MOVE_FRACTION of their median
    norm (strength 1)."""
    typical = float(np.median(np.linalg.norm(rows, axis=1)))
    return DEFAULT_MOVE_FRACTION * typical / max(float(np.linalg.norm(mean_diff(pos, neg))), 1e-12)


def held_out_mask(pair_ids: np.ndarray, frac: float = 0.2, seed: int = 0) -> np.ndarray:
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


def _check_layer(llm: Any, layer: int | str) -> Sequence[int]:
    if layer == "auto":
        return candidate_layers(llm.model_info.n_layer)
    value = int(layer)
    if not 0 <= value < llm.model_info.n_layer - 1:
        raise InvalidArgument(f"layer {value} is outside 0..{llm.model_info.n_layer - 2} for this model "
                         f"({llm.model_info.n_layer} layers; the last one cannot be captured)")
    return [value]


def prepare(llm: Any, data: Dataset | behaviors.Recipe, cache_dir: Optional[Path], progress: Progress) -> Dataset:
    """A built-in recipe's data written by this model (cached), or the user's data as it is."""
    if isinstance(data, Dataset):
        return data
    n = 2 * len(data.prompts) + len(data.neutral_prompts)
    progress.phase("writing data with the model", n)
    ds = behaviors.build(llm, data, cache_dir, lambda done, total: progress.update(done))
    return ds


def train(llm: Any, data: Dataset | behaviors.Recipe, layer: int | str, cfg: Optional[TrainConfig] = None,
          cache_dir: Optional[Path] = None, progress: Optional[Progress] = None) -> TrainOutcome:
    cfg = cfg or TrainConfig()
    progress = progress or Progress()
    if cfg.method not in TRAIN_METHODS:
        raise InvalidArgument(f"unknown method {cfg.method!r}; choose one of {', '.join(TRAIN_METHODS)}")
    if cfg.objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    layers = _check_layer(llm, layer)
    recipe = data if isinstance(data, behaviors.Recipe) else None
    t0 = time.perf_counter()
    ds = prepare(llm, data, cache_dir, progress)
    seconds = {"data": time.perf_counter() - t0}
    through = cfg.method == "vector" or (cfg.method == "innsteer" and cfg.objective == "model")
    if through and len(layers) > 1:
        raise InvalidArgument("training through the model needs one --layer (auto sweeps layers for the "
                         "activation-based methods only)")
    meta = dict(behavior=ds.name, name=ds.name,
                provenance={"data": ds.name, "data_sha256": ds.digest(), "pairs": len(ds.pairs),
                            "neutral_items": len(ds.neutral), "seed": cfg.seed, "method": cfg.method})
    if through:
        out = _train_through(llm, ds, layers[0], cfg, recipe, meta, progress, cache_dir)
    else:
        out = _train_from_activations(llm, ds, layers, cfg, meta, cache_dir, progress)
    out.seconds = {**seconds, **out.seconds}
    if cfg.select:
        from .choose import choose  # noqa: PLC0415  (generation and scoring: only when selecting)

        t1 = time.perf_counter()
        choose(llm, out, recipe, cfg, progress)
        out.seconds["select"] = time.perf_counter() - t1
    out.flow.provenance["layer"] = out.layer
    out.flow.provenance["seconds"] = {k: round(v, 1) for k, v in out.seconds.items()}
    return out


def _train_from_activations(llm: Any, ds: Dataset, layers: Sequence[int], cfg: TrainConfig, meta: dict[str, Any],
                            cache_dir: Optional[Path], progress: Progress) -> TrainOutcome:
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
    scale = unit_scale(pos, neg, np.concatenate([pos, neg]))
    meta["provenance"].update(positions=cfg.positions, rows={"positive": int(len(pos)), "negative": int(len(neg)),
                                                               "background": int(len(acts.background[chosen])),
                                                               "neutral": int(len(acts.neutral[chosen]))})
    if sweep:
        meta["provenance"]["layer_sweep"] = sweep
    t1 = time.perf_counter()
    out = TrainOutcome(flow=None, layer=chosen, data=ds, activations=acts, sweep=sweep)  # type: ignore[arg-type]
    if cfg.method == "innsteer":  # the activation-geometry objective
        from .activations.geometry import GeometryConfig, train_geometry

        gcfg = cfg.geometry or GeometryConfig(seed=cfg.seed)
        progress.phase("training phi (geometry objective)", gcfg.epochs)
        res = train_geometry(chosen, pos, neg, acts.background[chosen], acts.neutral[chosen], acts.pos_pair,
                             acts.neg_pair, acts.neg_target, llm.model_info, gcfg,
                             progress=lambda e, total, row: progress.update(e, row), **meta)
        out.flow, out.metrics, out.history, out.latent = res.flow, res.metrics, res.history, res.latent
        out.flow.provenance["objective"] = "geometry"
        # its delta moves negatives by |v| at strength 1: rescale to the common unit
        for site in out.flow.sites:
            site.delta = (site.delta * scale).astype(np.float32)
    else:
        out.flow = linear_flow(cfg.method, chosen, pos, neg, acts.pos_pair, acts.neg_pair, llm.model_info, **meta)
        site = out.flow.sites[0]
        site.delta = (site.delta * scale).astype(np.float32)
        if site.edit_scale is not None:
            site.edit_scale = (site.edit_scale * scale).astype(np.float32)
        pv, nv = held_out_mask(acts.pos_pair, seed=cfg.seed), held_out_mask(acts.neg_pair, seed=cfg.seed)
        probe = LinearProbe.fit(pos[~pv], neg[~nv])
        # a linear flow's latent is h itself: its gate lives in raw space
        site.gate = Gate.fit(pos[~pv], neg[~nv], np.concatenate([pos[pv], neg[nv]]), site.delta)
        steered = site.steer(neg[nv], 1.0)
        out.metrics = {"layer": chosen, "raw_probe_accuracy": probe.accuracy(pos[pv], neg[nv]),
                       "flip_rate": float((probe.score(steered) > 0).mean()),
                       "mean_move": float(np.linalg.norm(steered - neg[nv], axis=1).mean())}
        out.flow.provenance["held_out"] = dict(out.metrics)
    out.flow.default_strength = 1.0
    out.metrics.update(collect_tokens=acts.n_tokens, collect_tokens_per_second=acts.tokens_per_second,
                       activations_cached=acts.cached)
    out.seconds = {**seconds, "train": time.perf_counter() - t1}
    return out


def _train_through(llm: Any, ds: Dataset, layer: int, cfg: TrainConfig, recipe: Optional[behaviors.Recipe],
                   meta: dict[str, Any], progress: Progress, cache_dir: Optional[Path] = None) -> TrainOutcome:
    from dataclasses import asdict

    from ..runtime import registry
    from ..runtime.prompts import reply_example
    from .inn import InnFlow, VectorFlow
    from .through.hf_model import HFModel
    from .through.trainer import EncodingCache, ThroughConfig, ThroughTrainer, encode, reply_rows

    tcfg = cfg.through or ThroughConfig(seed=cfg.seed)
    t0 = time.perf_counter()
    if recipe is not None:
        tcfg.weights.preservation = recipe.preservation
    chat = bool(llm.metadata.get("tokenizer.chat_template"))
    progress.message("loading the model in transformers (dequantized to float32)")
    hf = HFModel(llm.model_path, layer, device=cfg.device, architecture=llm.model_info.architecture,
                 threads=int(llm.context_params.n_threads) or None,
                 # the dequantized copy is the model's, not this data's: one per GGUF in the user cache
                 cache_dir=None if cache_dir is None else registry.cache_dir() / "torch", precision=tcfg.precision)
    if hf.n_embd != llm.model_info.n_embd:
        raise InnsteerError(f"transformers reads n_embd {hf.n_embd} from {llm.model_path}, llama.cpp "
                            f"{llm.model_info.n_embd}: not the same model")
    pair_ex = [(reply_example(llm, p.positive_prompt or "", p.positive, chat),
                reply_example(llm, p.negative_prompt or "", p.negative, chat)) for p in ds.pairs]
    if any(p.positive_prompt is None for p in ds.pairs):
        raise InnsteerError("training through the model needs pairs with a prompt ({prompt, positive, negative} "
                            "lines); plain-text pairs work with --objective geometry or the linear methods")
    neutral_ex = [reply_example(llm, n.prompt, n.reply, chat) for n in ds.neutral]
    n_texts = 2 * len(pair_ex) + len(neutral_ex)
    progress.phase("encoding texts below the layer", n_texts)
    enc = encode(hf, [x for pr in pair_ex for x in pr] + neutral_ex, tcfg.max_reply_tokens,
                 progress=lambda done, total: progress.update(done),
                 cache=None if cache_dir is None else EncodingCache.for_model(
                     cache_dir / "encoded", llm.model_path, layer, tcfg.max_reply_tokens, hf.precision))
    pairs = list(zip(enc[0: 2 * len(pair_ex): 2], enc[1: 2 * len(pair_ex): 2]))
    neutral = enc[2 * len(pair_ex):]
    seconds = {"load_and_encode": time.perf_counter() - t0}
    pos_rows, neg_rows = reply_rows([p for p, _ in pairs]), reply_rows([n for _, n in pairs])
    all_rows = np.concatenate([pos_rows, neg_rows] + ([reply_rows(neutral)] if neutral else []))
    v = mean_diff(pos_rows, neg_rows).astype(np.float64) * unit_scale(pos_rows, neg_rows, all_rows)
    mu, sd = all_rows.mean(0), np.maximum(all_rows.std(0), 1e-3)
    flow_t = VectorFlow(sd, v) if cfg.method == "vector" else InnFlow(mu, sd, v, tcfg.inn)
    trainer = ThroughTrainer(hf, flow_t, pairs, neutral, tcfg)
    t1 = time.perf_counter()
    progress.phase(f"training {'the vector' if cfg.method == 'vector' else 'phi'} through the model", trainer.total_steps)
    history, checkpoints = trainer.fit(lambda step, total, row: progress.update(step, row))
    seconds["train"] = time.perf_counter() - t1

    def to_flow(state: dict[str, Any]) -> Flow:
        flow_t.load_state_dict(state)
        site = flow_t.site(layer)
        if cfg.method == "innsteer":
            site.gate = _gate(flow_t, site, pos_rows, neg_rows, cfg.seed)
        return Flow(model=llm.model_info, sites=[site], method=cfg.method, default_strength=1.0,
                    provenance=dict(meta["provenance"], objective="model", layer=layer,
                                    hyperparameters=_plain(asdict(tcfg))),
                    **{k: v for k, v in meta.items() if k != "provenance"})

    candidates = [(step, to_flow(state)) for step, state in checkpoints]
    out = TrainOutcome(flow=candidates[-1][1], layer=layer, data=ds, history=history, seconds=seconds)
    out.metrics = {"layer": layer, "start": history[0], "end": history[-1], "checkpoints": [s for s, _ in candidates],
                   "linear_steps": trainer.linear_steps}
    out.candidates = candidates
    out.held_out = _val_prompts(ds, trainer)
    return out


def _gate(flow_t: Any, site: Any, pos_rows: np.ndarray, neg_rows: np.ndarray, seed: int) -> Gate:
    """The runtime gates' parameters in the trained latent (positive and negative reply rows)."""
    from .inn import torch

    with torch.no_grad():
        zp = flow_t.latent(torch.tensor(pos_rows)).double().numpy()
        zn = flow_t.latent(torch.tensor(neg_rows)).double().numpy()
    rng = np.random.default_rng(seed)
    hp, hn = rng.random(len(zp)) < 0.2, rng.random(len(zn)) < 0.2
    return Gate.fit(zp[~hp], zn[~hn], np.concatenate([zp[hp], zn[hn]]), site.delta)


def _val_prompts(ds: Dataset, trainer: Any) -> tuple[list[str], list[str]]:
    """The held-out behaviour and neutral prompts (the texts the trainer never trained on)."""
    val_tokens = {tuple(p.tokens) for p, _ in trainer.val_pairs}
    val_neutral = {tuple(n.tokens) for n in trainer.val_neutral}
    pairs = [p.positive_prompt for p, (e, _) in zip(ds.pairs, trainer.all_pairs) if tuple(e.tokens) in val_tokens]
    neutral = [n.prompt for n, e in zip(ds.neutral, trainer.all_neutral) if tuple(e.tokens) in val_neutral]
    return [p for p in pairs if p], neutral


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x

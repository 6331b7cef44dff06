"""The `train` pipeline: data (built-in recipes are written by the model itself) -> a flow -> a
default strength chosen by what the steered model writes -> a report.

Methods, all on the same data and layer:
  innsteer   the invertible flow trained through the frozen model (train/through/; default), or
             on activation geometry alone with objective="geometry" (train/activations/geometry.py)
  vector     one vector trained with the same objective and data (the fair linear control)
  mean-diff, pca, affine-ot   linear baselines from captured activations (no torch)

Strength scale: each trainer returns its flow at the common unit (train/unit.py: strength 1 shifts
rows by DEFAULT_MOVE_FRACTION of their median norm along the mean difference; every method starts
there); selection by generation then calibrates strength 1 the same way for every method
(train/choose.py), and that is the file's default strength.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..choices import OBJECTIVES, TRAIN_METHODS
from ..errors import InvalidArgument, ModelError
from ..progress import Progress
from ..runtime import registry
from . import behaviors
from .activations.fit import train_from_activations
from .activations.sweep import candidate_layers
from .data import Dataset, load_file
from .outcome import TrainOutcome



@dataclass
class TrainConfig:
    method: str = "innsteer"
    objective: str = "model"
    seed: int = 0  # the run's one seed: seeded() gives it to the sub-configs and their flow's shape
    positions: str = "completion"
    device: str = "auto"
    select: bool = True  # choose checkpoint and default strength by generation
    select_tokens: int = 40  # as long as eval's replies (held_out.SELECT_TOKENS)
    # held-out prompts per setting, enough that a perplexity ratio on 40-token replies holds within
    # about 10 % (on 5: 0.93-1.34x for a setting that measured 0.89x on 16): an always-on behaviour
    # (2 candidates x 2 rungs + the unsteered model, then one more rung each) ...
    select_prompts: int = 6
    # ... or this many of each kind for a selective one (data with neutral items: 1 candidate)
    select_neutral: int = 4
    # who reads selection's replies for fluency: "auto" eval's judge for this model (registry.judge_for;
    # the model itself, with a note, where that one cannot be had), a registry key or GGUF path, or
    # "none" for the model itself
    judge: str = "auto"
    through: Any = None  # ThroughConfig (torch) for the model objective
    geometry: Any = None  # GeometryConfig (torch) for the geometry objective

    def seeded(self, sub: Any) -> Any:
        """A copy of sub (a ThroughConfig or GeometryConfig) carrying this run's seed, its flow's
        shape (InnConfig) included, so one seed is set once."""
        return replace(sub, seed=self.seed, inn=replace(sub.inn, seed=self.seed))


def load_data(behavior: Optional[str], pairs: Optional[str]) -> Dataset | behaviors.Recipe:
    if (behavior is None) == (pairs is None):
        raise InvalidArgument("give exactly one of --behavior NAME or --pairs FILE")
    return behaviors.recipe(behavior) if behavior else load_file(pairs)  # type: ignore[arg-type]


def _check_layer(llm: Any, layer: int | str) -> Sequence[int]:
    if layer == "auto":
        return candidate_layers(llm.model_info.n_layer)
    value = int(layer)
    if not 0 <= value < llm.model_info.n_layer - 1:
        raise InvalidArgument(f"layer {value} is outside 0..{llm.model_info.n_layer - 2} for this model "
                         f"({llm.model_info.n_layer} layers; the last one cannot be captured)")
    return [value]


def _judge_path(llm: Any, spec: str, progress: Progress) -> str:
    """The GGUF path of selection's fluency judge, or "none" (the model reads itself)."""
    model = Path(llm.model_path)
    try:
        path = registry.resolve_judge(None if spec == "auto" else spec, model, registry.identify(model), progress)
    except ModelError as e:
        if spec != "auto":
            raise ModelError(f"fluency judge {spec!r}: {e}") from None
        progress.message(f"note: no fluency judge ({e}); the model reads its own replies in selection "
                         "(--judge chooses one)")
        return "none"
    return str(path) if path else "none"


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
    if cfg.select:  # before training: a judge that cannot be had fails now, not after a minute
        cfg = replace(cfg, judge=_judge_path(llm, cfg.judge, progress))
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
        from .through.fit import train_through  # noqa: PLC0415  (torch and transformers: only when training through)

        out = train_through(llm, ds, layers[0], cfg, recipe, meta, progress, cache_dir)
    else:
        out = train_from_activations(llm, ds, layers, cfg, meta, cache_dir, progress)
    out.seconds = {**seconds, **out.seconds}
    if cfg.select:
        from .choose import choose  # noqa: PLC0415  (generation and scoring: only when selecting)

        t1 = time.perf_counter()
        choose(llm, out, recipe, cfg, progress, cache_dir)  # the one calibration: Flow.rescale of the chosen candidate
        out.seconds["select"] = time.perf_counter() - t1
    out.flow.provenance["layer"] = out.layer
    out.flow.provenance["seconds"] = {k: round(v, 1) for k, v in out.seconds.items()}
    return out

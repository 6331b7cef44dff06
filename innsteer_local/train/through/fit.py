"""Training through the model, end to end: the data as the model's own chat texts, encoded once
below the layer by the torch copy of the GGUF, a flow (or a vector) started at mean-diff's shift at
the common unit (unit.py) and trained there, and its checkpoints as flows ready for selection."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ...errors import InnsteerError
from ...flow import Flow, Gate, Site
from ...runtime import registry
from ...runtime.prompts import has_chat_template, reply_example
from .. import behaviors
from ..data import Dataset
from ..inn import InnFlow, VectorFlow
from ..torch_ops import torch
from ...progress import Progress
from ..outcome import Candidate, TrainOutcome
from ..unit import mean_diff, unit_scale
from .hf_model import HFModel
from .trainer import EncodingCache, ThroughConfig, ThroughTrainer, encode, reply_rows

if TYPE_CHECKING:
    from ..pipeline import TrainConfig


def train_through(llm: Any, ds: Dataset, layer: int, cfg: TrainConfig, recipe: Optional[behaviors.Recipe],
                  meta: dict[str, Any], progress: Progress, cache_dir: Optional[Path] = None) -> TrainOutcome:
    """A flow (cfg.method "innsteer") or a vector ("vector") trained through the frozen model; its
    checkpoints are the candidates selection chooses from."""
    tcfg = cfg.seeded(cfg.through or ThroughConfig())
    t0 = time.perf_counter()
    if recipe is not None:  # a copy: the caller's config stays as given
        tcfg.weights = replace(tcfg.weights, preservation=recipe.preservation)
    chat = has_chat_template(llm)
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
    # the start is mean-diff's shift at the common unit, so the trained flow is already at it
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

    lin = trainer.linear_steps
    # the identity start (mean-diff's shift) is no candidate: it scored below the trained shift on every check
    candidates = [Candidate(to_flow(state), "linear" if step == lin else "full" if lin else "", step)
                  for step, state in checkpoints if step != 0]
    out = TrainOutcome(flow=candidates[-1].flow, layer=layer, data=ds, history=history, seconds=seconds)
    out.metrics = {"layer": layer, "start": history[0], "end": history[-1],
                   "checkpoints": [c.step for c in candidates], "linear_steps": lin}
    out.candidates = candidates
    out.held_out = _val_prompts(ds, trainer)
    return out


def _gate(flow_t: Any, site: Site, pos_rows: np.ndarray, neg_rows: np.ndarray, seed: int) -> Gate:
    """The runtime gates' parameters in the trained latent (positive and negative reply rows)."""
    with torch.no_grad():
        zp = flow_t.latent(torch.tensor(pos_rows)).double().numpy()
        zn = flow_t.latent(torch.tensor(neg_rows)).double().numpy()
    rng = np.random.default_rng(seed)
    hp, hn = rng.random(len(zp)) < 0.2, rng.random(len(zn)) < 0.2
    return Gate.fit(zp[~hp], zn[~hn], np.concatenate([zp[hp], zn[hn]]), site.delta)


def _val_prompts(ds: Dataset, trainer: ThroughTrainer) -> tuple[list[str], list[str]]:
    """The held-out behaviour and neutral prompts (the texts the trainer never trained on)."""
    val_tokens = {tuple(p.tokens) for p, _ in trainer.val_pairs}
    val_neutral = {tuple(n.tokens) for n in trainer.val_neutral}
    pairs = [p.positive_prompt for p, (e, _) in zip(ds.pairs, trainer.all_pairs) if tuple(e.tokens) in val_tokens]
    neutral = [n.prompt for n, e in zip(ds.neutral, trainer.all_neutral) if tuple(e.tokens) in val_neutral]
    return [p for p in pairs if p], neutral


def _plain(x: Any) -> Any:
    """Dataclass fields as JSON lists and dicts (tuples become lists) for the provenance."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x

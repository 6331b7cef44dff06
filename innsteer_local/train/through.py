"""Training a flow through the frozen model (the default objective of `train`): the steered model's
next-token distributions on contrastive replies and on neutral contexts (train/objective.py), with
gradients through the layers above L only. Block L's output for every text is computed once
without gradients (hf_model.HFModel.below) and cached; strengths are sampled from a range, so
strength is a monotone knob whose trained operating point is 1."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..runtime.prompts import Example
from . import objective
from .hf_model import HFModel
from .inn import InnConfig, torch


# Adam learning rates of the shift, per method, so the vector control is tuned, not handicapped: on
# the refusal recipe (40 steps) the vector's held-out objective reached 1.09 at 3e-3 and 0.96 at 1e-2
SHIFT_LR = {"innsteer": 3e-3, "vector": 1e-2}


@dataclass
class ThroughConfig:
    steps: int = 40
    pairs_per_step: int = 4
    neutral_per_step: int = 4
    lr: Optional[float] = None  # the shift: None = the method's default (SHIFT_LR)
    coupling_lr: float = 1e-3  # the couplings' weights
    strengths: tuple[float, float] = (0.5, 1.5)
    negative_share: float = 0.25  # steps of a pair at -a, which must prefer the negative reply
    max_reply_tokens: int = 24
    val_fraction: float = 0.15
    checkpoints: int = 2  # states kept for selection by generation (evenly spaced, the last included)
    weights: objective.Weights = field(default_factory=objective.Weights)
    inn: InnConfig = field(default_factory=InnConfig)
    seed: int = 0


@dataclass
class Encoded:
    """One text with what training needs of it, computed once."""

    tokens: list[int]
    start: int  # first reply token
    hidden: Any  # (T, n_embd) block L's output, no gradient
    base_logp: Any  # (n_reply,) log p_0 of each reply token
    base_final: Any  # (n_reply, n_embd) the unsteered final hidden state where reply tokens are predicted


def encode(hf: HFModel, examples: Sequence[Example], max_reply: int, batch: int = 8,
           progress: Optional[Callable[[int, int], None]] = None) -> list[Encoded]:
    out: list[Encoded] = []
    for i in range(0, len(examples), batch):
        chunk = [(ex.tokens[: ex.start + max_reply], ex.start) for ex in examples[i:i + batch]]
        b = hf.batch(chunk)
        with torch.no_grad():
            h = hf.below(b)
            final = hf.above(h, b)[b.score_mask]
            logp = torch.log_softmax(hf.logits(final), -1)
            target = b.input_ids[:, 1:][b.score_mask[:, :-1]]
            tok = logp.gather(1, target[:, None])[:, 0]
        k = 0
        for j, (tokens, start) in enumerate(chunk):
            n = int(b.score_mask[j].sum())
            out.append(Encoded(tokens, start, h[j, : len(tokens)].clone(), tok[k:k + n].clone(), final[k:k + n].clone()))
            k += n
        if progress:
            progress(len(out), len(examples))
    return out


def reply_rows(items: Sequence[Encoded]) -> np.ndarray:
    """Block L's output at the reply positions (the rows mean-diff averages)."""
    return torch.cat([it.hidden[max(it.start, 1):] for it in items]).numpy()


class ThroughTrainer:
    """Optimises a flow (InnFlow or VectorFlow) on encoded pairs and neutral texts."""

    def __init__(self, hf: HFModel, flow: Any, pairs: Sequence[tuple[Encoded, Encoded]], neutral: Sequence[Encoded],
                 cfg: ThroughConfig):
        self.hf, self.flow, self.cfg = hf, flow, cfg
        self.all_pairs, self.all_neutral = list(pairs), list(neutral)
        rng = random.Random(cfg.seed)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        n_val = int(round(len(pairs) * cfg.val_fraction)) if len(pairs) >= 8 else 0
        self.val_pairs = [pairs[i] for i in order[:n_val]]
        self.train_pairs = [pairs[i] for i in order[n_val:]]
        norder = list(range(len(neutral)))
        rng.shuffle(norder)
        n_nval = int(round(len(neutral) * cfg.val_fraction)) if len(neutral) >= 8 else 0
        self.val_neutral = [neutral[i] for i in norder[:n_nval]]
        self.train_neutral = [neutral[i] for i in norder[n_nval:]]
        lr = cfg.lr if cfg.lr is not None else SHIFT_LR["innsteer" if flow.coupling_parameters() else "vector"]
        groups = [{"params": [flow.delta], "lr": lr}]
        if flow.coupling_parameters():
            groups.append({"params": flow.coupling_parameters(), "lr": cfg.coupling_lr})
        self.opt = torch.optim.Adam(groups)
        self.rng = rng
        self.gen = torch.Generator().manual_seed(cfg.seed)

    # -- one batch --
    def _run(self, items: Sequence[Encoded], a: Any) -> tuple[Any, Any, list[int]]:
        """log p_a of every reply token (concatenated), the full log-distributions, reply lengths."""
        hf = self.hf
        b = hf.batch([(it.tokens, it.start) for it in items])
        h = torch.zeros(len(items), b.input_ids.shape[1], hf.n_embd, dtype=items[0].hidden.dtype)
        for j, it in enumerate(items):
            h[j, : len(it.tokens)] = it.hidden
        steered = self.flow.steer(h, a.view(-1, 1, 1))
        # rows past a text's end are padding: keep them unsteered (they are masked anyway)
        final = hf.above(steered, b)[b.score_mask]
        logp = torch.log_softmax(hf.logits(final), -1)
        target = b.input_ids[:, 1:][b.score_mask[:, :-1]]
        counts = b.score_mask.sum(1).tolist()
        return logp.gather(1, target[:, None])[:, 0], logp, counts

    def losses(self, pairs: Sequence[tuple[Encoded, Encoded]], neutral: Sequence[Encoded], a: Any,
               sign: Any, a_neutral: Any) -> dict[str, Any]:
        items = [p for p, _ in pairs] + [n for _, n in pairs] + list(neutral)
        tok, logp, counts = self._run(items, torch.cat([a * sign, a * sign, a_neutral]))
        k = len(pairs)
        n_pair_tokens = sum(counts[: 2 * k])
        base = torch.cat([it.base_logp for it in items[: 2 * k]]) if k else torch.zeros(0)
        parts: dict[str, Any] = {}
        if k:
            r = objective.segment_sums(tok[:n_pair_tokens] - base, counts[: 2 * k])
            nll = objective.segment_sums(-tok[:n_pair_tokens], counts[: 2 * k]) / torch.tensor(counts[: 2 * k]).clamp(min=1)
            parts["preference"] = objective.preference(r[:k], r[k:], sign, self.cfg.weights.beta)
            parts["likelihood"] = objective.likelihood(nll[:k], nll[k:], sign)
            parts["accuracy"] = (sign * (r[:k] - r[k:]) > 0).float().mean()
        if neutral:
            with torch.no_grad():
                base_logp = torch.log_softmax(self.hf.logits(torch.cat([n.base_final for n in neutral])), -1)
            parts["preservation"] = objective.preservation(logp[n_pair_tokens:], base_logp)
        parts["loss"] = objective.total(parts, self.cfg.weights)
        return parts

    def _strengths(self, n: int) -> Any:
        lo, hi = self.cfg.strengths
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        pairs = self.rng.sample(self.train_pairs, min(cfg.pairs_per_step, len(self.train_pairs)))
        neutral = self.rng.sample(self.train_neutral, min(cfg.neutral_per_step, len(self.train_neutral)))
        sign = torch.tensor([-1.0 if self.rng.random() < cfg.negative_share else 1.0 for _ in pairs])
        a_neutral = self._strengths(len(neutral)) * torch.tensor(
            [-1.0 if self.rng.random() < cfg.negative_share else 1.0 for _ in neutral])
        parts = self.losses(pairs, neutral, self._strengths(len(pairs)), sign, a_neutral)
        self.opt.zero_grad()
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(list(self.flow.parameters()), 5.0)
        self.opt.step()
        return {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in parts.items()}

    def held_out(self) -> dict[str, float]:
        """The objective on held-out pairs and neutral texts at the operating point, strength 1."""
        if not self.val_pairs and not self.val_neutral:
            return {}
        out: dict[str, list[float]] = {}
        with torch.no_grad():
            for s in (1.0,):
                for i in range(0, max(len(self.val_pairs), len(self.val_neutral)), 4):
                    pairs, neutral = self.val_pairs[i:i + 4], self.val_neutral[i:i + 4]
                    if not pairs and not neutral:
                        continue
                    parts = self.losses(pairs, neutral, torch.ones(len(pairs)), torch.full((len(pairs),), s),
                                        torch.full((len(neutral),), s))
                    for k, v in parts.items():
                        out.setdefault(k, []).append(float(v))
        return {f"val_{k}": float(np.mean(v)) for k, v in out.items()}

    def fit(self, progress: Optional[Callable[[int, int, dict], None]] = None) -> tuple[list[dict], list[tuple[int, dict]]]:
        """Runs cfg.steps steps; returns the history and the kept checkpoints (step, state)."""
        cfg = self.cfg
        keep = {round(cfg.steps * (k + 1) / cfg.checkpoints) for k in range(max(cfg.checkpoints, 1))}
        history: list[dict] = []
        checkpoints: list[tuple[int, dict]] = []
        start = {"step": 0, **self.held_out()}
        history.append(start)
        t0 = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            row = {"step": step, **self.step(), "seconds": time.perf_counter() - t0}
            if step in keep:
                row.update(self.held_out())
                checkpoints.append((step, {k: v.detach().clone() for k, v in self.flow.state_dict().items()}))
            history.append(row)
            if progress:
                progress(step, cfg.steps, row)
        return history, checkpoints

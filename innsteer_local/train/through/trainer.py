"""Training a flow through the frozen model (the default objective of `train`): the steered model's
next-token distributions on contrastive replies and on neutral contexts (train/through/objective.py), with
gradients through the layers above L only. Block L's output for every text is computed once
without gradients (hf_model.HFModel.below) and cached; strengths are sampled from a range, so
strength is a monotone knob whose trained operating point is 1."""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ...runtime.prompts import Example
from ..inn import InnConfig
from ..torch_ops import torch
from . import objective
from .hf_model import LIVE_PROMPT, HFModel


# Adam learning rates of the shift: "vector" for --method vector and a flow's linear phase (the same
# training), "innsteer" for the shift while a flow's couplings move. On the sea pairs file the
# vector's held-out objective after 20 steps was 2.52 at 1e-2 and 2.39 at 3e-2 (2.46 after 40 at 1e-2).
SHIFT_LR = {"innsteer": 3e-3, "vector": 2e-2}
COUPLING_STEPS = 10


@dataclass
class ThroughConfig:
    steps: int = 20  # of the shift alone (all of --method vector; a flow's first phase)
    # a flow's second phase, in which its couplings move too; None: COUPLING_STEPS where the data has
    # neutral items (a selective behaviour: telling where to act is the couplings' job), none for an
    # always-on one, whose flow is then its linear phase (docs/training.md, "Two phases")
    coupling_steps: Optional[int] = None
    pairs_per_step: int = 4
    neutral_per_step: int = 2
    lr: Optional[float] = None  # the shift: None = the method's default (SHIFT_LR)
    coupling_lr: float = 1e-3  # the couplings' weights
    strengths: tuple[float, float] = (0.5, 1.5)
    negative_share: float = 0.25  # steps of a pair at -a, which must prefer the negative reply
    # a whole reply of a few sentences: what tells a user's positive sentence from its negative is often
    # near its end (space pairs: the topic word after token 24 in 34 of 58), and a window cut before it
    # trained the shift on the paraphrase alone (16 held-out prompts, topic at matched fluency: linear
    # phase 0.12 with 24 tokens, 1.00 with 48; docs/RESULTS.md)
    max_reply_tokens: int = 64
    val_fraction: float = 0.2
    checkpoints: int = 1  # states kept for selection after the first phase (evenly spaced, the last included)
    precision: str = "auto"  # of the layers above L (hf_model.PRECISIONS)
    live_prompt: Optional[int] = LIVE_PROMPT  # while the shift alone learns: the prompt rows before the reply
    # whose steering gets gradients (HFModel.above; None: every row)
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
           progress: Optional[Callable[[int, int], None]] = None,
           cache: Optional["EncodingCache"] = None) -> list[Encoded]:
    """What training needs of each text (Encoded), computed once; with a cache, texts encoded by an
    earlier run on the same model and layer are read back instead (a user editing a few pairs
    re-encodes only those)."""
    chunks = [(ex.tokens[: ex.start + max_reply], ex.start) for ex in examples]
    out: list[Optional[Encoded]] = [cache.get(t, s) if cache else None for t, s in chunks]
    todo = [i for i, e in enumerate(out) if e is None]
    done = len(out) - len(todo)
    if progress:
        progress(done, len(out))
    for i in range(0, len(todo), batch):
        idx = todo[i:i + batch]
        chunk = [chunks[j] for j in idx]
        b = hf.batch(chunk)
        with torch.no_grad():
            h = hf.below(b)
            lay = hf.layout(chunk)
            final = hf.above(*hf.place([h[row, : len(t)] for row, (t, _) in enumerate(chunk)], lay), lay)[lay.score]
            logp = torch.log_softmax(hf.logits(final), -1)
            tok = logp.gather(1, lay.targets[lay.score][:, None])[:, 0]
        k = 0
        for row, (j, (tokens, start)) in enumerate(zip(idx, chunk)):
            n = int(lay.score[row].sum())
            out[j] = Encoded(tokens, start, h[row, : len(tokens)].clone(), tok[k:k + n].clone(), final[k:k + n].clone())
            k += n
            if cache:
                cache.put(out[j])
        done += len(idx)
        if progress:
            progress(done, len(out))
    return [e for e in out if e is not None]


class EncodingCache:
    """Encoded texts on disk, one safetensors file per text, in a folder per model file (sha256),
    layer and reply length: what `train` reads back instead of running the layers below L again."""

    VERSION = 3  # 2: the output layer in the training precision too; 3: the prefix/live split of above()

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def for_model(cls, root: Path, model_path: str, layer: int, max_reply: int, precision: str) -> "EncodingCache":
        from ...runtime.registry import file_sha256

        key = f"{file_sha256(Path(model_path))[:32]}-L{layer}-r{max_reply}-{precision}-v{cls.VERSION}"
        return cls(Path(root) / key)

    @staticmethod
    def _name(tokens: Sequence[int], start: int) -> str:
        blob = np.asarray([start, *tokens], dtype=np.int64).tobytes()
        return hashlib.sha256(blob).hexdigest()[:40] + ".safetensors"

    def get(self, tokens: Sequence[int], start: int) -> Optional[Encoded]:
        from safetensors.torch import load_file

        path = self.folder / self._name(tokens, start)
        if not path.exists():
            return None
        try:
            t = load_file(str(path))
        except Exception:  # a damaged file: encode again
            return None
        if t["tokens"].tolist() != list(tokens) or int(t["start"]) != start:
            return None
        return Encoded(list(tokens), start, t["hidden"], t["base_logp"], t["base_final"])

    def put(self, e: Encoded) -> None:
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / self._name(e.tokens, e.start)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"tokens": torch.tensor(e.tokens, dtype=torch.int64), "start": torch.tensor(e.start),
                       "hidden": e.hidden.contiguous(), "base_logp": e.base_logp.contiguous(),
                       "base_final": e.base_final.contiguous()}, str(tmp))
            os.replace(tmp, path)
        except OSError:  # a full or read-only cache only costs encoding again
            pass


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
        nonlinear = bool(flow.coupling_parameters())
        lr = cfg.lr if cfg.lr is not None else SHIFT_LR["innsteer" if nonlinear else "vector"]
        # a flow first trains its shift alone, as the vector does (same rate, same steps): its
        # couplings start at the identity, so until they move the flow *is* that vector; the
        # checkpoint where they start moving is kept for selection, so that a flow whose
        # nonlinear part does not help on held-out prompts falls back to its linear start
        self.linear_steps = cfg.steps if nonlinear else 0
        coupling_steps = cfg.coupling_steps if cfg.coupling_steps is not None else COUPLING_STEPS if neutral else 0
        self.total_steps = cfg.steps + (coupling_steps if nonlinear else 0)
        self.linear_opt = torch.optim.Adam([flow.delta], lr=cfg.lr if cfg.lr is not None else SHIFT_LR["vector"])
        groups = [{"params": [flow.delta], "lr": lr}]
        if nonlinear:
            groups.append({"params": flow.coupling_parameters(), "lr": cfg.coupling_lr})
        self.opt = torch.optim.Adam(groups)
        self.rng = rng
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.coupling_phase = False

    # -- one batch --
    def _run(self, items: Sequence[Encoded], a: Any, n_full: int = 0) -> tuple[Any, Any, list[int]]:
        """log p_a of every reply token (concatenated), the full log-distributions of the reply
        tokens of the last n_full items, and every item's reply length. Every row is steered, as
        llama.cpp steers them."""
        hf = self.hf
        # while the couplings learn, every row's steering gets gradients: couplings moved by the
        # reply rows alone edit the early prompt rows unchecked (on held-out pairs the KL on neutral
        # replies went from 0.18 to 4.1 in 16 such steps); a shift is the same at every row, and
        # without gradients the split changes nothing
        whole = torch.is_grad_enabled() and self.coupling_phase
        lay = hf.layout([(it.tokens, it.start) for it in items], None if whole else self.cfg.live_prompt)
        prefix, live = hf.place([it.hidden for it in items], lay)
        a = a.view(-1, 1, 1)
        with torch.no_grad():
            prefix = self.flow.steer(prefix, a)
        logits = hf.logits(hf.above(prefix, self.flow.steer(live, a), lay)[lay.score])
        target = lay.targets[lay.score]
        counts = lay.score.sum(1).tolist()
        first_full = sum(counts[: len(items) - n_full])
        # a token's log-probability by cross-entropy: its backward never builds a vocabulary-wide
        # one-hot; the full distributions only where the objective needs them (KL on neutral rows)
        tok = -torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return tok, torch.log_softmax(logits[first_full:], -1), counts

    def losses(self, pairs: Sequence[tuple[Encoded, Encoded]], neutral: Sequence[Encoded], a: Any,
               sign: Any, a_neutral: Any) -> dict[str, Any]:
        items = [p for p, _ in pairs] + [n for _, n in pairs] + list(neutral)
        tok, logp_neutral, counts = self._run(items, torch.cat([a * sign, a * sign, a_neutral]), len(neutral))
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
            parts["preservation"] = objective.preservation(logp_neutral, base_logp)
        parts["loss"] = objective.total(parts, self.cfg.weights)
        return parts

    def _strengths(self, n: int) -> Any:
        lo, hi = self.cfg.strengths
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def step(self, linear: bool = False) -> dict[str, float]:
        """One optimiser step: of the shift alone (linear), or of the shift and the couplings."""
        cfg = self.cfg
        opt = self.linear_opt if linear else self.opt
        self.coupling_phase = not linear and bool(self.flow.coupling_parameters())
        pairs = self.rng.sample(self.train_pairs, min(cfg.pairs_per_step, len(self.train_pairs)))
        neutral = self.rng.sample(self.train_neutral, min(cfg.neutral_per_step, len(self.train_neutral)))
        sign = torch.tensor([-1.0 if self.rng.random() < cfg.negative_share else 1.0 for _ in pairs])
        a_neutral = self._strengths(len(neutral)) * torch.tensor(
            [-1.0 if self.rng.random() < cfg.negative_share else 1.0 for _ in neutral])
        parts = self.losses(pairs, neutral, self._strengths(len(pairs)), sign, a_neutral)
        opt.zero_grad()
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(list(self.flow.parameters()), 5.0)
        opt.step()
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
        lin, total = self.linear_steps, self.total_steps
        rest = total - lin
        keep = {lin + round(rest * (k + 1) / cfg.checkpoints) for k in range(max(cfg.checkpoints, 1))}
        if lin:
            keep.add(lin)
        history: list[dict] = []
        checkpoints: list[tuple[int, dict]] = []
        start = {"step": 0, **self.held_out()}
        history.append(start)
        if lin:  # the identity start (mean-diff's shift exactly), kept beside the phases' ends
            checkpoints.append((0, {k: v.detach().clone() for k, v in self.flow.state_dict().items()}))
        t0 = time.perf_counter()
        for step in range(1, total + 1):
            row = {"step": step, **self.step(linear=step <= lin or not lin),
                   "seconds": time.perf_counter() - t0}
            if step in keep:
                row.update(self.held_out())
                checkpoints.append((step, {k: v.detach().clone() for k, v in self.flow.state_dict().items()}))
            history.append(row)
            if progress:
                progress(step, total, row)
        return history, checkpoints

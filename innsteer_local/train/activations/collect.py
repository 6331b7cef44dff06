"""Activation capture through llama.cpp with the native callback: the same GGUF, quantisation
and forward pass that steering later runs in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ...choices import POSITIONS
from ...errors import InvalidArgument, SteeringError
from ...runtime.prompts import Example, has_chat_template, reply_example


def capture(llm: Any, examples: Sequence[Example], layers: Iterable[int], positions: str = "completion",
            progress: Optional[Callable[[int, int], None]] = None) -> dict[int, list[np.ndarray]]:
    """Runs each example and returns, per layer, one (rows, n_embd) array per example.

    positions: 'completion' (tokens from Example.start), 'last' (final token) or 'all'.
    progress(done, total) is called after each example.
    """
    if positions not in POSITIONS:
        raise InvalidArgument(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
    layers = sorted(set(int(l) for l in layers))
    st = llm.native_steerer
    last_layer = llm.model_info.n_layer - 1
    if last_layer in layers:
        raise SteeringError(f"layer {last_layer} is the last layer: llama.cpp keeps only output rows there")
    for l in layers:
        st.capture(l, post=False, on=True)
    out: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    try:
        for ex in examples:
            st.clear_captured()
            llm.reset()
            llm.eval(ex.tokens)
            for l in layers:
                rows = st.captured(l)
                if rows.shape[0] != len(ex.tokens):
                    raise SteeringError(f"captured {rows.shape[0]} rows at layer {l} for {len(ex.tokens)} tokens")
                sel = rows[ex.start:] if positions == "completion" else rows[-1:] if positions == "last" else rows
                out[l].append(sel.copy())
            if progress is not None:
                progress(len(out[layers[0]]), len(examples))
    finally:
        for l in layers:
            st.capture(l, post=False, on=False)
        st.clear_captured()
        llm.reset()
    return out


# ---- contrastive datasets ----------------------------------------------------------------------

CACHE_VERSION = 2


@dataclass
class Activations:
    """Rows captured at each layer, split by role.

    pos/neg: behaviour-carrying rows (the replies); neg_target[i] is the row index into pos that
    negative row i should become (the aligned row for persona pairs, else -1 and the pair mean
    is used); pos_pair/neg_pair: the pair each row comes from. background: every other row of the
    contrastive texts plus generic chat text; neutral: reply rows of the neutral items.
    """

    layers: list[int]
    pos: dict[int, np.ndarray]
    neg: dict[int, np.ndarray]
    background: dict[int, np.ndarray]
    neutral: dict[int, np.ndarray]
    pos_pair: np.ndarray
    neg_pair: np.ndarray
    neg_target: np.ndarray
    n_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    def save(self, path: Any) -> None:
        arrays: dict[str, np.ndarray] = {"layers": np.array(self.layers), "pos_pair": self.pos_pair,
                                         "neg_pair": self.neg_pair, "neg_target": self.neg_target,
                                         "stats": np.array([self.n_tokens, self.seconds])}
        for role in ("pos", "neg", "background", "neutral"):
            for l, a in getattr(self, role).items():
                arrays[f"{role}_{l}"] = a
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **arrays)
        import os

        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Any) -> "Activations":
        with np.load(path, allow_pickle=False) as z:  # plain arrays only: never pickle
            layers = [int(l) for l in z["layers"]]
            roles = {role: {l: z[f"{role}_{l}"] for l in layers} for role in ("pos", "neg", "background", "neutral")}
            n_tokens, seconds = z["stats"]
            return cls(layers=layers, pos_pair=z["pos_pair"], neg_pair=z["neg_pair"], neg_target=z["neg_target"],
                       n_tokens=int(n_tokens), seconds=float(seconds), cached=True, **roles)


def _examples(llm: Any, dataset: Any) -> tuple[list[Example], list[Example], list[Example], list[Example]]:
    chat = has_chat_template(llm)

    def make(prompt: Optional[str], reply: str) -> Example:
        if prompt is None:
            return Example(tokens=llm.tokenize(reply.encode("utf-8"), add_bos=True, special=False), start=0)
        return reply_example(llm, prompt, reply, chat)

    from ..behaviors import background_exchanges

    pos = [make(p.positive_prompt, p.positive) for p in dataset.pairs]
    neg = [make(p.negative_prompt, p.negative) for p in dataset.pairs]
    neutral = [make(n.prompt, n.reply) for n in dataset.neutral]
    generic = [make(q, a) for q, a in background_exchanges()]
    return pos, neg, neutral, generic


def collect_dataset(llm: Any, dataset: Any, layers: Sequence[int], positions: str = "completion",
                    cache_dir: Any = None, progress: Any = None) -> Activations:
    """Captures every row of every text once and splits it by role; cached on disk by model,
    data, layers and positions."""
    import hashlib
    import json
    import time
    from pathlib import Path

    layers = sorted(set(int(l) for l in layers))
    path = None
    if cache_dir is not None:
        st = Path(llm.model_path).stat()
        key = json.dumps({"v": CACHE_VERSION, "model": [str(Path(llm.model_path).resolve()), st.st_size, st.st_mtime_ns],
                          "data": dataset.digest(), "layers": layers, "positions": positions}, sort_keys=True)
        path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        if path.exists():
            try:
                return Activations.load(path)
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # a broken cache entry is recollected
    pos_ex, neg_ex, neu_ex, gen_ex = _examples(llm, dataset)
    everything = pos_ex + neg_ex + neu_ex + gen_ex
    t0 = time.perf_counter()
    rows = capture(llm, everything, layers, positions="all", progress=progress)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(e.tokens) for e in everything)

    def pick(ex: Example, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(behaviour rows, other rows) of one text. Position 0 is dropped everywhere: the first
        token is an attention sink whose activations are orders of magnitude larger than the rest
        and would swamp every statistic."""
        if positions == "all":
            return r[1:], r[:0]
        if positions == "last":
            return r[-1:], r[1:-1]
        start = max(ex.start, 1)
        return r[start:], r[1:start]

    n_pos, n_neg, n_neu = len(pos_ex), len(neg_ex), len(neu_ex)
    out: dict[str, dict[int, np.ndarray]] = {k: {} for k in ("pos", "neg", "background", "neutral")}
    pos_pair: list[int] = []
    neg_pair: list[int] = []
    neg_target: list[int] = []
    for li, l in enumerate(layers):
        per = rows[l]
        pos_rows, neg_rows, bg_rows, neu_rows = [], [], [], []
        for i in range(n_pos):
            beh, other = pick(pos_ex[i], per[i])
            pos_rows.append(beh)
            bg_rows.append(other)
            if li == 0:
                pos_pair += [i] * len(beh)
        pos_starts = np.cumsum([0] + [len(r) for r in pos_rows])
        for i in range(n_neg):
            beh, other = pick(neg_ex[i], per[n_pos + i])
            neg_rows.append(beh)
            bg_rows.append(other)
            if li == 0:
                neg_pair += [i] * len(beh)
                aligned = len(beh) == len(pos_rows[i]) and neg_ex[i].tokens[neg_ex[i].start:] == pos_ex[i].tokens[pos_ex[i].start:]
                neg_target += list(range(pos_starts[i], pos_starts[i] + len(beh))) if aligned else [-1] * len(beh)
        for i in range(n_neu):
            beh, other = pick(neu_ex[i], per[n_pos + n_neg + i])
            neu_rows.append(beh)
            bg_rows.append(other)
        for i in range(len(gen_ex)):
            bg_rows.append(per[n_pos + n_neg + n_neu + i][1:])
        width = per[0].shape[1]
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, width), np.float32)  # noqa: E731
        out["pos"][l], out["neg"][l] = cat(pos_rows), cat(neg_rows)
        out["background"][l], out["neutral"][l] = cat(bg_rows), cat(neu_rows)
    acts = Activations(layers=layers, pos_pair=np.array(pos_pair, dtype=np.int32),
                       neg_pair=np.array(neg_pair, dtype=np.int32), neg_target=np.array(neg_target, dtype=np.int64),
                       n_tokens=n_tokens, seconds=seconds, **out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        acts.save(path)
    return acts

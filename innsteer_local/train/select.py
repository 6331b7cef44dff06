"""Choosing what to ship by what the steered model writes: each candidate flow (a checkpoint of
training) generates greedy replies to held-out prompts through llama.cpp at a few strengths;
behaviour is scored with the eval harness's scorers, fluency with its metrics (the unsteered
model's perplexity of the reply alone, distinct-2, repeated 4-grams) and the per-token KL of the
steered to the unsteered model along the steered reply (iso-KL: the 95th percentile should stay
near 1 nat). The best behaviour at matched fluency wins; its strength becomes the default."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..eval import metrics
from ..runtime.prompts import plain_prompt, render_chat

# the eval harness's matched fluency (eval/summary.py); and a guard on the per-token KL along the
# steered reply: iso-KL calibration puts ordinary steering near 1 nat at the 95th percentile, but a
# behaviour that changes how a reply opens is far from the unsteered model on exactly those tokens,
# so only a rollout that has left the model's distribution altogether is refused here
PPL_FACTOR = 1.25
DISTINCT_FACTOR = 0.8
KL_P95_MAX = 4.0


@dataclass
class Setting:
    """What one (candidate, strength) did on the held-out prompts."""

    candidate: int
    strength: float
    behaviour: float  # on the behaviour prompts (higher = more of it)
    neutral: float  # the same score on prompts whose behaviour must not change (0 without any)
    ppl_ratio: float
    distinct_ratio: float
    repeat4: float
    kl_p95: float
    replies: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.behaviour - self.neutral

    @property
    def fluent(self) -> bool:
        return (self.ppl_ratio <= PPL_FACTOR and self.distinct_ratio >= DISTINCT_FACTOR
                and self.kl_p95 <= KL_P95_MAX)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "replies"} | {"score": self.score, "fluent": self.fluent}


def reply(llm: Any, prompt: str, chat: bool, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, reply tokens) of the greedy reply under the current steering. llm keeps all
    logits, so afterwards llm.scores holds the steered logits at every reply position."""
    import llama_cpp

    text = render_chat(llm, [{"role": "user", "content": prompt}]) if chat else plain_prompt(prompt) + " "
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=chat)
    out: list[int] = []
    vocab = llm._model.vocab
    for tok in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, tok) or len(out) >= max_tokens:
            break
        out.append(int(tok))
    return tokens, out


def _logp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Judge:
    """Generation, scoring and fluency for selection, on a steered llama.cpp model of its own that
    keeps every position's logits (the KL along a reply needs them)."""

    def __init__(self, model_path: str, scorer: Callable[[str], float], chat: bool, max_tokens: int = 64,
                 threads: Optional[int] = None):
        import os

        from ..runtime.steered import SteeredLlama

        n = threads or os.cpu_count() or 1
        self.llm = SteeredLlama(model_path, n_ctx=1024, logits_all=True, verbose=False, seed=0, n_threads=n,
                                n_threads_batch=n)
        self.scorer, self.chat, self.max_tokens = scorer, chat, max_tokens

    def close(self) -> None:
        self.llm.close()

    def run(self, prompts: Sequence[str], neutral_prompts: Sequence[str], steer: Callable[[float], None],
            strength: float) -> dict[str, Any]:
        """Replies and raw measurements at one strength (steer(a) sets the steering to strength a)."""
        llm = self.llm
        out: dict[str, Any] = {"texts": [], "scores": [], "neutral_scores": [], "ppl": [], "d2": [], "rep": [], "kl": []}
        for group, ps in (("scores", prompts), ("neutral_scores", neutral_prompts)):
            for p in ps:
                steer(strength)
                ptoks, rtoks = reply(llm, p, self.chat, self.max_tokens)
                text = llm.detokenize(rtoks).decode("utf-8", errors="replace").strip()
                out["texts"].append(text)
                out[group].append(self.scorer(text))
                out["d2"].append(metrics.distinct_n(text, 2))
                out["rep"].append(metrics.repeated_ngram_share(text, 4))
                if not rtoks:
                    continue
                steer(0.0)
                if strength != 0.0:  # the steered logits came with the generation; the unsteered ones now
                    steered = _logp(llm.scores[len(ptoks) - 1: len(ptoks) + len(rtoks) - 1])
                    llm.reset()
                    llm.eval(ptoks + rtoks)
                    base = _logp(llm.scores[len(ptoks) - 1: len(ptoks) + len(rtoks) - 1])
                    out["kl"] += list((np.exp(steered) * (steered - base)).sum(-1))
                alone = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) if text else []
                if len(alone) > 1:
                    llm.reset()
                    llm.eval(alone)
                    out["ppl"].append(metrics.perplexity(metrics.token_logprobs(np.asarray(llm.scores[: len(alone)]),
                                                                                 alone, 1)))
        steer(0.0)
        return out


def _geo(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x and math.isfinite(x)], np.float64)
    return float(np.exp(np.log(v).mean())) if v.size else math.nan


def summarise(raw: dict[str, Any], base: dict[str, Any], candidate: int, strength: float) -> Setting:
    d_base = float(np.mean(base["d2"])) if base["d2"] else 1.0
    return Setting(candidate=candidate, strength=strength,
                   behaviour=float(np.mean(raw["scores"])) if raw["scores"] else 0.0,
                   neutral=float(np.mean(raw["neutral_scores"])) if raw["neutral_scores"] else 0.0,
                   ppl_ratio=_geo(raw["ppl"]) / _geo(base["ppl"]) if base["ppl"] else 1.0,
                   distinct_ratio=float(np.mean(raw["d2"])) / d_base if d_base > 0 else 1.0,
                   repeat4=float(np.mean(raw["rep"])) if raw["rep"] else 0.0,
                   kl_p95=float(np.percentile(raw["kl"], 95)) if raw["kl"] else 0.0,
                   replies=list(raw["texts"]))


def best(settings: Sequence[Setting], baseline: Setting) -> Setting:
    """The best score among fluent settings; the baseline (strength 0) if none is fluent or better."""
    fluent = [s for s in settings if s.fluent]
    if not fluent:
        return baseline
    top = max(fluent, key=lambda s: (round(s.score, 6), -abs(s.strength)))
    return top if top.score > baseline.score else baseline

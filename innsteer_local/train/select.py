"""Choosing what to ship by what the steered model writes: each candidate flow (a checkpoint of
training) generates greedy replies to held-out prompts through llama.cpp at a few strengths
(all settings of a stage side by side on the batched engine, asked and cut as eval does);
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


JUDGE_CTX = 1024  # tokens per sequence: a held-out prompt and its reply


def reply_job(engine: Any, prompt: str, chat: bool, max_tokens: int, steering: Sequence[Any] = ()) -> Any:
    """The engine job that writes one held-out reply: greedy, asked and cut as eval asks and cuts
    (prompts.prompt_text, job.reply)."""
    from ..runtime.engine import Sampling

    return engine.reply(prompt, sampling=Sampling(max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0),
                        steering=steering, chat=chat)


class Judge:
    """Generation, scoring and fluency for selection, on an engine over the model being trained
    (its weights are shared; each sequence carries its own candidate and strength)."""

    def __init__(self, llm: Any, scorer: Callable[[str], float], chat: bool, max_tokens: int = 64):
        from ..runtime.jobs import open_engine

        self.engine = open_engine(llm, min(JUDGE_CTX, llm.n_ctx()))
        self.scorer, self.chat, self.max_tokens = scorer, chat, max_tokens

    def add_candidate(self, path: Any) -> Any:
        """Attaches a candidate flow file; name the result in run()'s settings."""
        return self.engine.add_flow(path)

    def close(self) -> None:
        self.engine.close()

    def run(self, prompts: Sequence[str], neutral_prompts: Sequence[str],
            settings: Sequence[tuple[Optional[Any], float]]) -> list[dict[str, Any]]:
        """Replies and raw measurements of each setting (a candidate flow, or None, at a strength),
        all settings side by side: every reply is generated, then scored the moment it is written:
        behaviour, distinct-2, repeated 4-grams, the unsteered model's perplexity of the reply
        alone, and the KL(steered || unsteered) of every reply token (two teacher-forced passes
        over prompt + reply, one with the setting's steering and one without)."""
        from ..runtime.engine import Steer
        from ..runtime.jobs import Driver, alone_score, kl_rows, perplexity, reply_score

        engine, driver = self.engine, Driver(self.engine)
        slots: list[list[dict[str, Any]]] = []

        def written(job: Any, prompt: str, slot: dict[str, Any], steering: list[Any]) -> None:
            text = slot["text"] = job.reply
            if not text:
                return
            alone = alone_score(engine, text)
            if alone is not None:
                driver.submit(engine, alone, lambda j: slot.update(ppl=perplexity(j)))
            if steering:  # the steered and the unsteered distributions along the reply
                pair = [reply_score(engine, prompt, text, self.chat, steering, keep_dists=True),
                        reply_score(engine, prompt, text, self.chat, (), keep_dists=True)]

                def both(_: Any) -> None:
                    if all(j.done for j in pair):
                        slot["kl"] = kl_rows(pair[0].dists, pair[1].dists)
                        for j in pair:
                            j.dists = []

                for j in pair:
                    driver.submit(engine, j, both)

        for flow, strength in settings:
            steering = [Steer(flow, float(strength))] if flow is not None and strength != 0.0 else []
            per: list[dict[str, Any]] = []
            for group, ps in (("scores", prompts), ("neutral_scores", neutral_prompts)):
                for p in ps:
                    slot: dict[str, Any] = {"group": group, "text": "", "ppl": None, "kl": []}
                    per.append(slot)
                    driver.submit(engine, reply_job(engine, p, self.chat, self.max_tokens, steering),
                                  lambda j, p=p, slot=slot, steering=steering: written(j, p, slot, steering))
            slots.append(per)
        driver.run()
        out = []
        for per in slots:
            raw: dict[str, Any] = {"texts": [], "scores": [], "neutral_scores": [], "ppl": [], "d2": [], "rep": [],
                                   "kl": []}
            for slot in per:
                text = slot["text"]
                raw["texts"].append(text)
                raw[slot["group"]].append(self.scorer(text))
                raw["d2"].append(metrics.distinct_n(text, 2))
                raw["rep"].append(metrics.repeated_ngram_share(text, 4))
                raw["kl"] += slot["kl"]
                if slot["ppl"] is not None and math.isfinite(slot["ppl"]):
                    raw["ppl"].append(slot["ppl"])
            out.append(raw)
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

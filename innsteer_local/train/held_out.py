"""Held-out checks of a trained flow, what train/choose.py decides with: greedy replies to
held-out prompts through llama.cpp (every setting side by side on the batched engine, asked and
cut as eval asks and cuts), behaviour scored with the shared scorers, fluency with the shared
metrics (the judge's perplexity of the reply alone, distinct-2, repeated 4-grams),
judged by the one rule for matched fluency (measure/metrics.matched_fluency)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..measure import metrics


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
    replies: list[str] = field(default_factory=list)
    stderr: float = 0.0  # standard error of score over the prompts

    def ties(self, other: "Setting") -> bool:
        """Whether the two scores are within the larger of their standard errors."""
        return abs(self.score - other.score) <= max(self.stderr, other.stderr)

    @property
    def score(self) -> float:
        return self.behaviour - self.neutral

    @property
    def fluent(self) -> bool:
        """Matched fluency, exactly as eval's headline judges it."""
        return metrics.matched_fluency(self.ppl_ratio, self.distinct_ratio)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "replies"} | {"score": self.score, "fluent": self.fluent}


def _stderr(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


JUDGE_CTX = 512  # tokens per sequence: a held-out prompt and its reply
# replies as long as eval's (eval/runner.py EvalConfig.max_tokens), so fluency means the same
SELECT_TOKENS = 40


def reply_job(engine: Any, prompt: str, chat: bool, max_tokens: int, steering: Sequence[Any] = ()) -> Any:
    """The engine job that writes one held-out reply: greedy, asked and cut as eval asks and cuts
    (prompts.prompt_text, job.reply)."""
    from ..runtime.engine import Sampling

    return engine.reply(prompt, sampling=Sampling(max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0),
                        steering=steering, chat=chat)


class Judge:
    """Generation, scoring and fluency for selection, on an engine over the model being trained
    (its weights are shared; each sequence carries its own candidate and strength). Fluency is read
    by the judge model eval reads it with (judge_path: another family, registry.judge_for), so
    selection's matched fluency is eval's; without one, by the model itself."""

    def __init__(self, llm: Any, scorer: Callable[[str], float], chat: bool, max_tokens: int = SELECT_TOKENS,
                 parallel: Optional[int] = None, judge_path: Optional[str] = None, memo_dir: Optional[Path] = None):
        from ..runtime.jobs import BATCH_PARALLEL, load_judge, open_engine

        self.engine = open_engine(llm, min(JUDGE_CTX, llm.n_ctx()), parallel or BATCH_PARALLEL)
        self.judge_llm = load_judge(judge_path, JUDGE_CTX, getattr(llm, "n_threads", None)) if judge_path else None
        self.reader = open_engine(self.judge_llm, JUDGE_CTX, parallel or BATCH_PARALLEL) if self.judge_llm else self.engine
        self.scorer, self.chat, self.max_tokens = scorer, chat, max_tokens
        self.memo = UnsteeredMemo.for_models(memo_dir, llm.model_path, judge_path, chat, max_tokens) if memo_dir else None

    def add_candidate(self, path: Any) -> Any:
        """Attaches a candidate flow file; name the result in run()'s settings."""
        return self.engine.add_flow(path)

    def close(self) -> None:
        if self.reader is not self.engine:
            self.reader.close()
            self.judge_llm.close()
        self.engine.close()

    def run(self, prompts: Sequence[str], neutral_prompts: Sequence[str],
            settings: Sequence[tuple[Optional[Any], float]]) -> list[dict[str, Any]]:
        """Replies and raw measurements of each setting (a candidate flow, or None, at a strength),
        all settings side by side: every reply is generated (the unsteered ones read from the memo
        where it has them), then scored the moment it is written: behaviour, distinct-2, repeated
        4-grams and the judge's perplexity of the reply alone."""
        from ..runtime.engine import Steer
        from ..runtime.jobs import Driver, alone_score, perplexity

        engine, reader = self.engine, self.reader
        driver = Driver(engine, *([reader] if reader is not engine else []))
        slots: list[list[dict[str, Any]]] = []

        def written(job: Any, slot: dict[str, Any]) -> None:
            text = slot["text"] = job.reply
            alone = alone_score(reader, text) if text else None
            if alone is not None:
                driver.submit(reader, alone, lambda j: slot.update(ppl=perplexity(j)))

        unsteered: list[dict[str, Any]] = []
        for flow, strength in settings:
            steering = [Steer(flow, float(strength))] if flow is not None and strength != 0.0 else []
            per: list[dict[str, Any]] = []
            for group, ps in (("scores", prompts), ("neutral_scores", neutral_prompts)):
                for p in ps:
                    slot: dict[str, Any] = {"group": group, "prompt": p, "text": "", "ppl": None}
                    per.append(slot)
                    known = None if steering or self.memo is None else self.memo.get(p)
                    if known is not None:
                        slot.update(known)
                        continue
                    if not steering:
                        unsteered.append(slot)
                    driver.submit(engine, reply_job(engine, p, self.chat, self.max_tokens, steering),
                                  lambda j, slot=slot: written(j, slot))
            slots.append(per)
        driver.run()
        if self.memo is not None and unsteered:
            self.memo.put({s["prompt"]: {"text": s["text"], "ppl": s["ppl"]} for s in unsteered})
        out = []
        for per in slots:
            raw: dict[str, Any] = {"texts": [], "scores": [], "neutral_scores": [], "ppl": [], "d2": [], "rep": []}
            for slot in per:
                text = slot["text"]
                raw["texts"].append(text)
                raw[slot["group"]].append(self.scorer(text))
                raw["d2"].append(metrics.distinct_n(text, 2))
                raw["rep"].append(metrics.repeated_ngram_share(text, 4))
                if slot["ppl"] is not None and math.isfinite(slot["ppl"]):
                    raw["ppl"].append(slot["ppl"])
            out.append(raw)
        return out


class UnsteeredMemo:
    """The unsteered model's held-out replies and their judged perplexity, kept between runs (one
    JSON file per model, judge, chat mode and reply length, keyed by prompt): a user editing a pairs
    file trains again on mostly the same held-out prompts, and these replies never change."""

    VERSION = 1

    def __init__(self, path: Path):
        self.path = path
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: write them again
            known = {}
        self.known: dict[str, Any] = known if isinstance(known, dict) else {}

    @classmethod
    def for_models(cls, root: Path, model_path: str, judge_path: Optional[str], chat: bool,
                   max_tokens: int) -> "UnsteeredMemo":
        from ..runtime.registry import file_sha256

        judge = file_sha256(Path(judge_path))[:16] if judge_path else "self"
        key = f"{file_sha256(Path(model_path))[:16]}-{judge}-{'chat' if chat else 'plain'}-n{max_tokens}-v{cls.VERSION}"
        return cls(Path(root) / f"{key}.json")

    def get(self, prompt: str) -> Optional[dict[str, Any]]:
        entry = self.known.get(prompt)
        ok = isinstance(entry, dict) and isinstance(entry.get("text"), str) and \
            (entry.get("ppl") is None or isinstance(entry.get("ppl"), (int, float)))
        return {"text": entry["text"], "ppl": entry.get("ppl")} if ok else None

    def put(self, entries: dict[str, dict[str, Any]]) -> None:
        self.known.update(entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.known), encoding="utf-8")
            tmp.replace(self.path)
        except OSError:  # a read-only cache costs time only
            pass


def summarise(raw: dict[str, Any], base: dict[str, Any], candidate: int, strength: float) -> Setting:
    ppl_ratio, distinct_ratio = metrics.fluency_ratios(raw["ppl"], raw["d2"], base["ppl"], base["d2"])
    return Setting(candidate=candidate, strength=strength,
                   behaviour=float(np.mean(raw["scores"])) if raw["scores"] else 0.0,
                   neutral=float(np.mean(raw["neutral_scores"])) if raw["neutral_scores"] else 0.0,
                   ppl_ratio=ppl_ratio if math.isfinite(ppl_ratio) else 1.0,
                   distinct_ratio=distinct_ratio if math.isfinite(distinct_ratio) else 1.0,
                   repeat4=float(np.mean(raw["rep"])) if raw["rep"] else 0.0,
                   replies=list(raw["texts"]),
                   stderr=math.hypot(_stderr(raw["scores"]), _stderr(raw["neutral_scores"])))


def smooth(settings: Sequence[Setting], baseline: Setting) -> list[Setting]:
    """One candidate's settings with their fluency ratios made monotone in |strength| (isotonic
    regression from the unsteered baseline outwards: perplexity ratio non-decreasing, distinct-2
    ratio non-increasing). Measured on a few prompts, a ratio jumps up and down from one strength
    to the next (1.20, 1.57, 1.21 at 0.7, 1 and 1.4 on 8 refusal prompts) although pushing harder
    does not make text more fluent; the rule is then applied to the smoothed ratios."""
    from dataclasses import replace

    order = sorted(settings, key=lambda s: abs(s.strength))
    ppl = _isotonic([baseline.ppl_ratio] + [s.ppl_ratio for s in order])[1:]
    d2 = [-x for x in _isotonic([-baseline.distinct_ratio] + [-s.distinct_ratio for s in order])[1:]]
    return [replace(s, ppl_ratio=p, distinct_ratio=d) for s, p, d in zip(order, ppl, d2)]


def _isotonic(y: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to y in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def best(settings: Sequence[Setting], baseline: Setting) -> Setting:
    """The best score among fluent settings (ties: the smaller strength); the baseline (strength 0)
    if none is fluent and better."""
    fluent = [s for s in settings if s.fluent]
    if not fluent:
        return baseline
    top = max(fluent, key=lambda s: (round(s.score, 6), -abs(s.strength)))
    return top if top.score > baseline.score else baseline

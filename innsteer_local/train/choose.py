"""Selection of the shipped checkpoint and default strength by generation (train/select.py does
the measuring): each candidate at strength 1, then the best candidate over a strength sweep. Each
sequence carries its own steering (Steer), so no setting is written as 'this flow on, the others
off'."""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from . import behaviors, select
from .data import Dataset

_WORD = re.compile(r"[a-z']+")


def contrast_scorer(ds: Dataset) -> Callable[[str], float]:
    """A scorer learned from the data itself, for data without a named scorer: the mean naive-Bayes
    log-odds of a reply's words between the positive and the negative replies (no extra packages)."""
    pos, neg = Counter(), Counter()
    for p in ds.pairs:
        pos.update(_WORD.findall(p.positive.lower()))
        neg.update(_WORD.findall(p.negative.lower()))
    vocab = set(pos) | set(neg)
    n_pos, n_neg = sum(pos.values()) + len(vocab), sum(neg.values()) + len(vocab)
    odds = {w: math.log((pos[w] + 1) / n_pos) - math.log((neg[w] + 1) / n_neg) for w in vocab}

    def score(text: str) -> float:
        words = [odds[w] for w in _WORD.findall(text.lower()) if w in odds]
        return float(sum(words) / len(words)) if words else 0.0

    return score


def scorer_for(recipe: Optional[behaviors.Recipe], ds: Dataset) -> tuple[str, Callable[[str], float]]:
    """The recipe's scorer from the eval harness where its packages are installed, else the contrast
    scorer."""
    if recipe is not None and recipe.scorer:
        from ..eval.scorers import make_scorer

        s = recipe.scorer
        try:
            fn = make_scorer(s["name"], s.get("description", ""), s.get("words", []))
            fn("a short test")  # loads the model behind it now, so a missing package shows here
            return s["name"], fn
        except Exception:  # e.g. the [eval] extra is not installed
            pass
    return "contrast", contrast_scorer(ds)


def _prompts(out: Any, recipe: Optional[behaviors.Recipe], n: int) -> tuple[list[str], list[str]]:
    if recipe is not None and recipe.held_out_prompts:
        return recipe.held_out_prompts[:n], recipe.held_out_neutral[:n]
    prompts, neutral = out.held_out
    if not prompts:  # activation-based methods train on every pair: take the last ones
        prompts = [p.positive_prompt for p in out.data.pairs[-n:] if p.positive_prompt]
        neutral = [x.prompt for x in out.data.neutral[-n:]]
    return prompts[:n], neutral[:n]


def choose(llm: Any, out: Any, recipe: Optional[behaviors.Recipe], cfg: Any, progress: Any) -> None:
    """Sets out.flow (the chosen candidate with its default strength) and out.selection.

    Each candidate is generated at strength 1 (the trained operating point); the best one then
    walks out from 1 (0.75 and 0.5 when 1 is not fluent or not better than nothing; 1.5, then 2,
    while the last step was fluent and better): a few settings instead of a full grid. Each stage
    is one batch on one engine over llm (the unsteered model and every candidate at 1; then both
    strengths of the walk, of which the second is kept only where the walk reaches it)."""
    prompts, neutral = _prompts(out, recipe, cfg.select_prompts)
    if not prompts:
        progress.message("no prompts to select on (pairs without prompts): keeping strength 1")
        return
    name, scorer = scorer_for(recipe, out.data)
    chat = bool(llm.metadata.get("tokenizer.chat_template"))
    candidates = out.candidates or [(0, out.flow)]
    progress.phase(f"choosing by generation ({name} score)", 1 + len(candidates) + 2)
    judge = select.Judge(llm, scorer, chat, cfg.select_tokens)
    done = 0
    settings: list[select.Setting] = []
    with tempfile.TemporaryDirectory(prefix="innsteer-select-") as tmp:
        try:
            flows = []
            for i, (_, flow) in enumerate(candidates):
                path = Path(tmp) / f"candidate-{i}.gguf"
                flow.save(path)
                flows.append(judge.add_candidate(path))

            def measure(stage: list[tuple[int, float]]) -> list[dict[str, Any]]:
                """One stage's settings (candidate index, -1 for none; strength) side by side."""
                nonlocal done
                raws = judge.run(prompts, neutral, [(flows[i] if i >= 0 else None, a) for i, a in stage])
                done += len(stage)
                progress.update(done)
                return raws

            # stage 1: the unsteered model and every candidate at its operating point
            first_raws = measure([(-1, 0.0)] + [(i, 1.0) for i in range(len(candidates))])
            base_raw = first_raws[0]
            baseline = select.summarise(base_raw, base_raw, -1, 0.0)
            settings = [select.summarise(r, base_raw, i, 1.0) for i, r in enumerate(first_raws[1:])]
            first = select.best(settings, baseline)
            pick = first.candidate if first.candidate >= 0 else len(candidates) - 1
            at_one = next(s for s in settings if s.candidate == pick)
            # stage 2: the walk out from 1. Both of its strengths run side by side; the second counts
            # only where walking one step at a time would have gone on to it
            up = at_one.fluent and at_one.score > baseline.score
            walk = (1.5, 2.0) if up else (0.75, 0.5)
            walked = [select.summarise(r, base_raw, pick, a)
                      for a, r in zip(walk, measure([(pick, a) for a in walk]))]
            for s in walked:
                settings.append(s)
                if up:
                    if not (s.fluent and s.score > at_one.score):
                        break
                    at_one = s
                elif s.fluent and s.score > baseline.score:
                    break
        finally:
            judge.close()
    chosen = select.best([s for s in settings if s.candidate == pick], baseline)
    step, flow = candidates[pick]
    note = ""
    if chosen.strength == 0.0:  # nothing was fluent and better: ship the gentlest strength tried
        chosen_strength = min(s.strength for s in settings if s.candidate == pick)
        note = "no setting beat the unsteered model at matched fluency; default set to the smallest strength tried"
    else:
        chosen_strength = chosen.strength
    flow.default_strength = float(chosen_strength)
    flow.provenance["selection"] = {"scorer": name, "prompts": len(prompts), "neutral_prompts": len(neutral),
                                    "tokens": cfg.select_tokens, "checkpoint_step": step,
                                    "baseline": baseline.row(), "chosen": chosen.row(), **({"note": note} if note else {})}
    out.flow = flow
    out.selection = [baseline.row()] + [s.row() for s in settings]
    out.metrics["selection"] = flow.provenance["selection"]

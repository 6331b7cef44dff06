"""The last step of `train`: which candidate to ship and what its strength 1 means, chosen by what
the steered model writes on held-out prompts (train/held_out.py measures).

Every candidate (for a flow, the outcome.Candidates that COMPETING names: the end of its linear
phase for an always-on behaviour, and the end of training where its couplings were trained too;
the end of training for a selective one; a linear method's one vector) writes replies at 1 and 2 times its trained unit, all
side by side in one batch with the unsteered model, then one more rung each in a second wave (above,
between or below). Fluency is read by eval's judge (registry.judge_for: a model of another family)
and judged by eval's rule (metrics.matched_fluency). The winner is the candidate with the best
behaviour score at matched fluency; the shipped flow is then **calibrated**: its shift is rescaled
so that strength 1 is the rung just below that best setting (strength 1 is also the file's
default). So strength 1 means the same for every method and data source: inside matched fluency on
held-out prompts, with the most behaviour at about 1.4-2 and the text breaking beyond.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..runtime.prompts import has_chat_template
from . import behaviors, held_out
from .data import Dataset
from ..progress import Progress
from .outcome import Candidate, TrainOutcome

if TYPE_CHECKING:
    from .pipeline import TrainConfig

_WORD = re.compile(r"[a-z']+")

# strengths tried, as multiples of the trained unit (training samples [0.5, 1.5]): first 1 and 2 for
# every candidate, then one more each where that pair leaves the answer open: 2.8 where it is still
# fluent at 2 (a topic from a file of fixed sentences appears only at 1.5-2.5x the unit), 1.4 where
# it is fluent at 1 only, 0.5 where it is fluent at neither. Replies cost (about 125 new tokens a
# second batched on 2 cores); two rungs and one more keep selection within a training run's minute.
LADDER = (1.0, 2.0)
BETWEEN, ABOVE, BELOW = 1.4, 2.8, 0.5
# which of a flow's candidates (outcome.Candidate.phase) compete, first the one kept where scores
# tie. Always-on (data without neutral items): the linear phase, and the couplings where they were
# trained (only when asked: ThroughConfig.coupling_steps); where they tie, the linear phase: there the
# objective rewards couplings that fit the pairs' own wording, and on held-out prompts such a flow
# repeated itself sooner than its shift alone at the same amount of the behaviour (the identity
# start, mean-diff's shift, scored below both on every check file and is left out). Selective (data
# with neutral items): the couplings alone, calibrated; telling harmful from harmless requests is
# their job (a shift alone refuses both alike: 0.12 against 0.62 on the refusal check,
# docs/RESULTS.md), and a handful of replies scored by word counts picked the shift alone wrongly.
COMPETING = {"always-on": ("linear", "full"), "selective": ("full",)}


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
        from ..measure.scorers import make_scorer

        s = recipe.scorer
        try:
            fn = make_scorer(s["name"], s.get("description", ""), s.get("words", []))
            fn("a short test")  # loads the model behind it now, so a missing package shows here
            return s["name"], fn
        except Exception:  # e.g. the [eval] extra is not installed
            pass
    return "contrast", contrast_scorer(ds)


def _prompts(out: TrainOutcome, recipe: Optional[behaviors.Recipe], n: int, n_selective: int) -> tuple[list[str], list[str]]:
    """Held-out behaviour prompts, and neutral ones for a selective behaviour (data with neutral
    items): n behaviour prompts, or n_selective of each kind (the same number of replies or a few more)."""
    if recipe is not None and recipe.held_out_prompts:
        prompts, neutral = recipe.held_out_prompts, recipe.held_out_neutral
    else:
        prompts, neutral = out.held_out
        if not prompts:  # activation-based methods train on every pair: take the last ones
            prompts = [p.positive_prompt for p in out.data.pairs[-n:] if p.positive_prompt]
        if not neutral:  # too few neutral items to hold any out: the behaviour is still selective
            neutral = [x.prompt for x in out.data.neutral[-n_selective:]]
    if neutral:
        return prompts[:n_selective], neutral[:n_selective]
    return prompts[:n], []


def choose(llm: Any, out: TrainOutcome, recipe: Optional[behaviors.Recipe], cfg: TrainConfig,
           progress: Progress, cache_dir: Optional[Path] = None) -> None:
    """Sets out.flow (the chosen candidate, calibrated: default strength 1) and out.selection; with a
    cache_dir, the unsteered model's replies are kept there between runs."""
    prompts, neutral = _prompts(out, recipe, cfg.select_prompts, cfg.select_neutral)
    if not prompts:
        progress.message("no prompts to select on (pairs without prompts): keeping the trained unit as strength 1")
        return
    name, scorer = scorer_for(recipe, out.data)
    chat = has_chat_template(llm)
    competing = COMPETING["selective" if neutral else "always-on"]
    candidates = [c for c in out.candidates if c.phase in competing] or out.candidates or [Candidate(out.flow)]
    progress.phase(f"choosing and calibrating by generation ({name} score)", 1 + len(candidates) * (len(LADDER) + 1))
    per_setting = len(prompts) + len(neutral)
    judge_path = None if cfg.judge == "none" else cfg.judge  # pipeline.train resolved "auto"
    judge = held_out.Judge(llm, scorer, chat, cfg.select_tokens,
                           parallel=min(64, per_setting * (1 + len(candidates) * len(LADDER))), judge_path=judge_path,
                           memo_dir=None if cache_dir is None else cache_dir / "unsteered")
    done = 0
    settings: list[held_out.Setting] = []
    with tempfile.TemporaryDirectory(prefix="innsteer-select-") as tmp:
        try:
            flows = []
            for i, cand in enumerate(candidates):
                path = Path(tmp) / f"candidate-{i}.gguf"
                cand.flow.save(path)
                flows.append(judge.add_candidate(path))

            def measure(stage: list[tuple[int, float]]) -> list[dict[str, Any]]:
                """One stage's settings (candidate index, -1 for none; strength) side by side."""
                nonlocal done
                raws = judge.run(prompts, neutral, [(flows[i] if i >= 0 else None, a) for i, a in stage])
                done += len(stage)
                progress.update(done)
                return raws

            stage = [(-1, 0.0)] + [(i, a) for i in range(len(candidates)) for a in LADDER]
            raws = measure(stage)
            base_raw = raws[0]
            baseline = held_out.summarise(base_raw, base_raw, -1, 0.0)
            settings = [held_out.summarise(r, base_raw, i, a) for (i, a), r in zip(stage[1:], raws[1:])]
            settings = _smoothed(settings, baseline)
            # one more rung for each candidate (ABOVE, BETWEEN or BELOW), except below where a weaker
            # push cannot win anyway: at its lowest rung it already scored no more than the best fluent
            # setting of another candidate (the behaviour grows with strength). All in one second wave.
            best_fluent = max((s.score for s in settings if s.fluent), default=-math.inf)
            more = []
            for i in range(len(candidates)):
                low, high = sorted((s for s in settings if s.candidate == i), key=lambda s: s.strength)
                if high.fluent:
                    more.append((i, ABOVE))
                elif low.fluent:
                    more.append((i, BETWEEN))
                elif low.score > best_fluent:
                    more.append((i, BELOW))
            if more:
                settings = _smoothed(settings + [held_out.summarise(r, base_raw, i, a) for (i, a), r in
                                                 zip(more, measure(more))], baseline)
        finally:
            judge.close()
    tops = [held_out.best([s for s in settings if s.candidate == i], baseline) for i in range(len(candidates))]
    pick = _pick(tops, [_held_out_loss(out, c.step) for c in candidates], selective=bool(neutral),
                 prefer=next((i for i, c in enumerate(candidates) if c.phase == competing[0]), None))
    chosen = tops[pick]
    note = ""
    own = sorted((s for s in settings if s.candidate == pick), key=lambda s: s.strength)
    fluent = [s.strength for s in own if s.fluent]
    if chosen.strength == 0.0:  # nothing fluent beat the unsteered model: the largest fluent push, or the gentlest
        unit = max(fluent) if fluent else own[0].strength
        note = ("no setting beat the unsteered model at matched fluency on the held-out prompts; strength 1 is "
                + ("the largest fluent setting tried" if fluent else "the gentlest setting tried (none was fluent)"))
    else:
        # one rung below the best setting at matched fluency (when that one is fluent too): measured on
        # a few prompts the perplexity ratio varies by about 15 %, and the best setting is usually the
        # last fluent one, so strength 1 keeps a margin inside matched fluency on other prompts
        lower = [a for a in fluent if a < chosen.strength]
        unit = max(lower) if lower else chosen.strength
    flow = candidates[pick].flow
    flow.rescale(unit)
    flow.default_strength = 1.0
    flow.provenance["selection"] = {"scorer": name, "prompts": len(prompts), "neutral_prompts": len(neutral),
                                    "tokens": cfg.select_tokens, "judge": Path(judge_path).name if judge_path else "self",
                                    "checkpoint_step": candidates[pick].step,
                                    "phase": candidates[pick].phase,
                                    "unit": unit, "baseline": baseline.row(), "chosen": chosen.row(),
                                    "default": next(s for s in own if s.strength == unit).row(),
                                    **({"note": note} if note else {})}
    out.flow = flow
    out.selection = [baseline.row()] + [s.row() | {"phase": candidates[s.candidate].phase,
                                                   "calibrated": s.strength / unit if s.candidate == pick else None}
                                        for s in settings]
    out.metrics["selection"] = flow.provenance["selection"]


def _smoothed(settings: list[held_out.Setting], baseline: held_out.Setting) -> list[held_out.Setting]:
    """Every candidate's settings with monotone fluency ratios (held_out.smooth)."""
    return [s for i in sorted({s.candidate for s in settings})
            for s in held_out.smooth([s for s in settings if s.candidate == i], baseline)]


def _pick(tops: list[held_out.Setting], losses: list[Optional[float]], selective: bool,
          prefer: Optional[int] = None) -> int:
    """The candidate with the best score at matched fluency. A few prompts cannot tell apart scores
    within a standard error of each other; among such ties the data decides. For a selective
    behaviour (data with neutral items, which tell the flow where to leave the model alone) the one
    with the lowest held-out objective; for an always-on behaviour `prefer` (COMPETING's first),
    else the earliest. On user files of fixed sentences (docs/RESULTS.md) the coupled flow repeated
    itself sooner than its shift alone at the same amount of the behaviour."""
    best = max(range(len(tops)), key=lambda i: tops[i].score)
    tied = [i for i in range(len(tops)) if tops[i].ties(tops[best])]
    if not selective:
        return prefer if prefer in tied else min(tied)
    return min(tied, key=lambda i: (losses[i] if losses[i] is not None else math.inf, i))


def _held_out_loss(out: TrainOutcome, step: int) -> Optional[float]:
    """The objective on held-out pairs at a checkpoint (recorded in the training history)."""
    row = next((h for h in out.history if h.get("step") == step), None)
    return row.get("val_loss") if row else None

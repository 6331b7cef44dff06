"""From records to numbers: fluency of a setting against unsteered, behaviour scores with
bootstrap intervals, and the headline (best score at matched fluency)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from ..measure import metrics
from .experiment import NONE, PROMPT, Experiment, experiment_cells
from .records import Records

# Matched fluency (the headline) is metrics.matched_fluency, the rule `train` chooses by too.
MATCHED_PPL_FACTOR, MATCHED_DISTINCT_FACTOR = metrics.MATCHED_PPL_FACTOR, metrics.MATCHED_DISTINCT_FACTOR
# One generation is fluent when its judge perplexity is at most twice the unsteered median, its
# distinct-2 at least 0.8x the unsteered median and it is not mostly repeated 4-grams: perplexity
# alone rewards looping text (a judge finds repetition very predictable).
FLUENT_PPL_FACTOR = 2.0
FLUENT_MAX_REPEAT = 0.25
# A sweep stops going further out in strength (same sign) once a cell is this far past matched
# fluency: larger strengths only cost time (they cannot enter the headline).
DEGENERATE_PPL_FACTOR = 2.0
DEGENERATE_DISTINCT_FACTOR = 0.6


_geo = metrics.geometric_mean


def fluency_key(row: dict[str, Any]) -> str:
    """The perplexity that judges fluency: the judge's of the reply alone. A reply judged after
    its prompt is charged for every change of subject the steering asks for (a reply about the
    sea to a question about breakfast); that conditioned perplexity is reported as relevance.
    Records written before the reply-alone measure fall back to the conditioned one."""
    for key in ("ppl_judge_alone", "ppl_self_alone", "ppl_judge", "ppl_self"):
        if key in row:
            return key
    return "ppl_self"


def _generation_rows(records: Records, exp: Experiment, label: str, s: float) -> list[dict[str, Any]]:
    name = exp.name if exp.task.kind == "generate" else exp.name + "/fluency"
    return records.cell(name, label, s)


def cell_fluency(records: Records, exp: Experiment, label: str, s: float) -> dict[str, Any]:
    rows = _generation_rows(records, exp, label, s)
    base = _generation_rows(records, exp, NONE, 0.0)
    if not rows or not base:
        return {}
    key = fluency_key(base[0])
    base_med = float(np.nanmedian([r[key] for r in base if r[key] is not None]))
    # after the prompt: relevance, not fluency (measured with --relevance)
    cond = next((k for k in ("ppl_judge", "ppl_self") if k in base[0] and all(k in r for r in rows)), None)
    base_d2_med = float(np.median([r["distinct2"] for r in base]))
    fluent = [float(r["text"].strip() != "" and r[key] is not None and math.isfinite(r[key])
                    and r[key] <= FLUENT_PPL_FACTOR * base_med
                    and r["distinct2"] >= MATCHED_DISTINCT_FACTOR * base_d2_med
                    and r["repeat4"] <= FLUENT_MAX_REPEAT) for r in rows]
    ppl, d2 = _geo(r[key] for r in rows), float(np.mean([r["distinct2"] for r in rows]))
    ppl_ratio, d_ratio = metrics.fluency_ratios([r[key] for r in rows], [r["distinct2"] for r in rows],
                                                [r[key] for r in base], [r["distinct2"] for r in base])
    fl_share = metrics.bootstrap_ci(fluent)
    return {"judge": key, "n": len(rows), "ppl": ppl, "ppl_ratio": ppl_ratio,
            "ppl_conditioned_ratio": _geo(r[cond] for r in rows) / _geo(r[cond] for r in base) if cond else None,
            "distinct2": d2, "distinct_ratio": d_ratio,
            "repeat4": float(np.mean([r["repeat4"] for r in rows])),
            "fluent_share": fl_share[0], "fluent_ci": fl_share[1:],
            "matched": metrics.matched_fluency(ppl_ratio, d_ratio),
            "degenerate": bool(ppl_ratio > DEGENERATE_PPL_FACTOR or d_ratio < DEGENERATE_DISTINCT_FACTOR)}


def cell_scores(records: Records, exp: Experiment, label: str, s: float) -> dict[str, Any]:
    rows = records.cell(exp.name, label, s)
    if not rows:
        return {}
    task = exp.task
    out: dict[str, Any] = {"n": len(rows)}
    if task.id == "refusal":
        harm = [r["score"] for r in rows if r["group"] == "harmful"]
        safe = [r["score"] for r in rows if r["group"] == "harmless"]
        out["harmful_refusal"] = metrics.bootstrap_ci(harm)
        out["harmless_refusal"] = metrics.bootstrap_ci(safe)
        out["score"] = metrics.bootstrap_diff_ci(harm, safe)
        out["n_harmful"], out["n_harmless"] = len(harm), len(safe)
    elif task.kind == "generate":
        out["score"] = metrics.bootstrap_ci([r["score"] for r in rows])
    elif task.id.startswith("ab:"):
        out["score"] = metrics.bootstrap_ci([r["p_match"] for r in rows])
    else:
        out["mc1"] = metrics.bootstrap_ci([r["mc1"] for r in rows])
        out["score"] = out["mc2"] = metrics.bootstrap_ci([r["mc2"] for r in rows])
    return out


def summarize(records: Records, exp: Experiment) -> dict[str, Any]:
    cells = []
    for arm, s in experiment_cells(exp):
        label = arm.name
        sc = cell_scores(records, exp, label, s)
        if not sc:
            cells.append({"method": label, "strength": s, "skipped": True})
            continue
        cells.append({"method": label, "strength": s, "gate": arm.flow.gate if arm.flow else "off",
                      "prompted": arm.prompted, **sc, "fluency": cell_fluency(records, exp, label, s)})
    headline = []
    base = next((c for c in cells if c["method"] == NONE and not c.get("skipped")), None)
    for arm in exp.arms():
        label = arm.name
        # every arm may fall back to the unsteered model; steering on the prompt also to the prompt alone
        zero = {NONE} | ({PROMPT} if arm.prompted else set())
        own = [c for c in cells if not c.get("skipped") and (c["method"] == label or c["method"] in zero)]
        ok = [c for c in own if c["fluency"].get("matched", c["method"] == NONE)]
        if not ok:
            continue
        best = max(ok, key=lambda c: c["score"][0])
        headline.append({"method": label, "best_score": best["score"], "strength": best["strength"], "cell": best["method"],
                         "ppl_ratio": best["fluency"].get("ppl_ratio"), "distinct_ratio": best["fluency"].get("distinct_ratio"),
                         "relevance_ratio": best["fluency"].get("ppl_conditioned_ratio"),
                         "fluent_share": best["fluency"].get("fluent_share"),
                         "gain_over_unsteered": (best["score"][0] - base["score"][0]) if base else None})
    return {"experiment": exp.name, "task": exp.task.id, "higher_is": exp.task.higher_is, "relative": exp.relative,
            "flows": [asdict(f) for f in exp.flows], "instruction": exp.instruction,
            "arms": [a.name for a in exp.arms()], "strengths": exp.strengths, "cells": cells, "headline": headline}

"""The outputs of an evaluation: report.md, results.json and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .experiment import NONE, PROMPT, Experiment
from .records import Records
from .summary import (
    FLUENT_MAX_REPEAT,
    FLUENT_PPL_FACTOR,
    MATCHED_DISTINCT_FACTOR,
    MATCHED_PPL_FACTOR,
    summarize,
)


def _ci(t: Sequence[float], digits: int = 3) -> str:
    if not t or t[0] is None or (isinstance(t[0], float) and math.isnan(t[0])):
        return "-"
    return f"{t[0]:.{digits}f} [{t[1]:.{digits}f}, {t[2]:.{digits}f}]"


def _num(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def report_markdown(summaries: list[dict[str, Any]], meta: dict[str, Any], plots: dict[str, list[str]]) -> str:
    lines = ["# Evaluation report", "",
             f"Model `{meta['model']}`, judge `{meta.get('judge') or 'none'}`, {meta['max_tokens']} new tokens, "
             f"temperature {meta['temperature']}, seed {meta['seed']}. Scores: mean with bootstrap 95 % interval. "
             f"Fluency is judged on the reply itself: the judge's perplexity of the reply alone (the perplexity "
             f"of the reply after its prompt also charges a requested change of subject; it is the relevance "
             f"column, measured with --relevance). Matched fluency: judge perplexity (geometric mean) within {MATCHED_PPL_FACTOR}x of unsteered and "
             f"distinct-2 at least {MATCHED_DISTINCT_FACTOR}x unsteered. A generation is fluent when its judge "
             f"perplexity is at most {FLUENT_PPL_FACTOR}x the unsteered median, its distinct-2 at least "
             f"{MATCHED_DISTINCT_FACTOR}x the unsteered median and at most {FLUENT_MAX_REPEAT:.0%} of its 4-grams repeat.", ""]
    for s in summaries:
        lines += [f"## {s['experiment']} (task `{s['task']}`: higher = {s['higher_is']})", ""]
        if s.get("instruction"):
            lines += [f"Prompting baseline (`{PROMPT}`): the unsteered model given the instruction \"{s['instruction']}\" "
                      f"(a system message; a line before the prompt for a base model); `{PROMPT}+METHOD` steers on top "
                      "of it. Both are judged against the unsteered, unprompted model.", ""]
        lines += ["### Best score at matched fluency", "",
                  "| method | best score [95 % CI] | at strength | judge ppl ratio | distinct-2 ratio | fluent share | relevance ppl ratio | gain over unsteered |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for h in sorted(s["headline"], key=lambda h: -h["best_score"][0]):
            lines.append(f"| {h['method']} | {_ci(h['best_score'])} | {h['strength']:g} | {_num(h['ppl_ratio'])} | "
                         f"{_num(h['distinct_ratio'])} | {_num(h['fluent_share'])} | {_num(h.get('relevance_ratio'))} | "
                         f"{_num(h['gain_over_unsteered'], '+.3f')} |")
        extra = "harmful refused | harmless refused | " if s["task"] == "refusal" else "MC1 | " if s["task"] == "truthfulqa" else ""
        lines += ["", "### Sweep", "",
                  f"| method | strength | n | score [95 % CI] | {extra}judge ppl (ratio) | relevance ppl ratio | distinct-2 (ratio) | repeat-4 | fluent share |",
                  "|---|---:|---:|---|" + "---|" * extra.count("|") + "---:|---:|---:|---:|---:|"]
        for c in s["cells"]:
            if c.get("skipped"):
                lines.append(f"| {c['method']} | {c['strength']:g} | 0 | not run (degenerate at a smaller strength) |"
                             + " |" * (extra.count("|") + 5))
                continue
            f = c["fluency"]
            ex = (f"{_ci(c['harmful_refusal'], 2)} | {_ci(c['harmless_refusal'], 2)} | " if s["task"] == "refusal"
                  else f"{_ci(c['mc1'])} | " if s["task"] == "truthfulqa" else "")
            lines.append(f"| {c['method']} | {c['strength']:g} | {c['n']} | {_ci(c['score'])} | {ex}"
                         f"{_num(f.get('ppl'), '.1f')} ({_num(f.get('ppl_ratio'))}) | {_num(f.get('ppl_conditioned_ratio'))} | "
                         f"{_num(f.get('distinct2'))} ({_num(f.get('distinct_ratio'))}) | {_num(f.get('repeat4'))} | "
                         f"{_num(f.get('fluent_share'))} |")
        lines.append("")
        lines += [f"![{p}]({p})" for p in plots.get(s["experiment"], [])]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = [c for c in summary["cells"] if not c.get("skipped")]
    base = next((c for c in cells if c["method"] == NONE), None)
    prompted = next((c for c in cells if c["method"] == PROMPT), None)
    methods = [m for m in summary.get("arms", [NONE] + [f["name"] for f in summary["flows"]]) if m not in (NONE, PROMPT)]
    stem = summary["experiment"].replace(":", "_").replace("/", "_")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    if prompted is not None:  # the prompting baseline: one setting, drawn across the sweep
        ax[0].axhline(prompted["score"][0], color="0.4", ls="--", lw=1, label=f"{PROMPT} (instruction only)")
        ax[1].plot([prompted["fluency"].get("fluent_share", 1.0)], [prompted["score"][0]], "s", color="0.4",
                   label=PROMPT)
    for i, m in enumerate(methods):
        flow_names = [f["name"] for f in summary["flows"]]
        own = m[len(PROMPT) + 1:] if m.startswith(PROMPT + "+") else m
        color = f"C{flow_names.index(own) if own in flow_names else i}"  # a flow and the flow on the prompt alike
        start = prompted if m.startswith(PROMPT + "+") else base
        cs = sorted(([start] if start else []) + [c for c in cells if c["method"] == m], key=lambda c: c["strength"])
        x = [c["strength"] for c in cs]
        y = np.array([c["score"][0] for c in cs])
        err = np.array([[c["score"][0] - c["score"][1], c["score"][2] - c["score"][0]] for c in cs]).T
        style = "--" if m.startswith(PROMPT + "+") else "-"
        ax[0].errorbar(x, y, yerr=err, marker="o", capsize=3, label=m, color=color, ls=style)
        # judge perplexity alone rewards looping text: the x axis combines it with degeneration
        fx = [c["fluency"].get("fluent_share", 1.0) for c in cs]
        ax[1].plot(fx, y, "o" + style, label=m, color=color)
        for c, xv, yv in zip(cs, fx, y):
            if c["fluency"].get("matched"):
                ax[1].plot([xv], [yv], "o", ms=11, mfc="none", mec="k", mew=0.8)
    ax[0].set_xlabel("strength (x flow default)" if summary.get("relative") else "strength")
    ax[0].set_ylabel(f"score ({summary['higher_is']})")
    ax[0].set_title(f"{summary['experiment']}: behaviour vs strength")
    ax[0].legend(fontsize=8)
    ax[1].set_xlim(1.05, -0.05)
    ax[1].set_xlabel("share of fluent generations (less fluent to the right)")
    ax[1].set_title("behaviour vs fluency (ringed: matched fluency)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    name = f"{stem}.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def write_outputs(records: Records, experiments: list[Experiment], out_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    summaries = [summarize(records, e) for e in experiments]
    plots = {s["experiment"]: plot(s, out_dir) for s in summaries}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "experiments": summaries}, indent=1, default=float))
    (out_dir / "report.md").write_text(report_markdown(summaries, meta, plots))
    return summaries

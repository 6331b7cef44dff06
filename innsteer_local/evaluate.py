"""`innsteer-local eval`: steering methods side by side over strength sweeps, with fluency.

Every answer is one line of DIR/records.jsonl, written as soon as it exists, so a killed run
continues where it stopped. Summaries (bootstrap 95 % intervals), report.md, results.json and
the plots are rebuilt from the records at the end of every run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from . import metrics
from .collect import Example, chat_example, render_chat, text_example
from .errors import InnsteerError
from .eval_tasks import Item, Task

# Matched fluency (the headline): aggregate judge perplexity within this factor of unsteered,
# and mean distinct-2 at least this share of unsteered.
MATCHED_PPL_FACTOR = 1.25
MATCHED_DISTINCT_FACTOR = 0.8
# One generation is fluent when its judge perplexity is at most twice the unsteered median, its
# distinct-2 at least 0.8x the unsteered median and it is not mostly repeated 4-grams: perplexity
# alone rewards looping text (a judge finds repetition very predictable).
FLUENT_PPL_FACTOR = 2.0
FLUENT_MAX_REPEAT = 0.25
# A sweep stops going further out in strength (same sign) once a cell is this far past matched
# fluency: larger strengths only cost time (they cannot enter the headline).
DEGENERATE_PPL_FACTOR = 2.0
DEGENERATE_DISTINCT_FACTOR = 0.6
NONE = "none"


@dataclass
class FlowSpec:
    """One method in the comparison: a flow file applied with a runtime gate."""

    label: str
    path: str
    gate: str = "off"


def parse_flow_spec(spec: str, resolve: Callable[[str], str] = str) -> FlowSpec:
    """'[LABEL=]PATH[:GATE]', GATE one of off|density|target: 'gated=refusal.gguf:target'."""
    label, eq, rest = spec.partition("=")
    if not eq:
        label, rest = "", spec
    path, colon, gate = rest.rpartition(":")
    if not colon or gate not in ("off", "density", "target"):
        path, gate = rest, "off"
    if not path:
        raise InnsteerError(f"--flow '{spec}' names no file")
    if not label:
        label = Path(path).stem + ("" if gate == "off" else f"+{gate}")
    if label == NONE:
        raise InnsteerError("'none' is reserved for the unsteered model; choose another label")
    return FlowSpec(label=label, path=resolve(path), gate=gate)


@dataclass
class Experiment:
    """One task run over a set of flows and strengths."""

    name: str
    task: Task
    flows: list[FlowSpec]
    strengths: list[float]
    limit: Optional[int] = None
    relative: bool = False  # strengths are multiples of each flow's own default strength


@dataclass
class EvalConfig:
    max_tokens: int = 40
    temperature: float = 0.0
    seed: int = 0
    probe_prompts: int = 8  # neutral prompts generated to measure fluency for likelihood tasks
    prune: bool = True  # stop a sweep direction once a cell has degenerated
    chat: bool = True  # chat template (instruct models) or plain completions (base models)


class Records:
    """Append-only JSONL store of finished answers, keyed by (experiment, flow, strength, item)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, float, str], dict[str, Any]] = {}
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a kill cut the last answer short: drop it
                data = data[: data.rfind(b"\n") + 1]
                path.write_bytes(data)
            for line in data.decode("utf-8").splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill: that answer is simply redone
                self.rows[self.key(r["exp"], r["flow"], r["strength"], r["item"])] = r
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def key(exp: str, flow: str, strength: float, item: str) -> tuple[str, str, float, str]:
        return exp, flow, round(float(strength), 6), item

    def has(self, exp: str, flow: str, strength: float, item: str) -> bool:
        return self.key(exp, flow, strength, item) in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[self.key(row["exp"], row["flow"], row["strength"], row["item"])] = row
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def cell(self, exp: str, flow: str, strength: float) -> list[dict[str, Any]]:
        s = round(float(strength), 6)
        return [r for k, r in self.rows.items() if k[0] == exp and k[1] == flow and k[2] == s]

    def close(self) -> None:
        self._fh.close()


class Progress:
    """What the runner reports; the CLI draws bars from it."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...
    def message(self, text: str) -> None: ...


# ---- the models ----------------------------------------------------------------------------------


class Scorer:
    """Log-likelihoods of text under a plain (unsteered) llama.cpp model."""

    def __init__(self, model_path: str, n_ctx: int, chat: bool, threads: Optional[int] = None):
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs some notices even when not verbose
            self.llm = Llama(model_path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                             n_threads=threads, n_threads_batch=threads)
        self.chat = chat

    def reply_perplexity(self, prompt: str, reply: str) -> float:
        if not reply.strip():
            return math.nan
        return metrics.perplexity(example_logprobs(self.llm, reply_example(self.llm, prompt, reply, self.chat)))

    def close(self) -> None:
        self.llm.close()


def plain_prompt(prompt: str) -> str:
    """How base models (no chat template) are asked: a plain User/Assistant transcript."""
    return f"User: {prompt}\nAssistant:"


def reply_example(llm: Any, prompt: str, reply: str, chat: bool) -> Example:
    """The prompt as the model is asked it, followed by the reply (the scored tokens)."""
    return chat_example(llm, prompt, reply) if chat else text_example(llm, plain_prompt(prompt), " " + reply.lstrip())


def example_logprobs(llm: Any, ex: Example) -> np.ndarray:
    """log p of each completion token of the example, from one llama.cpp pass with all logits."""
    tokens, start = ex.tokens, ex.start
    if len(tokens) > llm.n_ctx():  # keep the end: the completion is what is scored
        drop = len(tokens) - llm.n_ctx()
        tokens, start = tokens[drop:], max(1, start - drop)
    llm.reset()
    llm.eval(tokens)
    return metrics.token_logprobs(np.asarray(llm.scores[: len(tokens)]), tokens, start)


def generate_reply(llm: Any, prompt: str, cfg: EvalConfig, seed: int) -> tuple[str, int]:
    """(reply text, generated tokens) from the steered model, stopping at end of turn."""
    import llama_cpp

    text = render_chat(llm, [{"role": "user", "content": prompt}]) if cfg.chat else plain_prompt(prompt)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=cfg.chat)
    llm.set_seed(seed)
    out: list[int] = []
    vocab = llm._model.vocab
    for tok in llm.generate(tokens, temp=cfg.temperature, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                            reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        out.append(int(tok))
        if len(out) >= cfg.max_tokens:
            break
    reply = llm.detokenize(out).decode("utf-8", errors="replace")
    if not cfg.chat:  # a base model continues the transcript: keep its first turn only
        reply = reply.split("\nUser:")[0]
    return reply.strip(), len(out)


# ---- the runner --------------------------------------------------------------------------------------


class Runner:
    """Loads the steered model, the unsteered scorer and the judge once, then runs experiments."""

    def __init__(self, model_path: str, judge_path: Optional[str], out_dir: Path, cfg: EvalConfig,
                 progress: Optional[Progress] = None, threads: Optional[int] = None, n_ctx: int = 1024):
        from .steered import SteeredLlama
        import os

        self.cfg = cfg
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        n = threads or os.cpu_count() or 1
        self.llm = SteeredLlama(model_path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=cfg.seed,
                                n_threads=n, n_threads_batch=n)
        self.self_scorer = Scorer(model_path, n_ctx, cfg.chat, n)
        # the judge reads plain text: it is often a base model of another family
        self.judge = Scorer(judge_path, 512, False, n) if judge_path else None
        self.records = Records(out_dir / "records.jsonl")
        self.progress = progress or Progress()
        self._attached: dict[str, Any] = {}

    def close(self) -> None:
        self.records.close()
        self.self_scorer.close()
        if self.judge:
            self.judge.close()
        self.llm.close()

    def check_flow(self, spec: FlowSpec) -> None:
        """Loads a flow now, so a wrong file or model fails before any answer is computed."""
        self._steer(spec, 0.0)
        self._steer(None, 0.0)

    # -- steering --
    def _steer(self, flow: Optional[FlowSpec], strength: float, relative: bool = False) -> float:
        """Exactly this flow at this strength, every other flow off; returns the strength applied."""
        if flow is not None and flow.path not in self._attached:
            self._attached[flow.path] = self.llm.add_flow(flow.path, strength=0.0)
        applied = 0.0
        for path, att in self._attached.items():
            if flow is not None and path == flow.path:
                applied = strength * att.flow.default_strength if relative else strength
                self.llm.set_gate(flow.gate, att)
                self.llm.set_strength(applied, att)
                self.llm.enable(att)
            else:
                self.llm.disable(att)
        return applied

    # -- one answer --
    def _generation_record(self, item: Item, scorer: Optional[Callable[[str], float]]) -> dict[str, Any]:
        seed = self.cfg.seed + (hash_id(item.id) if self.cfg.temperature > 0 else 0)
        reply, n_tok = generate_reply(self.llm, item.prompt, self.cfg, seed)
        row: dict[str, Any] = {"text": reply, "n_tokens": n_tok,
                               "distinct2": metrics.distinct_n(reply, 2),
                               "repeat4": metrics.repeated_ngram_share(reply, 4),
                               "ppl_self": self.self_scorer.reply_perplexity(item.prompt, reply)}
        if self.judge:
            row["ppl_judge"] = self.judge.reply_perplexity(item.prompt, reply)
        if scorer is not None:
            row["score"] = scorer(reply)
        return row

    def _loglik_record(self, task: Task, item: Item) -> dict[str, Any]:
        def ll(answer: str) -> float:
            return float(example_logprobs(self.llm, reply_example(self.llm, item.prompt, answer, self.cfg.chat)).sum())

        if task.id.startswith("ab:"):
            lm, lo = ll(item.extra["match"]), ll(item.extra["other"])
            return {"p_match": metrics.ab_matching_probability(lm, lo)}
        answers = sorted(set(item.extra["mc1"]) | set(item.extra["mc2"]))
        lls = {a: ll(a) for a in answers}
        m1, m2 = item.extra["mc1"], item.extra["mc2"]
        return {"mc1": metrics.mc1([lls[a] for a in m1], [m1[a] for a in m1]),
                "mc2": metrics.mc2([lls[a] for a in m2], [m2[a] for a in m2])}

    # -- experiments --
    def run(self, exp: Experiment) -> None:
        from .scorers import make_scorer

        task = exp.task
        items = task.limited(exp.limit)
        scorer = make_scorer(task.scorer, task.description, task.topic_words) if task.kind == "generate" else None
        probe = probe_items(self.cfg.probe_prompts) if task.kind == "loglik" else []
        cells = sweep_cells(exp.flows, exp.strengths)
        total = sum(1 for f, s in cells for it in items + probe if not self.records.has(
            exp.name if it in items else exp.name + "/fluency", label_of(f), s, it.id))
        self.progress.start(f"{exp.name}", total)
        pruned: set[tuple[str, int]] = set()
        for flow, s in cells:
            label = label_of(flow)
            if (label, int(np.sign(s))) in pruned:
                continue
            applied = self._steer(flow, s, exp.relative)
            for group, its in ((exp.name, items), (exp.name + "/fluency", probe)):
                for it in its:
                    if self.records.has(group, label, s, it.id):
                        continue
                    t0 = time.perf_counter()
                    if group == exp.name and task.kind == "loglik":
                        row = self._loglik_record(task, it)
                    else:
                        row = self._generation_record(it, scorer if group == exp.name else None)
                    row.update(exp=group, flow=label, strength=s, applied_strength=applied, item=it.id, group=it.group,
                               seconds=round(time.perf_counter() - t0, 3))
                    self.records.add(row)
                    self.progress.advance()
            if s != 0 and self.cfg.prune:
                fl = cell_fluency(self.records, exp, label, s)
                if fl.get("degenerate"):
                    pruned.add((label, int(np.sign(s))))
                    self.progress.message(f"{exp.name}: {label} degenerate at strength {s:g} "
                                          f"(judge ppl x{fl['ppl_ratio']:.2f}, distinct-2 x{fl['distinct_ratio']:.2f}); "
                                          "larger strengths of this sign skipped")
        self._steer(None, 0.0)
        self.progress.finish()


def hash_id(text: str) -> int:
    """A stable per-item seed offset (Python's hash() changes between runs)."""
    h = 2166136261
    for ch in text.encode("utf-8"):
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h % 100003


def label_of(flow: Optional[FlowSpec]) -> str:
    return NONE if flow is None else flow.label


def sweep_cells(flows: Sequence[FlowSpec], strengths: Sequence[float]) -> list[tuple[Optional[FlowSpec], float]]:
    """Unsteered once, then each flow outward from 0 (so pruning can stop a direction)."""
    cells: list[tuple[Optional[FlowSpec], float]] = [(None, 0.0)]
    nonzero = sorted({float(s) for s in strengths if s != 0}, key=lambda s: (abs(s), s))
    for f in flows:
        cells += [(f, s) for s in nonzero]
    return cells


def probe_items(n: int) -> list[Item]:
    from .eval_tasks import _prompt_list, builtin_prompts

    prompts, _ = _prompt_list(builtin_prompts("neutral"))
    # the probe takes prompts from the end of the list, open:neutral tasks from the start
    return [Item(id=f"probe-{i}", prompt=p) for i, p in enumerate(prompts[::-1][:n])]


# ---- summaries ---------------------------------------------------------------------------------------


def _geo(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x) and x > 0], np.float64)
    return float(np.exp(np.log(v).mean())) if v.size else math.nan


def _generation_rows(records: Records, exp: Experiment, label: str, s: float) -> list[dict[str, Any]]:
    name = exp.name if exp.task.kind == "generate" else exp.name + "/fluency"
    return records.cell(name, label, s)


def cell_fluency(records: Records, exp: Experiment, label: str, s: float) -> dict[str, Any]:
    rows = _generation_rows(records, exp, label, s)
    base = _generation_rows(records, exp, NONE, 0.0)
    if not rows or not base:
        return {}
    key = "ppl_judge" if "ppl_judge" in base[0] else "ppl_self"
    base_ppl, base_med = _geo(r[key] for r in base), float(np.nanmedian([r[key] for r in base if r[key] is not None]))
    base_d2 = float(np.mean([r["distinct2"] for r in base]))
    base_d2_med = float(np.median([r["distinct2"] for r in base]))
    fluent = [float(r["text"].strip() != "" and r[key] is not None and math.isfinite(r[key])
                    and r[key] <= FLUENT_PPL_FACTOR * base_med
                    and r["distinct2"] >= MATCHED_DISTINCT_FACTOR * base_d2_med
                    and r["repeat4"] <= FLUENT_MAX_REPEAT) for r in rows]
    ppl, d2 = _geo(r[key] for r in rows), float(np.mean([r["distinct2"] for r in rows]))
    ppl_ratio, d_ratio = ppl / base_ppl, d2 / base_d2 if base_d2 > 0 else math.nan
    fl_share = metrics.bootstrap_ci(fluent)
    return {"judge": key, "n": len(rows), "ppl": ppl, "ppl_ratio": ppl_ratio,
            "ppl_self": _geo(r["ppl_self"] for r in rows),
            "distinct2": d2, "distinct_ratio": d_ratio,
            "repeat4": float(np.mean([r["repeat4"] for r in rows])),
            "fluent_share": fl_share[0], "fluent_ci": fl_share[1:],
            "matched": bool(ppl_ratio <= MATCHED_PPL_FACTOR and d_ratio >= MATCHED_DISTINCT_FACTOR),
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
    for flow, s in sweep_cells(exp.flows, exp.strengths):
        label = label_of(flow)
        sc = cell_scores(records, exp, label, s)
        if not sc:
            cells.append({"method": label, "strength": s, "skipped": True})
            continue
        cells.append({"method": label, "strength": s, "gate": flow.gate if flow else "off", **sc,
                      "fluency": cell_fluency(records, exp, label, s)})
    headline = []
    base = next((c for c in cells if c["method"] == NONE and not c.get("skipped")), None)
    for label in [NONE] + [f.label for f in exp.flows]:
        own = [c for c in cells if not c.get("skipped") and (c["method"] == label or (c["method"] == NONE and label != NONE))]
        ok = [c for c in own if c["fluency"].get("matched", c["method"] == NONE)]
        if not ok:
            continue
        best = max(ok, key=lambda c: c["score"][0])
        headline.append({"method": label, "best_score": best["score"], "strength": best["strength"],
                         "ppl_ratio": best["fluency"].get("ppl_ratio"), "distinct_ratio": best["fluency"].get("distinct_ratio"),
                         "fluent_share": best["fluency"].get("fluent_share"),
                         "gain_over_unsteered": (best["score"][0] - base["score"][0]) if base else None})
    return {"experiment": exp.name, "task": exp.task.id, "higher_is": exp.task.higher_is, "relative": exp.relative,
            "flows": [asdict(f) for f in exp.flows], "strengths": exp.strengths, "cells": cells, "headline": headline}


# ---- report ------------------------------------------------------------------------------------------


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
             f"Matched fluency: judge perplexity (geometric mean) within {MATCHED_PPL_FACTOR}x of unsteered and "
             f"distinct-2 at least {MATCHED_DISTINCT_FACTOR}x unsteered. A generation is fluent when its judge "
             f"perplexity is at most {FLUENT_PPL_FACTOR}x the unsteered median, its distinct-2 at least "
             f"{MATCHED_DISTINCT_FACTOR}x the unsteered median and at most {FLUENT_MAX_REPEAT:.0%} of its 4-grams repeat.", ""]
    for s in summaries:
        lines += [f"## {s['experiment']} (task `{s['task']}`: higher = {s['higher_is']})", "",
                  "### Best score at matched fluency", "",
                  "| method | best score [95 % CI] | at strength | judge ppl ratio | distinct-2 ratio | fluent share | gain over unsteered |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for h in sorted(s["headline"], key=lambda h: -h["best_score"][0]):
            lines.append(f"| {h['method']} | {_ci(h['best_score'])} | {h['strength']:g} | {_num(h['ppl_ratio'])} | "
                         f"{_num(h['distinct_ratio'])} | {_num(h['fluent_share'])} | {_num(h['gain_over_unsteered'], '+.3f')} |")
        extra = "harmful refused | harmless refused | " if s["task"] == "refusal" else "MC1 | " if s["task"] == "truthfulqa" else ""
        lines += ["", "### Sweep", "",
                  f"| method | strength | n | score [95 % CI] | {extra}judge ppl (ratio) | self ppl | distinct-2 (ratio) | repeat-4 | fluent share |",
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
                         f"{_num(f.get('ppl'), '.1f')} ({_num(f.get('ppl_ratio'))}) | {_num(f.get('ppl_self'), '.1f')} | "
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
    methods = [f["label"] for f in summary["flows"]]
    stem = summary["experiment"].replace(":", "_").replace("/", "_")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(methods):
        color = f"C{i}"
        cs = sorted(([base] if base else []) + [c for c in cells if c["method"] == m], key=lambda c: c["strength"])
        x = [c["strength"] for c in cs]
        y = np.array([c["score"][0] for c in cs])
        err = np.array([[c["score"][0] - c["score"][1], c["score"][2] - c["score"][0]] for c in cs]).T
        ax[0].errorbar(x, y, yerr=err, marker="o", capsize=3, label=m, color=color)
        # judge perplexity alone rewards looping text: the x axis combines it with degeneration
        fx = [c["fluency"].get("fluent_share", 1.0) for c in cs]
        ax[1].plot(fx, y, "o-", label=m, color=color)
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


def check_config(out_dir: Path, meta: dict[str, Any]) -> None:
    """A resumed run must answer with the same model and generation settings."""
    path = out_dir / "config.json"
    keys = ("model_sha256", "judge_sha256", "max_tokens", "temperature", "seed", "chat")
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in keys if old.get(k) != meta.get(k)]
        if diff:
            raise InnsteerError(f"{out_dir} holds results made with other settings ({', '.join(diff)}: "
                                f"{', '.join(f'{old.get(k)!r} -> {meta.get(k)!r}' for k in diff)}); "
                                "use a new -o directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: meta.get(k) for k in keys} | {"model": meta.get("model"), "judge": meta.get("judge")}, indent=1))

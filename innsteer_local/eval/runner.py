"""`innsteer-local eval`: steering methods side by side over strength sweeps, with fluency.

Every answer is one line of DIR/records.jsonl, written as soon as it exists, so a killed run
continues where it stopped (records.py); summary.py turns records into scores and report.py
into report.md, results.json and plots, rebuilt at the end of every run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..runtime.flowspec import FlowSpec
from ..runtime.prompts import Example, plain_prompt, render_chat, reply_example
from . import metrics
from .experiment import Experiment, label_of, sweep_cells
from .records import Records
from .summary import cell_fluency
from .tasks import Item, Task


@dataclass
class EvalConfig:
    max_tokens: int = 40
    temperature: float = 0.0
    seed: int = 0
    probe_prompts: int = 8  # neutral prompts generated to measure fluency for likelihood tasks
    prune: bool = True  # stop a sweep direction once a cell has degenerated
    chat: bool = True  # chat template (instruct models) or plain completions (base models)


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
        """Perplexity of the reply after the prompt (also charges a reply for leaving the subject)."""
        if not reply.strip():
            return math.nan
        return metrics.perplexity(example_logprobs(self.llm, reply_example(self.llm, prompt, reply, self.chat)))

    def text_perplexity(self, text: str) -> float:
        """Perplexity of the text alone, as plain text: how fluent it reads, whatever it answers."""
        tokens = self.llm.tokenize(text.strip().encode("utf-8"), add_bos=True, special=False)
        if len(tokens) < 2:
            return math.nan
        return metrics.perplexity(example_logprobs(self.llm, Example(tokens=tokens, start=1)))

    def close(self) -> None:
        self.llm.close()


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
        import os

        from ..runtime.steered import SteeredLlama

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
                unit = flow.strength if flow.strength is not None else att.flow.default_strength
                applied = strength * unit if relative else strength
                self.llm.set_gate(flow.gate or "off", att)
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
                               "ppl_self": self.self_scorer.reply_perplexity(item.prompt, reply),
                               "ppl_self_alone": self.self_scorer.text_perplexity(reply)}
        if self.judge:
            row["ppl_judge"] = self.judge.reply_perplexity(item.prompt, reply)
            row["ppl_judge_alone"] = self.judge.text_perplexity(reply)
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


def probe_items(n: int) -> list[Item]:
    from .tasks import _prompt_list, builtin_prompts

    prompts, _ = _prompt_list(builtin_prompts("neutral"))
    # the probe takes prompts from the end of the list, open:neutral tasks from the start
    return [Item(id=f"probe-{i}", prompt=p) for i, p in enumerate(prompts[::-1][:n])]

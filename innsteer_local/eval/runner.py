"""`innsteer-local eval`: steering methods side by side over strength sweeps, with fluency.

Every answer is one line of DIR/records.jsonl, written as soon as it and the answers planned
before it exist, so a killed run continues where it stopped (records.py); summary.py turns
records into scores and report.py into report.md, results.json and plots, rebuilt at the end of
every run.

Everything runs on the batched engine (runtime/engine.py): each answer is one sequence that
carries its own steering, so the settings of a sweep run side by side. A sweep goes outward in
waves: the unsteered cell together with every flow's smallest strength, then every flow's next
strength, and so on; after each wave a cell that has degenerated stops its flow's larger
strengths of the same sign (the pruning decisions are those of a cell-by-cell sweep, since a
cell only ever waits for smaller strengths of its own flow and sign, and for the unsteered cell).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..runtime.engine import EngineFlow, Job, Sampling, Steer
from ..runtime.flowspec import FlowSpec
from ..runtime.jobs import BATCH_PARALLEL, Driver, alone_score, fit, load_judge, open_engine, perplexity, reply_score
from ..runtime.prompts import reply_example
from ..measure import metrics
from ..progress import Progress
from .experiment import Arm, Experiment, experiment_cells
from .records import Records
from .summary import cell_fluency
from .tasks import Item, Task
from ..errors import InvalidArgument

JUDGE_CTX = 512  # tokens per judged text (prompt + reply)
# sampling when --temperature > 0 (greedy ignores it)
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


@dataclass
class EvalConfig:
    max_tokens: int = 40
    temperature: float = 0.0
    seed: int = 0
    probe_prompts: int = 8  # neutral prompts generated to measure fluency for likelihood tasks
    prune: bool = True  # stop a sweep direction once a cell has degenerated
    parallel: int = BATCH_PARALLEL  # sequences decoded together
    chat: Optional[bool] = None  # the chat template or plain completions; None: whether the model has a template
    relevance: bool = False  # also the judge's perplexity of each reply after its prompt


def sampling_for(cfg: EvalConfig, item: Item) -> Sampling:
    """How an answer is generated: greedy, or sampled with the item's own seed (hash_id)."""
    seed = cfg.seed + (hash_id(item.id) if cfg.temperature > 0 else 0)
    return Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P,
                    repeat_penalty=1.0, seed=seed)


def answer_job(engine: Any, item: Item, cfg: EvalConfig, steering: list[Steer], system: str = "",
               chat: Optional[bool] = None) -> Job:
    """The engine job that writes one answer (prompts.prompt_text, cut by job.reply); system is the
    instruction of a prompted arm; chat defaults to whether the engine's model has a chat template."""
    return engine.reply(item.prompt, system=system, sampling=sampling_for(cfg, item), steering=steering, chat=chat)


def waves(cells: list[tuple[Arm, float]]) -> list[list[tuple[Arm, float]]]:
    """The cells of a sweep (sweep_cells order) in the waves they run in: the unsteered (and the
    prompted) cell with the smallest strength of every flow, then each larger strength (both
    signs) of every flow."""
    base = [c for c in cells if c[0].flow is None]
    steered = [c for c in cells if c[0].flow is not None]
    sizes = sorted({abs(s) for _, s in steered})
    out = [[c for c in steered if abs(c[1]) == m] for m in sizes] or [[]]
    out[0] = base + out[0]
    return out


@dataclass
class _Pending:
    """One record being computed: written once its jobs are done (and the ones before it)."""

    row: dict[str, Any]
    left: int = 0
    started: bool = False
    finish: Optional[Callable[["_Pending"], None]] = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.started and self.left == 0


# ---- the runner --------------------------------------------------------------------------------------


class Runner:
    """Loads the steered model and the judge once, with one engine each, then runs experiments.
    The unsteered scoring (the model's own perplexity of a reply) runs on the steered model's
    engine, as sequences without steering."""

    def __init__(self, model_path: str, judge_path: Optional[str], out_dir: Path, cfg: EvalConfig,
                 progress: Optional[Progress] = None, threads: Optional[int] = None, n_ctx: int = 1024):
        import os

        from ..runtime.steered import SteeredLlama

        self.cfg = cfg
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        n = threads or os.cpu_count() or 1
        self.llm = SteeredLlama(model_path, n_ctx=n_ctx, verbose=False, seed=cfg.seed, n_threads=n, n_threads_batch=n)
        self.engine = open_engine(self.llm, n_ctx, cfg.parallel)
        self.chat = self.engine.chat if cfg.chat is None else cfg.chat
        self.judge_llm: Any = None
        self.judge: Any = None
        if judge_path:
            self.judge_llm = load_judge(judge_path, JUDGE_CTX, n)
            self.judge = open_engine(self.judge_llm, JUDGE_CTX, cfg.parallel)
        self.records = Records(out_dir / "records.jsonl")
        self.progress = progress or Progress()
        self._done = 0  # records written in the current experiment (its bar)
        self._flows: dict[str, EngineFlow] = {}

    def close(self) -> None:
        self.records.close()
        for x in (self.judge, self.judge_llm, self.engine, self.llm):
            if x is not None:
                x.close()

    # -- steering --
    def _flow(self, spec: FlowSpec) -> EngineFlow:
        if spec.path not in self._flows:
            self._flows[spec.path] = self.engine.add_flow(spec.path)
        return self._flows[spec.path]

    def check_flow(self, spec: FlowSpec) -> None:
        """Loads a flow now, so a wrong file, model or gate fails before any answer is computed."""
        flow = self._flow(spec)
        gate = spec.gate or "off"
        if gate != "off" and not flow.info.has_gate:
            raise InvalidArgument(f"{spec.path} carries no gate parameters, so gate '{gate}' is not available "
                             "(train it with this version, or use gate 'off')")

    def steering(self, flow: Optional[FlowSpec], strength: float, relative: bool = False) -> tuple[list[Steer], float]:
        """The steering of one setting (this flow at this strength; each sequence carries its own,
        so every other flow is off) and the strength applied: with relative strengths a multiple of
        the spec's :STRENGTH, else of the flow's own default strength."""
        if flow is None:
            return [], 0.0
        self.check_flow(flow)
        ef = self._flows[flow.path]
        unit = flow.strength if flow.strength is not None else ef.info.default_strength
        applied = strength * unit if relative else strength
        return [Steer(ef, applied, flow.gate or "off")], applied

    # -- one answer --
    def _generation(self, driver: Driver, p: _Pending, item: Item, steering: list[Steer],
                    scorer: Optional[Callable[[str], float]], system: str = "") -> None:
        cfg, row = self.cfg, p.row
        # fluency needs the judge's perplexity of the reply alone (the model's own without a judge);
        # relevance (the reply after its prompt) costs as much again, so it is measured on request
        judged = "ppl_judge" if self.judge else "ppl_self"
        keys = [judged + "_alone"] + ([judged] if cfg.relevance else [])
        row.update(text="", n_tokens=0, distinct2=0.0, repeat4=0.0, **{k: math.nan for k in keys})
        if scorer is not None:
            row["score"] = math.nan

        def written(job: Job) -> None:
            reply = job.reply
            row.update(text=reply, n_tokens=len(job.tokens), distinct2=metrics.distinct_n(reply, 2),
                       repeat4=metrics.repeated_ngram_share(reply, 4))
            engine, chat = (self.judge, False) if self.judge else (self.engine, self.chat)
            jobs = {judged + "_alone": (engine, alone_score(engine, reply))}
            if cfg.relevance:
                jobs[judged] = (engine, reply_score(engine, item.prompt, reply, chat))
            if scorer is not None:
                row["score"] = scorer(reply)
            for key, (engine, sj) in jobs.items():
                if sj is not None:
                    p.left += 1
                    driver.submit(engine, sj, lambda j, key=key: self._scored(p, key, perplexity(j)))
            p.left -= 1

        p.left, p.started = 1, True
        driver.submit(self.engine, answer_job(self.engine, item, cfg, steering, system, self.chat), written)

    @staticmethod
    def _scored(p: _Pending, key: str, value: float) -> None:
        p.row[key] = value
        p.left -= 1

    def _loglik(self, driver: Driver, p: _Pending, task: Task, item: Item, steering: list[Steer],
                system: str = "") -> None:
        ab = task.id.startswith("ab:")
        answers = list(dict.fromkeys([item.extra["match"], item.extra["other"]] if ab
                                     else sorted(set(item.extra["mc1"]) | set(item.extra["mc2"]))))
        p.row.update({"p_match": math.nan} if ab else {"mc1": math.nan, "mc2": math.nan})
        lls: dict[str, float] = {}

        def scored(answer: str, job: Job) -> None:
            lls[answer] = float(np.sum(np.asarray(job.logprobs, np.float64)))
            p.left -= 1
            if p.left:
                return
            if ab:
                p.row["p_match"] = metrics.ab_matching_probability(lls[item.extra["match"]], lls[item.extra["other"]])
                return
            m1, m2 = item.extra["mc1"], item.extra["mc2"]
            p.row.update(mc1=metrics.mc1([lls[a] for a in m1], [m1[a] for a in m1]),
                         mc2=metrics.mc2([lls[a] for a in m2], [m2[a] for a in m2]))

        p.left, p.started = len(answers), True
        for a in answers:
            ex = fit(reply_example(self.llm, item.prompt, a, self.chat, system), self.engine.n_ctx_seq)
            driver.submit(self.engine, self.engine.score(ex, steering), lambda j, a=a: scored(a, j))

    # -- experiments --
    def run(self, exp: Experiment) -> None:
        from ..measure.scorers import make_scorer

        task = exp.task
        items = task.limited(exp.limit)
        scorer = make_scorer(task.scorer, task.description, task.topic_words) if task.kind == "generate" else None
        probe = probe_items(self.cfg.probe_prompts) if task.kind == "loglik" else []
        groups = ((exp.name, items), (exp.name + "/fluency", probe))
        cells = experiment_cells(exp)
        total = sum(1 for arm, s in cells for it in items + probe if not self.records.has(
            exp.name if it in items else exp.name + "/fluency", arm.name, s, it.id))
        self.progress.phase(exp.name, total)
        self._done = 0
        pruned: set[tuple[str, int]] = set()
        for wave in waves(cells):
            todo = [(arm, s) for arm, s in wave if (arm.name, int(np.sign(s))) not in pruned]
            self._run_cells(exp, task, todo, groups, scorer)
            for arm, s in todo:
                if s == 0 or not self.cfg.prune:
                    continue
                label = arm.name
                fl = cell_fluency(self.records, exp, label, s)
                if fl.get("degenerate"):
                    pruned.add((label, int(np.sign(s))))
                    self.progress.message(f"{exp.name}: {label} degenerate at strength {s:g} "
                                          f"(judge ppl x{fl['ppl_ratio']:.2f}, distinct-2 x{fl['distinct_ratio']:.2f}); "
                                          "larger strengths of this sign skipped")
        self.progress.finish()

    def _run_cells(self, exp: Experiment, task: Task, cells: list[tuple[Arm, float]],
                   groups: tuple[tuple[str, list[Item]], ...], scorer: Optional[Callable[[str], float]]) -> None:
        """Every missing answer of these cells as one batch; records are written in cell, group and
        item order as they complete (each with its share of the wall time)."""
        driver = Driver(self.engine, *([self.judge] if self.judge else []))
        plan: list[_Pending] = []
        for arm, s in cells:
            label = arm.name
            steering, applied = self.steering(arm.flow, s, exp.relative)
            system = exp.instruction if arm.prompted else ""
            for group, its in groups:
                for it in its:
                    if self.records.has(group, label, s, it.id):
                        continue
                    p = _Pending(row={})
                    plan.append(p)
                    if group == exp.name and task.kind == "loglik":
                        self._loglik(driver, p, task, it, steering, system)
                    else:
                        self._generation(driver, p, it, steering, scorer if group == exp.name else None, system)
                    p.row.update(exp=group, flow=label, strength=s, applied_strength=applied, item=it.id,
                                 group=it.group)
        if not plan:
            return
        written = 0
        clock = time.perf_counter()

        def flush(_: Any = None) -> None:
            nonlocal written, clock
            n = written
            while n < len(plan) and plan[n].ready:
                n += 1
            if n == written:
                return
            now = time.perf_counter()
            share = (now - clock) / (n - written)
            for p in plan[written:n]:
                p.row["seconds"] = round(share, 3)
                self.records.add(p.row)
                self._done += 1
                self.progress.update(self._done)
            written, clock = n, now

        driver.run(after=flush)
        flush()


def unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


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

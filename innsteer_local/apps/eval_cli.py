"""The `innsteer-local eval` command (registered in cli.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import click

from ..eval.experiment import NONE
from ..eval.suites import QUICK_MAX_TOKENS, SUITES
from ..measure.scorers import SCORERS
from ..runtime import registry
from ..runtime.flowspec import FlowSpec, parse_flow_spec
from . import options
from .progress_bar import BarProgress


TASK_STRENGTHS = (0.0, 1.0, 2.0, 3.0, 4.0)  # the sweep of --task without --strengths
SUITE_LAYER = {30: 15}  # the layer a suite trains at, by the model's layer count; else half the layers


def _eval_config() -> Any:
    from ..eval.runner import EvalConfig

    return EvalConfig()


def parse_strengths(text: str) -> list[float]:
    import math

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of numbers", param_hint="--strengths") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise click.BadParameter("give finite strengths, e.g. 0,0.5,1,2", param_hint="--strengths")
    return sorted(set(values) | {0.0}, key=lambda v: (abs(v), v))


def _sha256(path: Path) -> str:
    """The registry's checksum when the file is a registry model, else a hash of size + head."""
    for e in registry.entries().values():
        if e.cached_path.resolve() == path.resolve():
            return e.sha256
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


def eval_flow(value: str, model_key: Optional[str], relative: bool) -> FlowSpec:
    """An --flow of eval: the label is NAME (default: the file's stem, +GATE when gated); a
    :STRENGTH sets the unit that --relative strengths multiply (default: the flow's own)."""
    try:
        spec = parse_flow_spec(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--flow") from None
    if spec.strength is not None and not relative:
        raise click.BadParameter(f"'{value}': eval sweeps --strengths itself; FILE:STRENGTH only sets the unit of "
                                 "--relative strengths", param_hint="--flow")
    if spec.name == NONE:
        raise click.BadParameter("'none' is reserved for the unsteered model; choose another NAME", param_hint="--flow")
    name = spec.name
    if name == Path(spec.path).stem and spec.gate not in (None, "off"):
        name += f"+{spec.gate}"
    return FlowSpec(path=str(registry.resolve_flow(spec.path, model_key)), name=name, strength=spec.strength,
                    gate=spec.gate or "off")


@click.command("eval")
@options.model
@options.flows
@click.option("--task", default=None, help="ab:PATH | truthfulqa[:PATH] | open:PATH (or open:neutral) | refusal")
@click.option("--scorer", type=click.Choice(SCORERS), default=None, help="how open: generations are scored")
@click.option("--description", default="", help="behaviour description for --scorer similarity")
@click.option("--topic-words", default="", help="comma-separated words for --scorer topic")
@click.option("--instruction", default=None,
              help="ask for the behaviour in words too: adds the prompting baseline (the instruction as a system "
                   "message; a line before the prompt for base models) and every flow steering on top of it "
                   "[default: the task file's \"instruction\", if any; suites: each task's own]")
@options.option("--strengths", default=lambda: ",".join(f"{v:g}" for v in TASK_STRENGTHS) + "; suites: see docs/RESULTS.md",
                help="comma-separated sweep")
@click.option("--relative", is_flag=True, help="strengths are multiples of each flow's default strength (suites: always)")
@click.option("--suite", type=click.Choice(SUITES), default=None,
              help="preset experiments (see docs/RESULTS.md); full and pairs train every method (need torch)")
@click.option("--only", default=None, help="comma-separated experiment names of the suite to run")
@options.option("--layer", type=int, help="layer the suite trains at",
                default=lambda: "".join(f"{v} for {k} layers, " for k, v in SUITE_LAYER.items()) + "else half the layers")
@options.judge
@click.option("--limit", type=click.IntRange(1), default=None, help="items per task group (e.g. harmful/harmless)")
@options.max_tokens(lambda: f"{_eval_config().max_tokens}; quick suite {QUICK_MAX_TOKENS}")
@options.temperature
@options.seed
@options.option("--probe", type=click.IntRange(1), default=lambda: _eval_config().probe_prompts,
                help="neutral prompts generated per setting to measure fluency on likelihood tasks")
@click.option("--no-prune", is_flag=True, help="run every strength even after a setting has degenerated")
@click.option("--relevance", is_flag=True,
              help="also judge each reply after its prompt (the relevance column; doubles the judge's work)")
@options.threads
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="results directory (resumable)")
def eval_command(model: Optional[str], flows: tuple[str, ...], task: Optional[str], scorer: Optional[str],
                 description: str, topic_words: str, instruction: Optional[str], strengths: Optional[str],
                 relative: bool, suite: Optional[str],
                 only: Optional[str], layer: Optional[int], judge: Optional[str], limit: Optional[int], max_tokens: Optional[int],
                 temperature: float, seed: int, probe: Optional[int], no_prune: bool, relevance: bool, threads: Optional[int],
                 output: str) -> None:
    """Compare steering methods over strength sweeps: behaviour score, fluency, 95 % intervals.
    A --flow's NAME labels it (the method) and its :STRENGTH is the unit of --relative strengths.

    \b
    innsteer-local eval --suite quick -o eval-quick
    innsteer-local eval --suite full -o eval-full            # trains all methods first
    innsteer-local eval --task refusal --flow refusal.gguf --flow gated=refusal.gguf:target \\
        --flow refusal-mean-diff.gguf --strengths 0,0.5,1,1.5,2,3,4 -o out
    innsteer-local eval --task open:neutral --scorer sentiment --flow positivity.gguf -o out

    Writes OUT/report.md, OUT/results.json, OUT/*.png and OUT/records.jsonl (one line per answer;
    run the same command again to continue a run that was stopped).
    """
    from ..eval.experiment import Experiment
    from ..eval.records import check_config
    from ..eval.report import write_outputs
    from ..eval.runner import EvalConfig, Runner
    from ..eval.tasks import parse_task

    if (suite is None) == (task is None):
        raise click.UsageError("give --task (with --flow) or --suite quick|full")
    if suite and flows:
        raise click.UsageError("--suite chooses its own flows; use --task to compare your own")
    model_path, model_key = registry.resolve_model(model, progress=BarProgress())
    judge_path = registry.resolve_judge(judge, model_path, model_key, progress=BarProgress())
    out_dir = Path(output)
    if max_tokens is None:
        max_tokens = QUICK_MAX_TOKENS if suite == "quick" else _eval_config().max_tokens
    sweep = parse_strengths(strengths) if strengths else None
    experiments: list[Any] = []
    if not suite:  # check the task and the flows before loading any model
        if not flows:
            raise click.UsageError("--task needs at least one --flow to compare with the unsteered model")
        t = parse_task(task, scorer, description, [w.strip() for w in topic_words.split(",") if w.strip()])  # type: ignore[arg-type]
        specs = [eval_flow(f, model_key, relative) for f in flows]
        if len({s.name for s in specs}) != len(specs):
            raise click.UsageError("two --flow entries have the same label; name them LABEL=FILE")
        experiments = [Experiment(t.id + ("@relative" if relative else ""), t, specs,
                                  sweep or list(TASK_STRENGTHS), limit, relative,
                                  (instruction if instruction is not None else t.instruction).strip())]
    progress = BarProgress(label_width=22)
    runner: Any = None
    try:
        runner_meta = {"model": str(model_path), "model_sha256": _sha256(model_path),
                       "judge": str(judge_path) if judge_path else None,
                       "judge_sha256": _sha256(judge_path) if judge_path else None,
                       "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        cfg = EvalConfig(max_tokens=max_tokens, temperature=temperature, seed=seed, prune=not no_prune,
                         relevance=relevance, **options.given(probe_prompts=probe))
        runner = Runner(str(model_path), str(judge_path) if judge_path else None, out_dir, cfg, progress, threads)
        runner_meta["chat"] = runner.chat
        check_config(out_dir, runner_meta)
        for spec in (s for e in experiments for s in e.flows):
            runner.check_flow(spec)
        if suite:
            from ..eval.suites import build

            n_layer = runner.llm.model_info.n_layer
            chosen = layer if layer is not None else SUITE_LAYER.get(n_layer, n_layer // 2)
            todo: Any = build(suite, runner.llm, model_key, out_dir, chosen, sweep, limit,
                              only.split(",") if only else None, message=progress.message,
                              judge=str(judge_path) if judge_path else None)
        else:
            todo = iter(experiments)
        meta = {**runner_meta, "suite": suite, "strengths": sweep}
        done: list[Any] = []
        for exp in todo:
            runner.run(exp)
            done.append(exp)
            summaries = write_outputs(runner.records, done, out_dir, meta)
    finally:
        progress.finish()
        if runner is not None:
            runner.close()
    for s in summaries:
        click.echo(f"\n{s['experiment']} (higher = {s['higher_is']}): best score at matched fluency")
        for h in sorted(s["headline"], key=lambda h: -h["best_score"][0]):
            b = h["best_score"]
            click.echo(f"  {h['method']:<18} {b[0]:7.3f} [{b[1]:.3f}, {b[2]:.3f}]  strength {h['strength']:g}")
    click.echo(f"\nwrote {out_dir / 'report.md'}, results.json and plots")


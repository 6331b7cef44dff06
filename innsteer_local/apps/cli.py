"""The `innsteer-local` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import click

from ..choices import DEVICES, GATES, OBJECTIVES, POSITIONS, PRECISIONS, TRAIN_METHODS
from ..errors import InnsteerError, ModelError
from ..flow import Flow
from ..flow.format import DTYPES
from ..runtime import registry
from ..runtime.flowspec import FlowSpec, parse_flow_spec
from . import options
from .progress_bar import BarProgress


EXPORT_TARGETS = ("cvec", "onnx")  # export --to


def load_steered(model: Optional[str], flows: tuple[str, ...], strength: Optional[float], n_ctx: int, seed: int,
                 threads: Optional[int], gate: str = "off", rpc: Optional[str] = None) -> Any:
    from ..runtime.steered import SteeredLlama

    path, key = registry.resolve_model(model, progress=BarProgress())
    n_threads = threads or os.cpu_count() or 1
    try:
        llm = SteeredLlama(str(path), n_ctx=n_ctx, seed=seed, n_threads=n_threads, n_threads_batch=n_threads,
                           verbose=False, rpc=rpc)
    except ValueError as e:  # llama-cpp-python's word for a file llama.cpp cannot load
        raise ModelError(f"cannot load model {path}: {e} (not a llama.cpp GGUF model, corrupt, or an "
                         "unsupported architecture)") from None
    llm.model_key = key
    for spec in flow_specs(flows):
        flow_path = registry.resolve_flow(spec.path, key)
        llm.add_flow(flow_path, strength=spec.strength if spec.strength is not None else strength,
                     gate=spec.gate or gate)
    return llm


def flow_specs(values: tuple[str, ...], option: str = "--flow") -> list[FlowSpec]:
    """--flow values, parsed before any model is loaded (a typo fails at once)."""
    try:
        return [parse_flow_spec(v) for v in values]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def common_generation_options(f: Any) -> Any:
    for opt in reversed([
        options.model,
        options.flows,
        options.strength,
        options.max_tokens(256),
        options.temperature,
        options.seed,
        options.option("--repeat-penalty", type=click.FloatRange(0.0), default=1.1),
        options.n_ctx(2048),
        options.option("--gate", type=click.Choice(GATES), default=GATES[0],
                       help="runtime gate for flows without their own @GATE: damp rows off the training support "
                            "(density), or move each row only as far as the positive class (target)"),
        options.threads,
        options.rpc,
    ]):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="innsteer-local")
def cli() -> None:
    """Nonlinear activation steering (INNSteer) for llama.cpp models.

    \b
    innsteer-local chat --flow honesty.gguf          chat with the default model, steered
    innsteer-local generate --prompt "..." --flow honesty --json
    innsteer-local inspect FLOW.gguf                 what a flow file holds
    innsteer-local models list|pull|path             the model registry
    """


@cli.group()
def models() -> None:
    """List, fetch and locate registry models."""


@models.command("list")
@options.as_json
def models_list(as_json: bool) -> None:
    """Known models and whether they are cached."""
    default = registry.default_model()
    rows = []
    for e in registry.entries().values():
        rows.append({"name": e.key, "default": e.key == default, "cached": registry.is_cached(e),
                     "size_mb": round(e.size / 1e6, 1), "architecture": e.architecture, "n_embd": e.n_embd,
                     "n_layer": e.n_layer, "chat": e.chat, "description": e.description,
                     "shipped_flows": sorted(registry.shipped_flows(e.key))})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "cached" if r["cached"] else "not downloaded"
        click.echo(f"{mark} {r['name']:<14} {r['size_mb']:>6.1f} MB  {r['architecture']:<7} n_embd {r['n_embd']:<4} "
                   f"layers {r['n_layer']:<3} {state}")
        click.echo(f"    {r['description']}")
        if r["shipped_flows"]:
            click.echo(f"    shipped flows: {', '.join(r['shipped_flows'])}")


@models.command("pull")
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="download again even if cached")
def models_pull(name: Optional[str], force: bool) -> None:
    """Download and verify a model (default: the default model)."""
    click.echo(registry.pull(name or registry.default_model(), force=force, progress=BarProgress()))


@models.command("path")
@click.argument("name", required=False)
def models_path(name: Optional[str]) -> None:
    """Print the cached path of a model, downloading it first if needed."""
    click.echo(registry.pull(name or registry.default_model(), progress=BarProgress()))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@options.as_json
def inspect(file: str, as_json: bool) -> None:
    """Show what a flow file holds: model, layers, method, ops, shift and provenance. Given a
    model's GGUF instead, its architecture and how well it is supported (docs/ARCHITECTURES.md)."""
    from ..runtime import compat

    if Path(file).is_file() and compat.model_architecture(file) not in ("innsteer", ""):
        from .doctor import model_support

        info = model_support(file)
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            click.echo(f"model       {file}  (a model, not a flow)\narchitecture {info['architecture']}\n"
                       f"support     {info['level']}: {info['summary']}")
        return
    flow = Flow.load(registry.resolve_flow(file, registry.default_model()))
    d = flow.describe()
    d["support"] = {k: v for k, v in compat.support(d["model"]["architecture"]).items() if k != "row"}
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    m = d["model"]
    click.echo(f"flow        {d['name']}  (format v{d['format_version']})")
    click.echo(f"behavior    {d['behavior'] or '-'}")
    click.echo(f"method      {d['method']}")
    click.echo(f"model       {m['name']}  ({m['architecture']}, n_embd {m['n_embd']}, {m['n_layer']} layers)")
    click.echo(f"support     {d['support']['level']}: {d['support']['summary']}")
    click.echo(f"layers      {', '.join(map(str, d['layers']))}")
    sel = d["provenance"].get("selection") or {}
    click.echo(f"strength    {d['default_strength']:g} (default)"
               + (f"; calibrated by generation on {sel['prompts']} held-out prompts: strength 1 = "
                  f"{sel['unit']:g}x the trained unit" + (f", {sel['phase']} phase" if sel.get("phase") else "")
                  if "unit" in sel else ""))
    for s in d["sites"]:
        ops = " -> ".join(o["kind"] + (f"(r={o['rank']})" if "rank" in o else "") +
                          (f"({'x'.join(map(str, o['widths']))}, {o['activation']}, clamp {o['clamp']:g})"
                           if o["kind"] == "coupling" else "") for o in s["ops"]) or "identity"
        click.echo(f"  layer {s['layer']:<3} phi: {ops}")
        click.echo(f"            shift: |delta| = {s['delta_norm']:.4g} in {s['latent_dim']} dims"
                   f"{' + per-dim edit scale' if s['has_edit_scale'] else ''};  {s['parameters']:,} parameters")
    if d["provenance"]:
        click.echo("provenance")
        for k, v in d["provenance"].items():
            click.echo(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")


@cli.command()
@click.option("--prompt", "-p", required=True, help="the user message (or, with --raw, the text to continue)")
@common_generation_options
@click.option("--raw", is_flag=True, help="plain completion of the prompt text, no chat template")
@options.as_json
def generate(prompt: str, model: Optional[str], flows: tuple[str, ...], strength: Optional[float], max_tokens: int,
             temperature: float, seed: int, repeat_penalty: float, n_ctx: int, gate: str, threads: Optional[int],
             rpc: Optional[str], raw: bool, as_json: bool) -> None:
    """Generate one reply, steered by the given flows (none = unsteered)."""
    llm = load_steered(model, flows, strength, n_ctx, seed, threads, gate, rpc)
    kwargs = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, repeat_penalty=repeat_penalty)
    if raw:
        result = llm.create_completion(prompt, **kwargs)
        text = result["choices"][0]["text"]
    else:
        result = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **kwargs)
        text = result["choices"][0]["message"]["content"] or ""
    if as_json:
        click.echo(json.dumps({
            "text": text,
            "prompt": prompt,
            "model": getattr(llm, "model_key", None) or llm.model_info.name,
            "model_path": llm.model_path,
            "flows": [{"path": a.path, "strength": a.strength, "layers": a.layers, "method": a.flow.method,
                       "behavior": a.flow.behavior, "gate": a.gate} for a in llm.flows],
            "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "repeat_penalty": repeat_penalty,
            "raw": raw, "finish_reason": result["choices"][0].get("finish_reason"),
            "usage": result.get("usage"), "steering": llm.steering_stats,
        }, ensure_ascii=False))
    else:
        click.echo(text)


@cli.command()
@common_generation_options
@click.option("--compare", is_flag=True, help="print the unsteered and the steered reply to every turn")
@click.option("--system", default=None, help="system message")
def chat(model: Optional[str], flows: tuple[str, ...], strength: Optional[float], max_tokens: int, temperature: float,
         seed: int, repeat_penalty: float, n_ctx: int, gate: str, threads: Optional[int], rpc: Optional[str],
         compare: bool, system: Optional[str]) -> None:
    """Chat with a steered model. Reads lines from stdin, so it also works piped:

    \b
      echo "Is the earth flat?" | innsteer-local chat --flow honesty.gguf --compare
    """
    from .chat import ChatSession

    llm = load_steered(model, flows, strength, n_ctx, seed, threads, gate, rpc)
    if not llm.metadata.get("tokenizer.chat_template"):
        click.echo("note: this model has no chat template (a base model); replies follow a generic format",
                   err=True)
    session = ChatSession(llm=llm, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed,
                          repeat_penalty=repeat_penalty, compare=compare)
    session.run(sys.stdin, interactive=sys.stdin.isatty())


def _bench_sizes(param: str) -> Any:
    """bench's default for a size: run_bench's, and batched_bench's for --sequences."""
    def shown() -> str:
        from .bench import batched_bench, run_bench

        return (f"{options.keyword_default(run_bench, param)}; "
                f"{options.keyword_default(batched_bench, param)} with --sequences")
    return shown


@cli.command()
@options.model
@options.flows
@options.option("--prompt-tokens", type=click.IntRange(1), default=_bench_sizes("n_prompt"),
                help="prompt tokens per timing")
@options.option("--gen-tokens", type=click.IntRange(1), default=_bench_sizes("n_gen"),
                help="generated tokens per timing")
@options.option("--reps", type=click.IntRange(1), default=_bench_sizes("reps"), help="repetitions of each timing")
@options.threads
@click.option("--with-training", is_flag=True,
              help="also time `train --behavior refusal` and `train --pairs` on a 60-pair file, each from an empty "
                   "cache and again with it kept (new processes, as a user runs them)")
@click.option("--sequences", default=None, metavar="N,N,...",
              help="instead: aggregate tokens/s of N sequences decoded at once (e.g. 1,4,8,16): plain llama.cpp, "
                   "unsteered, half steered by two flows, and one sequence at a time")
@click.option("--server", is_flag=True,
              help="also: serve --parallel 8 through the OpenAI API, 8 clients at once vs one after another")
@options.rpc
@options.as_json
def bench(model: Optional[str], flows: tuple[str, ...], prompt_tokens: Optional[int], gen_tokens: Optional[int],
          reps: Optional[int], threads: Optional[int], with_training: bool, sequences: Optional[str], server: bool,
          rpc: Optional[str], as_json: bool) -> None:
    """Prompt and decode tokens/s: unsteered, llama.cpp control vector and flows, side by side.
    The flows timed are the --flow files, by default a linear and an INN flow made for the model
    (with --sequences or --server: the shipped honesty and positivity flows).

    \b
      innsteer-local bench                                   # one sequence: steered vs unsteered
      innsteer-local bench --sequences 1,4,8,16 --server     # many sequences at once, and the server
      innsteer-local bench --rpc 127.0.0.1:50052,127.0.0.1:50053   # split across rpc-servers: host vs graph path
    """
    import tempfile

    import llama_cpp

    from .bench import (
        batched_bench,
        default_flows,
        flow_isolation,
        format_batched,
        format_server,
        format_table,
        peak_rss_mb,
        run_bench,
        server_bench,
        training_cost,
    )

    progress = BarProgress()
    if sequences is not None or server:
        try:
            counts = tuple(sorted({int(x) for x in (sequences or "1,8").split(",")}))
        except ValueError:
            raise click.BadParameter(f"expected numbers separated by commas, got {sequences!r}",
                                     param_hint="--sequences") from None
        if not counts or counts[0] < 1 or counts[-1] > 256:
            raise click.BadParameter("sequence counts must be in 1..256", param_hint="--sequences")
        llm = load_steered(model, (), None, 2048, 0, threads, rpc=rpc)
        key = getattr(llm, "model_key", None)
        shipped = [registry.resolve_flow(f, key) for f in (flows or ("honesty.gguf", "positivity.gguf"))]
        out: dict[str, Any] = {}
        if sequences is not None:
            out["batched"] = batched_bench(llm, shipped, counts, progress=progress, **options.given(
                n_prompt=prompt_tokens, n_gen=gen_tokens, reps=reps))
        if server:
            out["server"] = server_bench(llm, {Path(p).stem: p for p in shipped},
                                         progress=progress)
        if as_json:
            click.echo(json.dumps(out, indent=2))
            return
        if "batched" in out:
            click.echo(format_batched(out["batched"]))
        if "server" in out:
            click.echo(format_server(out["server"]))
        return

    sizes = {**{k: options.keyword_default(run_bench, k) for k in ("n_prompt", "n_gen", "reps")},
             **options.given(n_prompt=prompt_tokens, n_gen=gen_tokens, reps=reps)}
    prompt_tokens, gen_tokens = sizes["n_prompt"], sizes["n_gen"]

    llm = load_steered(model, (), None, prompt_tokens + gen_tokens + 16, 0, threads, rpc=rpc)
    n_threads = threads or os.cpu_count() or 1
    from ..runtime import rpc as rpc_backend

    # the baseline on the same devices: over the same rpc-servers when there are any
    with rpc_backend.loading_onto(rpc_backend.add_servers(rpc)) if rpc else contextlib.nullcontext():
        plain = llama_cpp.Llama(llm.model_path, n_ctx=prompt_tokens + gen_tokens + 16, n_threads=n_threads,
                                n_threads_batch=n_threads, verbose=False, n_gpu_layers=-1 if rpc else 0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = ({Path(f).name: registry.resolve_flow(f, getattr(llm, "model_key", None)) for f in flows}
                 or default_flows(llm, Path(tmp)))
        result = run_bench(llm, paths, **sizes, plain=plain,
                           progress=progress, paths=("host", "device", "cpu-graph") if rpc else ())
        if rpc:
            result["rpc"] = {"servers": rpc, "layer_devices": llm.layer_devices}
        click.echo("timing the flow kernels alone", err=True)
        result["isolation"] = flow_isolation({k: v for k, v in paths.items() if "linear" not in k}, llm.model_info.n_embd)
    if with_training:
        result["training"] = training_cost(llm.model_path, threads, progress=progress)
    result["peak_rss_mb"] = peak_rss_mb()
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@cli.group("behaviors")
def behaviors_group() -> None:
    """Built-in contrastive behaviours for `train --behavior`."""


@behaviors_group.command("list")
def behaviors_list() -> None:
    from ..train import behaviors

    for name in behaviors.names():
        spec = behaviors.spec(name)
        click.echo(f"{name:<12} {spec['description']}")


@behaviors_group.command("show")
@click.argument("name")
def behaviors_show(name: str) -> None:
    from ..train import behaviors

    click.echo(behaviors.describe(name))


def _train_config() -> Any:
    from ..train.pipeline import TrainConfig

    return TrainConfig()


def _through_config() -> Any:
    from ..train.through.trainer import ThroughConfig

    return ThroughConfig()


def _geometry_config() -> Any:
    from ..train.activations.geometry import GeometryConfig

    return GeometryConfig()


def _shift_lr() -> str:
    from ..train.through.trainer import SHIFT_LR

    return (f"{SHIFT_LR['vector']:g} while the shift learns alone (--method vector; a flow's first --steps), "
            f"{SHIFT_LR['innsteer']:g} while a flow's couplings move; the couplings' "
            f"{_through_config().coupling_lr:g}")


def _coupling_steps() -> str:
    from ..train.through.trainer import COUPLING_STEPS

    return f"{COUPLING_STEPS} for data with neutral items (a selective behaviour), else 0"


def _shape(name: str) -> Any:
    """The INN shape's default through the model, and for the geometry objective."""
    return lambda: f"{getattr(_through_config().inn, name)}; geometry: {getattr(_geometry_config().inn, name)}"


@cli.command()
@options.model
@click.option("--behavior", "-b", default=None, help="built-in behaviour (see `behaviors list`)")
@click.option("--pairs", default=None, type=click.Path(dir_okay=False),
              help="JSONL pairs or CAA A/B JSON file (see docs/training.md)")
@options.option("--layer", "-l", default="15",
                help="layer index, or auto to sweep (activation-based methods only)")
@options.option("--method", type=click.Choice(TRAIN_METHODS), default=lambda: _train_config().method,
                help="innsteer: the invertible flow; vector: one vector trained the same way; mean-diff, pca, "
                     "affine-ot: linear baselines (no torch)")
@options.option("--objective", type=click.Choice(OBJECTIVES), default=lambda: _train_config().objective,
                help="innsteer only: train through the frozen model on what it says (model), or on activation "
                     "geometry alone (geometry: no transformers, any architecture llama.cpp loads)")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="flow file to write")
@options.seed
@options.option("--device", type=click.Choice(DEVICES), default=lambda: _train_config().device,
                help="torch device for training through the model")
@options.option("--steps", type=click.IntRange(1), default=lambda: _through_config().steps,
                help="optimiser steps of the shift through the model (all of --method vector; a flow's linear phase)")
@options.option("--coupling-steps", type=click.IntRange(0), default=_coupling_steps,
                help="innsteer: further steps in which the couplings move too (given for data without neutral "
                     "items, the coupled flow competes with its linear phase in selection)")
@options.option("--precision", type=click.Choice(PRECISIONS), default=lambda: _through_config().precision,
                help="of the layers above the steered one while training (auto: bf16 where the CPU or GPU has it)")
@options.option("--lr", type=click.FloatRange(0, min_open=True), default=_shift_lr,
                help="learning rate of the shift through the model; given, the couplings learn at a third of it")
@options.option("--epochs", type=click.IntRange(0), default=lambda: _geometry_config().epochs,
                help="geometry objective epochs")
@options.option("--rank", type=click.IntRange(0), default=_shape("rank"),
                help="INN subspace rank, 0 = the whole width")
@options.option("--blocks", type=click.IntRange(0), default=_shape("blocks"), help="INN coupling blocks")
@options.option("--hidden", type=click.IntRange(1), default=_shape("hidden"), help="width of each coupling's network")
@options.option("--positions", type=click.Choice(POSITIONS), default=lambda: _train_config().positions,
                help="activation-based methods: token positions that carry the behaviour")
@click.option("--max-pairs", type=click.IntRange(1), default=None,
              help="train on the first N contrastive pairs only (a quick trial)")
@click.option("--no-select", is_flag=True,
              help="skip choosing the checkpoint and calibrating strength 1 by generation on held-out prompts "
                   "(strength 1 stays the trained unit)")
@options.option("--dtype", type=click.Choice(tuple(DTYPES)), default=lambda: options.keyword_default(Flow.save, "dtype"),
                help="of the flow file's weights (f16 halves the size)")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="write report.md, metrics.json and plots here")
@click.option("--no-cache", is_flag=True, help="write the data and collect activations again even if cached")
@options.judge
@options.threads
def train(model: Optional[str], behavior: Optional[str], pairs: Optional[str], layer: str, method: Optional[str],
          objective: Optional[str], output: str, seed: int, device: Optional[str], steps: Optional[int],
          coupling_steps: Optional[int], precision: Optional[str], lr: Optional[float], epochs: Optional[int],
          rank: Optional[int], blocks: Optional[int], hidden: Optional[int], positions: Optional[str],
          max_pairs: Optional[int], no_select: bool, dtype: Optional[str], report_dir: Optional[str], no_cache: bool,
          judge: Optional[str], threads: Optional[int]) -> None:
    """Train a steering flow from contrastive data on a GGUF model.

    \b
      innsteer-local train --behavior refusal -o refusal.gguf --report report/
      innsteer-local train --pairs mine.jsonl --layer 12 --method vector -o mine-vector.gguf
    """
    from ..train.pipeline import TrainConfig, load_data
    from ..train.pipeline import train as run_train
    from ..train.report import summary, write_report

    if layer != "auto":
        try:
            int(layer)
        except ValueError:
            raise click.BadParameter(f"'{layer}' is neither a layer index nor auto", param_hint="--layer") from None
    cfg = TrainConfig(seed=seed, select=not no_select,
                      **options.given(method=method, objective=objective, positions=positions, device=device,
                                      judge=judge))
    method = cfg.method
    through = method == "vector" or (method == "innsteer" and cfg.objective == "model")
    if through and layer == "auto":
        raise click.BadParameter("training through the model needs a layer index", param_hint="--layer")
    data = load_data(behavior, pairs)
    if max_pairs:
        if hasattr(data, "prompts"):
            data.prompts = data.prompts[:max_pairs]
        else:
            data.pairs = data.pairs[:max_pairs]
    llm = load_steered(model, (), None, 4096, seed, threads)
    shape = options.given(rank=rank, blocks=blocks, hidden=hidden)
    if through:
        from ..train.inn import InnConfig
        from ..train.through.trainer import ThroughConfig

        cfg.through = ThroughConfig(inn=InnConfig(**shape),
                                    **options.given(steps=steps, coupling_steps=coupling_steps, precision=precision),
                                    **({"lr": lr, "coupling_lr": lr / 3} if lr else {}))
    elif method == "innsteer":
        from ..train.activations.geometry import GeometryConfig

        geometry = GeometryConfig(**options.given(epochs=epochs))
        geometry.inn = dataclasses.replace(geometry.inn, **shape)
        cfg.geometry = geometry
    name = data.name
    click.echo(f"{name}: model {llm.model_info.name} ({llm.model_info.n_layer} layers), method {method}"
               + (f" ({cfg.objective} objective)" if method == "innsteer" else ""), err=True)
    cache = None if no_cache else registry.cache_dir() / "training"
    progress = BarProgress()
    try:
        out = run_train(llm, data, layer, cfg, cache_dir=cache, progress=progress)
    finally:
        progress.finish()
    if out.sweep:
        click.echo("layer sweep (held-out):  layer  probe-acc  mean-diff-flip", err=True)
        for r in out.sweep:
            mark = "  <- chosen" if r["layer"] == out.layer else ""
            click.echo(f"                         {r['layer']:>5}  {r['probe_accuracy']:.3f}      "
                       f"{r['mean_diff_flip']:.3f}{mark}", err=True)
    out.flow.save(output, **options.given(dtype=dtype))
    if report_dir:
        write_report(out, Path(output), Path(report_dir))
    click.echo(summary(out))
    click.echo(f"wrote {output}" + (f" and a report in {report_dir}" if report_dir else ""))


@cli.command("import-cvec")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="flow file to write")
@options.optional_model
def import_cvec(file: str, output: str, model: Optional[str]) -> None:
    """Turn a llama.cpp / repeng control-vector GGUF into a linear flow (same layer numbers);
    --model names the model the vector belongs to and fills in the flow's model info."""
    from ..convert.cvec import read_cvec

    info = None
    if model:
        from ..runtime.steered import SteeredLlama

        path, _ = registry.resolve_model(model, progress=BarProgress())
        llm = SteeredLlama(str(path), n_ctx=64, verbose=False)
        info = llm.model_info
    flow = read_cvec(file, info)
    flow.save(output)
    click.echo(f"wrote {output}: layers {flow.layers}, n_embd {flow.model.n_embd}")


@cli.command()
@click.argument("flow_file", type=click.Path(dir_okay=False))
@click.option("--to", "target", type=click.Choice(EXPORT_TARGETS), required=True)
@click.option("--output", "-o", required=True, type=click.Path(),
              help="cvec: the .gguf file to write; onnx: the directory to write the graphs into")
@options.strength
def export(flow_file: str, target: str, output: str, strength: Optional[float]) -> None:
    """Export a flow: --to cvec writes a llama.cpp control vector (linear flows only) with the
    strength baked in; --to onnx writes phi, phi^-1 and the steering map of every layer as ONNX
    graphs plus manifest.json."""
    flow = Flow.load(registry.resolve_flow(flow_file, registry.default_model()))
    if target == "onnx":
        from ..convert.onnx import export_onnx

        if strength is not None:
            raise click.BadParameter("the ONNX steering graphs take the strength as an input (strength is an "
                                     "input named 'strength'); --strength is for --to cvec", param_hint="--strength")
        manifest = export_onnx(flow, output)
        n = sum(2 + len(s["steer"]) for s in manifest["sites"])
        click.echo(f"wrote {n} ONNX graphs and manifest.json to {output}: layers {flow.layers}")
        return
    from ..convert.cvec import write_cvec

    write_cvec(flow, output, strength)
    click.echo(f"wrote {output}: llama.cpp --control-vector, layers {flow.layers}")


def _policy() -> Any:
    from .server.guard import Policy

    return Policy()


def _server_default(name: str) -> Any:
    def shown() -> str:
        from .server.app import DEFAULT_PARALLEL
        from .server.state import QUEUE_PER_SEQUENCE

        return {"parallel": f"{DEFAULT_PARALLEL['cpu']} on CPU, {DEFAULT_PARALLEL['gpu']} with a GPU",
                "queue": f"{QUEUE_PER_SEQUENCE} x --parallel"}[name]
    return shown


@cli.command()
@options.model
@options.flows
@click.option("--preset", "presets", multiple=True,
              help="NAME=FLOW:STRENGTH[@GATE]: also serve the model id MODEL+NAME (FLOW a loaded flow's name); "
                   "repeatable")
@options.option("--host", default=lambda: _policy().host, help="address to listen on (the default: this machine only)")
@options.option("--port", type=click.IntRange(0, 65535), default=8080)
@click.option("--api-key", default=None, envvar="INNSTEER_API_KEY", show_envvar=True,
              help="every API request must send 'Authorization: Bearer KEY' (the playground asks for it)")
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="read the API key from the first line of FILE (keeps it out of `ps`)")
@click.option("--flows-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="allow POST /v1/steering to load flow files from DIR (by file name; nothing outside DIR)")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN",
              help="a web app's origin (e.g. http://localhost:3000) allowed to call the API from a browser; repeatable")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="a host name clients may use besides the listening address and localhost; repeatable")
@options.option("--max-body", type=click.IntRange(1024), default=lambda: _policy().max_body,
                help="largest request body in bytes (413 above)")
@options.option("--header-timeout", type=click.FloatRange(0.5), default=lambda: _policy().header_timeout,
                help="seconds a connection may take to send a request's headers before it is closed")
@options.n_ctx(4096)
@options.option("--parallel", "-np", type=click.IntRange(1, 256), default=_server_default("parallel"),
                help="requests decoded together in one batch, each with its own steering")
@options.option("--queue", type=click.IntRange(0), default=_server_default("queue"),
                help="requests that may wait for a free sequence before the server answers 429")
@options.seed
@options.threads
@options.rpc
def serve(model: Optional[str], flows: tuple[str, ...], presets: tuple[str, ...], host: Optional[str], port: int,
          api_key: Optional[str], api_key_file: Optional[str], flows_dir: Optional[str], cors: tuple[str, ...],
          allowed_hosts: tuple[str, ...], max_body: Optional[int], header_timeout: Optional[float], n_ctx: int,
          parallel: Optional[int], queue: Optional[int], seed: int, threads: Optional[int], rpc: Optional[str]) -> None:
    """OpenAI-compatible server with a playground page at /; each request picks its own steering,
    by a `steering` field or by a model id such as smollm2-135m+honesty@2 (docs/EMBEDDING.md):
    the --flow files, by NAME, at any strength and gate. Access rules and limits: docs/SECURITY.md.

    \b
      innsteer-local serve --flow honesty.gguf --preset honest=honesty:2
      open http://127.0.0.1:8080/                      # the playground
      curl localhost:8080/v1/models                    # smollm2-135m, ...+honesty, ...+honest
      curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "smollm2-135m+honesty@2", "messages": [{"role": "user", "content": "Hi"}]}'
      innsteer-local serve --host 0.0.0.0 --api-key-file key.txt --flows-dir ./flows   # on a network
    """
    from .server import guard
    from .model_ids import parse_preset
    from .server import _require_fastapi
    from .server import serve as run_server

    _require_fastapi()  # fail before loading the model
    specs = flow_specs(flows)
    try:
        parsed = [parse_preset(p) for p in presets]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--preset") from None
    names = {s.name for s in specs}
    for p in parsed:
        if p.flow not in names:
            raise click.BadParameter(f"preset '{p.name}' uses flow '{p.flow}', but the loaded flows are "
                                     f"{', '.join(sorted(names)) or 'none'} (add --flow {p.flow}.gguf)",
                                     param_hint="--preset")
    if api_key_file is not None:
        lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            raise click.BadParameter(f"{api_key_file} is empty", param_hint="--api-key-file")
    if api_key is not None and len(api_key) < 8:
        raise click.BadParameter("use a key of at least 8 characters", param_hint="--api-key")
    for origin in cors:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise click.BadParameter(f"'{origin}' is not an origin like http://localhost:3000", param_hint="--cors")
    if host is not None and api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the "
                   "model and its flows", err=True)
    policy = guard.Policy(api_key=api_key, allowed_hosts=allowed_hosts, cors=cors,
                          **options.given(host=host, max_body=max_body, header_timeout=header_timeout))
    llm = load_steered(model, (), None, n_ctx, seed, threads, rpc=rpc)
    run_server(llm, specs, port, policy, presets=parsed, parallel=parallel, queue=queue, flows_dir=flows_dir)


@cli.command()
@options.as_json
@options.optional_model
@options.rpc
def doctor(as_json: bool, model: Optional[str], rpc: Optional[str]) -> None:
    """Check the installation: llama.cpp's build and CPU features, libraries, model cache; with
    --model, the support level of that model's architecture (docs/ARCHITECTURES.md); with --rpc,
    which of those rpc-servers answer.

    Exits with status 1 when it finds a combination known to crash (e.g. ggml's AMX path on a
    CPU with AMX) and prints the fix."""
    from .doctor import format_report, report

    r = report(model, rpc)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))
    if any(p["severity"] == "error" for p in r["problems"]):
        sys.exit(1)


from .eval_cli import eval_command  # noqa: E402  (a command of its own module: it is long)

cli.add_command(eval_command)


def main() -> None:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (InnsteerError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Side-by-side throughput of steering variants in one process, interleaved repetitions."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..flow import Flow, random_flow
from ..errors import InnsteerError
from ..progress import Progress


@dataclass
class Variant:
    name: str
    setup: Callable[[], None]
    teardown: Callable[[], None]
    model: Any = None  # None: the steered model
    prompt_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)


def _time_variant(llm: Any, tokens: list[int], n_prompt: int, n_gen: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens[:n_prompt])
    t1 = time.perf_counter()
    for i in range(n_gen):
        llm.eval([tokens[(n_prompt + i) % len(tokens)]])
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), n_gen / (t2 - t1)


def run_bench(llm: Any, flow_paths: dict[str, Path], n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
              cvec_layer: int = 15, plain: Any = None,
              progress: Progress = Progress(), paths: Sequence[str] = ()) -> dict[str, Any]:
    """Measures unsteered, llama.cpp's control vector, and each flow, interleaved `reps` times.
    `plain`: an optional llama_cpp.Llama of the same model without our callback, as a baseline
    that shows what merely installing the callback costs. `paths`: time each flow on each of
    these steering paths (e.g. host and device, every batch size on it) instead of the default."""
    from ..runtime.compat import set_control_vector

    info = llm.model_info
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    tokens = [int(t) for t in rng.integers(100, min(vocab, 30000), size=n_prompt + n_gen)]
    v = rng.normal(0, 1, info.n_embd).astype(np.float32)

    def set_cvec(on: bool) -> None:
        set_control_vector(llm, cvec_layer, v if on else None, info.n_embd, info.n_layer)

    def attach(path: Path, on: str = "") -> tuple[Callable[[], None], Callable[[], None]]:
        handle: list[Any] = []

        def setup() -> None:
            if on:
                llm.native_steerer.set_path(on, min_rows=1)
            handle.append(llm.add_flow(path))

        def teardown() -> None:
            llm.remove_flow(handle.pop())
            if on:
                llm.native_steerer.set_path("auto")

        return setup, teardown

    variants = [Variant("unsteered", lambda: None, lambda: None)]
    if plain is not None:
        variants.append(Variant("plain llama.cpp (no callback)", lambda: None, lambda: None, model=plain))
    variants += [
                Variant(f"llama.cpp control vector (layer {cvec_layer})", lambda: set_cvec(True), lambda: set_cvec(False))]
    for name, path in flow_paths.items():
        for on in paths or ("",):
            variants.append(Variant(f"{name} ({on} path)" if on else name, *attach(path, on)))
    for m in (llm, plain):
        if m is not None:
            _time_variant(m, tokens, min(n_prompt, 64), 8)  # warm-up
    for rep in range(reps):
        for var in variants:
            progress.message(f"rep {rep + 1}/{reps}: {var.name}")
            var.setup()
            try:
                p, d = _time_variant(var.model or llm, tokens, n_prompt, n_gen)
            finally:
                var.teardown()
            var.prompt_tps.append(p)
            var.decode_tps.append(d)
    base = variants[0]
    rows = []
    for var in variants:
        rows.append({
            "variant": var.name,
            "prompt_tps_median": statistics.median(var.prompt_tps), "prompt_tps_max": max(var.prompt_tps),
            "decode_tps_median": statistics.median(var.decode_tps), "decode_tps_max": max(var.decode_tps),
            "prompt_ratio": statistics.median(var.prompt_tps) / statistics.median(base.prompt_tps),
            "decode_ratio": statistics.median(var.decode_tps) / statistics.median(base.decode_tps),
        })
    return {"model": info.name, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "rows": rows}


def flow_isolation(paths: dict[str, Path], n_embd: int, batches: tuple[int, ...] = (1, 512),
                   min_seconds: float = 0.3) -> list[dict[str, Any]]:
    """The flow's own cost: microseconds per row of the native kernel (one thread), outside llama.cpp."""
    from ..runtime.native import NativeFlow

    rows_out = []
    rng = np.random.default_rng(0)
    for name, path in paths.items():
        nf = NativeFlow(path)
        for n in batches:
            x = rng.normal(0, 1, (n, n_embd)).astype(np.float32)
            for site in range(len(nf.layers)):
                nf.steer(x, 1.0, site=site)  # warm-up
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_seconds:
                for site in range(len(nf.layers)):
                    nf.steer(x, 1.0, site=site)
                reps += 1
            us = (time.perf_counter() - t0) / reps / n * 1e6
            rows_out.append({"flow": name, "batch": n, "us_per_row": us, "layers": len(nf.layers)})
        nf.close()
    return rows_out


def peak_rss_mb() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# what `bench --with-training` times: a built-in behaviour and a file of 60 pairs of fixed sentences
TRAINING_JOBS = (("train --behavior refusal", ["--behavior", "refusal"]),
                 ("train --pairs sea.jsonl (60 pairs)", ["--pairs", "CHECKS/sea.jsonl"]))


def training_cost(model_path: str, threads: Optional[int] = None,
                  progress: Progress = Progress()) -> list[dict[str, Any]]:
    """Wall time of `innsteer-local train` as a user runs it (a new process, the defaults: the INN
    flow through the model, selection included), once from an empty cache (the dequantized copy,
    the encodings and a built-in behaviour's replies are made) and once with that cache kept."""
    import os
    import subprocess
    import sys
    import tempfile

    from ..eval.suites import CHECKS
    from ..runtime import registry

    cli = [sys.executable, "-m", "innsteer_local.apps.cli", "train", "--model", str(model_path)]
    rows = []
    for label, args in TRAINING_JOBS:
        args = [a.replace("CHECKS", str(CHECKS)) for a in args]
        row: dict[str, Any] = {"job": label}
        with tempfile.TemporaryDirectory(prefix="innsteer-bench-") as tmp:
            models = Path(tmp) / "models"  # the registry's model files, not downloaded again
            models.symlink_to(registry.cache_dir() / "models", target_is_directory=True)
            env = {**os.environ, "INNSTEER_CACHE": tmp}
            for run in ("first", "cached"):
                progress.message(f"{label}: {run} run")
                report = Path(tmp) / f"report-{run}"
                t0 = time.perf_counter()
                proc = subprocess.run(cli + args + ["-o", str(Path(tmp) / "flow.gguf"), "--report", str(report)]
                                      + (["--threads", str(threads)] if threads else []),
                                      env=env, capture_output=True, text=True)
                row[f"{run}_seconds"] = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise InnsteerError(f"{label} failed: {proc.stderr[-2000:]}")
                phases = json.loads((report / "metrics.json").read_text())["seconds"]
                row[f"{run}_phases"] = {k: round(v, 1) for k, v in phases.items()}
        rows.append(row)
    return rows


def default_flows(llm: Any, workdir: Path) -> dict[str, Path]:
    """A linear flow and a nonlinear INN-sized flow (rank 64, 4 couplings) at layer 15."""
    info = llm.model_info
    layer = min(15, info.n_layer - 2)
    rng = np.random.default_rng(1)
    linear = workdir / "linear.gguf"
    Flow.linear({layer: rng.normal(0, 1, info.n_embd).astype(np.float32)}, info, method="mean-diff").save(linear)
    inn = workdir / "inn.gguf"
    random_flow(info, [layer], rank=64, blocks=4, hidden=128, seed=1, delta_scale=0.1).save(inn)
    inn16 = workdir / "inn-f16.gguf"
    random_flow(info, [layer], rank=64, blocks=4, hidden=128, seed=1, delta_scale=0.1).save(inn16, dtype="f16")
    inn3 = workdir / "inn3.gguf"
    random_flow(info, [max(1, layer - 5), layer, min(info.n_layer - 2, layer + 5)], rank=64, blocks=4, hidden=128,
                seed=1, delta_scale=0.1).save(inn3)
    return {f"linear flow (layer {layer})": linear, f"INN flow (layer {layer})": inn,
            f"INN flow f16 (layer {layer})": inn16, "INN flow (3 layers)": inn3}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}: prompt {result['n_prompt']} tokens, decode {result['n_gen']} tokens, "
             f"{result['reps']} interleaved repetitions (median; best in brackets)",
             f"{'variant':<38} {'prompt tok/s':>18} {'ratio':>6} {'decode tok/s':>18} {'ratio':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<38} {r['prompt_tps_median']:>8.1f} ({r['prompt_tps_max']:>7.1f}) "
                     f"{r['prompt_ratio']:>6.3f} {r['decode_tps_median']:>8.1f} ({r['decode_tps_max']:>7.1f}) "
                     f"{r['decode_ratio']:>6.3f}")
    if result.get("isolation"):
        lines.append("")
        lines.append("flow kernel alone (one thread, outside llama.cpp):")
        for r in result["isolation"]:
            lines.append(f"  {r['flow']:<36} batch {r['batch']:>4}: {r['us_per_row']:7.1f} us per row"
                         f"{' (all layers)' if r['layers'] > 1 else ''}")
    for t in result.get("training", []):
        for run in ("first", "cached"):
            phases = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in t[f"{run}_phases"].items())
            lines.append(f"{t['job']} ({run} run): {t[f'{run}_seconds']:.0f} s wall ({phases})")
    if result.get("peak_rss_mb"):
        lines.append(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


# ---- many sequences at once ------------------------------------------------------------------

BATCH_MODES = ("raw llama.cpp", "unsteered", "mixed", "one at a time")


def _mixed_steering(i: int, flows: list[Any]) -> list[Any]:
    """Half of the sequences unsteered, the others by two flows at two strengths."""
    from ..runtime.engine import Steer

    if i % 2 == 0 or not flows:
        return []
    return [Steer(flows[(i // 2) % len(flows)], (1.0, 0.5)[(i // 2) % 2])]


def _engine_run(engine: Any, prompts: list[list[int]], n_gen: int, steering: list[list[Any]]) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) of these sequences decoded together."""
    from ..runtime.engine import Job, Sampling

    engine.timings = []
    jobs = [Job(p, Sampling(max_tokens=n_gen, ignore_eos=True), s) for p, s in zip(prompts, steering)]
    engine.run(jobs)
    timings, engine.timings = engine.timings, None
    prompt_tok = sum(p for p, d, _ in timings if p)
    prompt_s = sum(t for p, d, t in timings if p)
    decode_tok = sum(d for p, d, _ in timings if not p)
    decode_s = sum(t for p, d, t in timings if not p)
    return prompt_tok / prompt_s, decode_tok / decode_s


def _one_at_a_time(llm: Any, prompts: list[list[int]], n_gen: int, flows: list[Any],
                   attached: list[Any]) -> tuple[float, float]:
    """The path every command used before the engine: SteeredLlama, one sequence after another,
    steering switched globally between them."""
    t_prompt = t_decode = 0.0
    for i, tokens in enumerate(prompts):
        steer = _mixed_steering(i, flows)
        for a, f in zip(attached, flows):
            on = next((s for s in steer if s.flow is f), None)
            llm.set_strength(on.strength if on else 0.0, a)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        t1 = time.perf_counter()
        tok = tokens[-1]
        for _ in range(n_gen):
            llm.eval([tok])
        t_prompt += t1 - t0
        t_decode += time.perf_counter() - t1
    return sum(map(len, prompts)) / t_prompt, n_gen * len(prompts) / t_decode


def batched_bench(llm: Any, flow_paths: list[Path], counts: tuple[int, ...] = (1, 4, 8, 16), n_prompt: int = 64,
                  n_gen: int = 64, reps: int = 3, progress: Progress = Progress()) -> dict[str, Any]:
    """Aggregate prompt and decode tokens/s of n sequences at once, side by side in one process:
    plain llama.cpp batches (no callback), the engine unsteered, the engine with half the
    sequences steered by two flows at two strengths, and the old one-sequence-at-a-time path with
    the same steering. Modes interleave within every repetition."""
    from ..runtime.engine import Engine

    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    n_max = max(counts)
    prompts = [[int(t) for t in rng.integers(100, min(vocab, 30000), size=n_prompt)] for _ in range(n_max)]
    per_seq = n_prompt + n_gen + 8
    raw = Engine(llm, n_parallel=n_max, n_ctx=per_seq, steer=False)
    eng = Engine(llm, n_parallel=n_max, n_ctx=per_seq)
    flows = [eng.add_flow(p) for p in flow_paths]
    attached = [llm.add_flow(p, strength=0.0) for p in flow_paths]
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        _engine_run(eng, prompts[:2], 4, [[], []])  # warm-up
        for rep in range(reps):
            for n in counts:
                steer = [_mixed_steering(i, flows) for i in range(n)]
                runs = {
                    "raw llama.cpp": lambda: _engine_run(raw, prompts[:n], n_gen, [[]] * n),
                    "unsteered": lambda: _engine_run(eng, prompts[:n], n_gen, [[]] * n),
                    "mixed": lambda: _engine_run(eng, prompts[:n], n_gen, steer),
                    "one at a time": lambda: _one_at_a_time(llm, prompts[:n], n_gen, flows, attached),
                }
                for mode in BATCH_MODES:
                    progress.message(f"rep {rep + 1}/{reps}: {n} sequences, {mode}")
                    samples.setdefault((mode, n), []).append(runs[mode]())
    finally:
        for a in attached:
            llm.remove_flow(a)
        eng.close()
        raw.close()
    rows = []
    for n in counts:
        row: dict[str, Any] = {"sequences": n}
        for mode in BATCH_MODES:
            ps, ds = zip(*samples[(mode, n)])
            row[mode] = {"prompt_tps": statistics.median(ps), "decode_tps": statistics.median(ds)}
        rows.append(row)
    one = {m: rows[0][m]["decode_tps"] for m in BATCH_MODES}
    for row in rows:
        row["raw_gain"] = row["raw llama.cpp"]["decode_tps"] / one["raw llama.cpp"]
        row["mixed_gain"] = row["mixed"]["decode_tps"] / one["one at a time"]
        row["mixed_vs_unsteered"] = row["mixed"]["decode_tps"] / row["unsteered"]["decode_tps"]
        row["mixed_vs_one_at_a_time"] = row["mixed"]["decode_tps"] / row["one at a time"]["decode_tps"]
    return {"model": llm.model_info.name, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "rows": rows,
            "flows": [str(p) for p in flow_paths], "unified_kv": eng.unified}


def format_batched(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}: {result['n_prompt']} prompt + {result['n_gen']} generated tokens per sequence, "
             f"{result['reps']} interleaved repetitions (median aggregate tokens/s); mixed = half the sequences "
             "steered by two flows at two strengths",
             f"{'seqs':>4} | {'decode tok/s: raw':>17} {'unsteered':>9} {'mixed':>7} {'1-at-a-time':>11} | "
             f"{'prompt tok/s: raw':>17} {'mixed':>7} {'1-at-a-time':>11} | {'raw gain':>8} {'mixed gain':>10} "
             f"{'mixed/unst':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['sequences']:>4} | {r['raw llama.cpp']['decode_tps']:>17.1f} {r['unsteered']['decode_tps']:>9.1f} "
                     f"{r['mixed']['decode_tps']:>7.1f} {r['one at a time']['decode_tps']:>11.1f} | "
                     f"{r['raw llama.cpp']['prompt_tps']:>17.1f} {r['mixed']['prompt_tps']:>7.1f} "
                     f"{r['one at a time']['prompt_tps']:>11.1f} | {r['raw_gain']:>7.2f}x {r['mixed_gain']:>9.2f}x "
                     f"{r['mixed_vs_unsteered']:>10.3f}")
    lines.append("raw gain: plain llama.cpp n sequences in one batch vs one sequence; mixed gain: the engine's mixed "
                 "steering vs the one-at-a-time path at 1 sequence")
    return "\n".join(lines)


def server_bench(llm: Any, flow_paths: dict[str, Path], parallel: int = 8, n_requests: int = 8, max_tokens: int = 64,
                 progress: Progress = Progress()) -> dict[str, Any]:
    """Through the OpenAI API on loopback: `serve --parallel N` with N concurrent clients (half
    steered by the given flows, half not) against the same N requests one after another, driven
    by the same client as scripts/llama_server_bench.py drives llama-server."""
    from .load_client import chat_bodies, drive
    from .server import Engine as ServerEngine
    from .server import model_id_for, serving

    engine = ServerEngine(llm, model_id_for(llm), parallel=parallel, queue=4 * n_requests)
    names = []
    for name, path in flow_paths.items():
        engine.load_flow(name, str(path))
        names.append(name)
    try:
        with serving(engine, timeout=60) as url:
            prompts = [SERVER_PROMPTS[i % len(SERVER_PROMPTS)] for i in range(n_requests)]
            steering = [[] if i % 2 == 0 or not names else [{"flow": names[(i // 2) % len(names)], "strength": 1.0}]
                        for i in range(n_requests)]
            bodies = chat_bodies(prompts, max_tokens, engine.model_id, steering, extra={"ignore_eos": True})
            drive(url, bodies[:1], 1)  # warm-up
            progress.message(f"{n_requests} requests, {parallel} at once")
            together = drive(url, bodies, parallel)
            progress.message(f"{n_requests} requests, one after another")
            alone = drive(url, bodies, 1)
    finally:
        engine.close()
    stats = [(r or {}).get("steering_stats") for r in together.responses]
    leaks = [i for i, st in enumerate(stats)
             if st is None or st["rows_steered"] != (1 if steering[i] else 0) * st["tokens_evaluated"]]
    return {"parallel": parallel, "requests": n_requests, "max_tokens": max_tokens,
            "concurrent_tps": together.tokens_per_s, "sequential_tps": alone.tokens_per_s,
            "gain": together.tokens_per_s / alone.tokens_per_s, "requests_with_wrong_stats": leaks,
            "errors": together.errors + alone.errors}


def format_server(r: dict[str, Any]) -> str:
    return (f"serve --parallel {r['parallel']} through the OpenAI API, {r['requests']} requests of {r['max_tokens']} tokens "
            f"(half steered): {r['concurrent_tps']:.1f} tok/s at once vs {r['sequential_tps']:.1f} tok/s one after "
            f"another = {r['gain']:.2f}x; requests whose steering_stats do not match their own steering: "
            f"{len(r['requests_with_wrong_stats'])}; errors: {len(r['errors'])}")


SERVER_PROMPTS = ["What should I cook tonight?", "Tell me about the moon.", "How do I learn to swim?",
                  "Why is the sea salty?", "Write a short poem about autumn.", "What is a good name for a dog?",
                  "How do plants grow?", "Give me tips for a job interview."]

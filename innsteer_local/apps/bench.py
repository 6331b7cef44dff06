"""Side-by-side throughput of steering variants in one process, interleaved repetitions."""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..flow import Flow, random_flow


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
              progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Measures unsteered, llama.cpp's control vector, and each flow, interleaved `reps` times.
    `plain`: an optional llama_cpp.Llama of the same model without our callback, as a baseline
    that shows what merely installing the callback costs."""
    import llama_cpp

    info = llm.model_info
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    tokens = [int(t) for t in rng.integers(100, min(vocab, 30000), size=n_prompt + n_gen)]
    v = rng.normal(0, 1, info.n_embd).astype(np.float32)
    cvec = np.zeros((info.n_layer, info.n_embd), dtype=np.float32)
    cvec[cvec_layer - 1] = v

    def set_cvec(on: bool) -> None:
        ptr = cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if on else None
        llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, cvec.size if on else 0, info.n_embd,
                                         1 if on else -1, info.n_layer - 1 if on else -1)

    def attach(path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
        handle: list[Any] = []
        return (lambda: handle.append(llm.add_flow(path)),
                lambda: llm.remove_flow(handle.pop()))

    variants = [Variant("unsteered", lambda: None, lambda: None)]
    if plain is not None:
        variants.append(Variant("plain llama.cpp (no callback)", lambda: None, lambda: None, model=plain))
    variants += [
                Variant(f"llama.cpp control vector (layer {cvec_layer})", lambda: set_cvec(True), lambda: set_cvec(False))]
    for name, path in flow_paths.items():
        variants.append(Variant(name, *attach(path)))
    for m in (llm, plain):
        if m is not None:
            _time_variant(m, tokens, min(n_prompt, 64), 8)  # warm-up
    for rep in range(reps):
        for var in variants:
            if progress:
                progress(f"rep {rep + 1}/{reps}: {var.name}")
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


def training_cost(llm: Any, behavior: str = "refusal") -> dict[str, Any]:
    """Wall time of `train --behavior <behavior>` (INN through the model, selection included) at
    layer 15: once from nothing (the model writes its data), once with that data cached."""
    import tempfile

    from ..train import behaviors
    from ..train.pipeline import TrainConfig, train

    layer = min(15, llm.model_info.n_layer - 2)
    out: dict[str, Any] = {"behavior": behavior}
    with tempfile.TemporaryDirectory(prefix="innsteer-bench-") as tmp:
        for run in ("first", "cached"):
            t0 = time.perf_counter()
            res = train(llm, behaviors.recipe(behavior), layer, TrainConfig(method="innsteer"), cache_dir=Path(tmp))
            out[f"{run}_seconds"] = time.perf_counter() - t0
            out[f"{run}_phases"] = {k: round(v, 1) for k, v in res.seconds.items()}
    return out


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
    if result.get("training"):
        t = result["training"]
        for run in ("first", "cached"):
            phases = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in t[f"{run}_phases"].items())
            lines.append(f"train --behavior {t['behavior']} (INN through the model, {run} run): "
                         f"{t[f'{run}_seconds']:.0f} s ({phases})")
    if result.get("peak_rss_mb"):
        lines.append(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)

"""Which architectures steering works on, checked end to end on real llama.cpp (and transformers
for training), and what a given model file can expect (docs/ARCHITECTURES.md).

The checks run on any GGUF: the matrix runs them on tiny random-weight models of every
architecture (convert/tiny_models.py) and on the registry models; `doctor` and `inspect` read the
matrix's verdicts (models/architectures.json) for a model's architecture.

    row = check_runtime("tiny-qwen3.gguf")       # {"runtime": "ok", "cvec": "equal", "batched": "ok", ...}
    row.update(check_training("tiny-qwen3.gguf", workdir))
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ..errors import InvalidArgument, InnsteerError

MATRIX = Path(__file__).with_name("architectures.json")  # written by scripts/architecture_matrix.py
PROMPT = "The lighthouse keeper wrote in the log that the storm"
BLOCK_TOLERANCE = 0.05  # median relative difference of block L's rows, llama.cpp vs transformers
PAIRS = [  # a user's pairs file, as small as training allows
    {"prompt": f"Tell me about {t}.", "positive": f"{t.capitalize()} are wonderful and I love them.",
     "negative": f"{t.capitalize()} are dreadful and I hate them."}
    for t in ("boats", "trains", "gardens", "rivers", "mountains", "bridges", "libraries", "markets")
]


def _layer(n_layer: int) -> int:
    return max(1, n_layer // 2)


def _logits(llm: Any, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def set_control_vector(llm: Any, layer: int, v: Optional[np.ndarray], n_embd: int, n_layer: int) -> None:
    """llama.cpp's own control vector (llama_set_adapter_cvec) on a llama_cpp.Llama: v added to
    l_out-<layer>, or none with v None. The oracle a linear flow must equal bit for bit."""
    import llama_cpp

    if v is None:
        rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, n_embd, -1, -1)
    else:
        data = np.zeros((n_layer, n_embd), dtype=np.float32)
        data[layer - 1] = v  # row il-1 belongs to l_out-il; llama.cpp has no direction for layer 0
        rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                              data.size, n_embd, 1, n_layer - 1)
    if rc != 0:
        raise InnsteerError(f"llama_set_adapter_cvec returned {rc}")


def check_runtime(model_path: str | Path, workdir: str | Path) -> dict[str, Any]:
    """Runtime rows: a flow attaches and its layer's l_out is visited (or a clear refusal);
    strength 0 and no flow are bit-identical to the unsteered model; a linear flow equals
    llama.cpp's control vector; two sequences with different steering share one batch."""
    import llama_cpp

    from ..errors import InnsteerError
    from ..flow import Flow, random_flow
    from .engine import Engine, Steer
    from .steered import SteeredLlama

    workdir = Path(workdir)
    row: dict[str, Any] = {}
    llm = SteeredLlama(str(model_path), n_ctx=256, n_batch=128, logits_all=True, seed=0, verbose=False)
    try:
        info = llm.model_info
        row["architecture"], row["n_layer"], row["n_embd"] = info.architecture, info.n_layer, info.n_embd
        layer = _layer(info.n_layer)
        tokens = llm.tokenize(PROMPT.encode())
        base = _logits(llm, tokens)
        inn = workdir / "inn.gguf"
        random_flow(info, [layer], rank=min(32, info.n_embd), blocks=2, hidden=32, seed=1, delta_scale=2.0).save(inn)
        try:
            attached = llm.add_flow(inn, strength=0.0)
            zero = _logits(llm, tokens)  # the first evaluation verifies that l_out-N was visited
        except InnsteerError as e:
            row["runtime"] = f"refused: {e}"
            return row
        llm.set_strength(1.0, attached)
        steered = _logits(llm, tokens)
        llm.remove_flow(attached)
        off = _logits(llm, tokens)
        if not (np.array_equal(zero, base) and np.array_equal(off, base)):
            row["runtime"] = (f"FAIL: strength 0 or no flow changed the logits (max diff "
                              f"{max(np.abs(zero - base).max(), np.abs(off - base).max()):.3g})")
            return row
        if not np.abs(steered - base).max() > 1e-3:
            row["runtime"] = "FAIL: the flow did not change the logits (silent no-op)"
            return row
        row["runtime"] = "ok"
        row["visits"] = int(llm.native_steerer.layer_visits(layer))

        v = np.random.default_rng(layer).normal(0.0, 1.0, info.n_embd).astype(np.float32) * 2.0
        linear = workdir / "linear.gguf"
        Flow.linear({layer: v}, info, method="mean-diff").save(linear)
        plain = llama_cpp.Llama(str(model_path), n_ctx=256, n_batch=128, logits_all=True, seed=0, verbose=False)
        try:
            set_control_vector(plain, layer, v, info.n_embd, info.n_layer)
            oracle = _logits(plain, tokens)
        finally:
            plain.close()
        a = llm.add_flow(linear, strength=1.0)
        ours = _logits(llm, tokens)
        llm.remove_flow(a)
        if np.abs(oracle - base).max() <= 1e-6:
            row["cvec"] = "n/a: llama.cpp applies no control vector in this architecture's graph"
        else:
            diff = float(np.abs(ours - oracle).max())
            row["cvec"] = "equal" if diff == 0.0 else f"max |diff| {diff:.2g}" if diff <= 1e-5 else f"FAIL: differs by {diff:.3g}"

        # two sequences, different steering, one batch: each scored exactly as next to a neighbour
        # with its own steering (same batch shapes, so the same kernels: any difference is a leak);
        # against each alone, llama.cpp's kernels are not batch-invariant on quantized weights
        engine = Engine(llm, n_parallel=2, n_ctx=128)
        try:
            flow = engine.add_flow(inn)
            from .prompts import Example

            ex = Example(tokens=tokens, start=1)

            def pair(a: bool, b: bool) -> list[Any]:
                return engine.run([engine.score(ex, [Steer(flow, 1.0)] if s else []) for s in (a, b)])

            mixed, both, neither = pair(True, False), pair(True, True), pair(False, False)
            lp = lambda j: np.array(j.logprobs)  # noqa: E731
            leak = max(float(np.abs(lp(mixed[0]) - lp(both[0])).max()), float(np.abs(lp(mixed[1]) - lp(neither[1])).max()))
            differ = float(np.abs(lp(mixed[0]) - lp(mixed[1])).max())
            alone = engine.run([engine.score(ex)])[0]
            row["batch_vs_alone"] = float(np.abs(lp(mixed[1]) - lp(alone)).max())
            counted = mixed[0].stats["rows_steered"] > 0 and mixed[1].stats["rows_steered"] == 0
            row["batched"] = ("ok" if counted and leak == 0.0 and differ > 1e-3 else
                              f"FAIL: rows {mixed[0].stats['rows_steered']}/{mixed[1].stats['rows_steered']}, "
                              f"next to other steering {leak:.3g}, steered vs not {differ:.3g}")
        except InnsteerError as e:
            row["batched"] = f"refused: {e}"
        finally:
            engine.close()
    finally:
        llm.close()
    return row


def block_error(llm: Any, hf: Any, layer: int, example: Any) -> float:
    """Median relative difference between llama.cpp's l_out-<layer> rows (captured by the native
    steerer) and the transformers copy's block output, on the same tokens (the first, BOS, left out)."""
    st = llm.native_steerer
    st.capture(layer, post=False)
    llm.reset()
    llm.eval(example.tokens)
    cpp = st.captured(layer)
    st.capture(layer, post=False, on=False)
    rows = hf.below(hf.batch([(example.tokens, example.start)]))[0].numpy()
    if rows.shape != cpp.shape:
        raise InvalidArgument(f"block {layer}: transformers gave {rows.shape} rows, llama.cpp {cpp.shape}")
    rel = np.linalg.norm(rows - cpp, axis=1) / np.maximum(np.linalg.norm(cpp, axis=1), 1e-12)
    return float(np.median(rel[1:]))


def check_training(model_path: str | Path, workdir: str | Path, steps: int = 2) -> dict[str, Any]:
    """Training rows: transformers loads the GGUF; block L's output agrees with llama.cpp's
    l_out-L; `train --pairs` through the model runs `steps` steps and writes a flow the runtime
    loads. A refusal is recorded with its message."""
    from ..errors import InnsteerError
    from .prompts import chat_example
    from .steered import SteeredLlama

    workdir = Path(workdir)
    row: dict[str, Any] = {}
    try:
        from ..train.through.hf_model import HFModel
    except ImportError as e:
        return {"training": f"skipped: {e}"}
    llm = SteeredLlama(str(model_path), n_ctx=256, n_batch=128, seed=0, verbose=False)
    try:
        layer = _layer(llm.model_info.n_layer)
        try:
            hf = HFModel(model_path, layer, architecture=llm.model_info.architecture, precision="f32")
        except InnsteerError as e:
            return {"training": f"refused: {e}"}
        ex = chat_example(llm, "What is the capital of France?", "The capital of France is Paris, on the Seine.")
        row["block_error"] = block_error(llm, hf, layer, ex)
        if not row["block_error"] <= BLOCK_TOLERANCE:
            row["training"] = f"FAIL: block {layer} differs from llama.cpp by {row['block_error']:.3g} (median, relative)"
            return row
    finally:
        llm.close()
    pairs = workdir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = workdir / "trained.gguf"
    cli = Path(sys.executable).with_name("innsteer-local")
    cmd = [str(cli) if cli.exists() else "innsteer-local", "train", "--model", str(model_path), "--pairs", str(pairs),
           "--layer", str(layer), "--steps", str(steps), "--coupling-steps", str(steps), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        row["training"] = f"FAIL: train exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
        return row
    try:
        check = SteeredLlama(str(model_path), n_ctx=128, verbose=False)
        try:
            check.add_flow(out)
            check.eval(check.tokenize(PROMPT.encode()))
        finally:
            check.close()
    except Exception as e:  # noqa: BLE001 (recorded in the matrix)
        row["training"] = f"FAIL: the trained flow does not load: {type(e).__name__}: {e}"
        return row
    row["training"] = "ok"
    return row


def support(architecture: str) -> dict[str, Any]:
    """The matrix's verdict for an architecture name (general.architecture), or a note that it was
    not checked."""
    try:
        table = json.loads(MATRIX.read_text())
    except (OSError, ValueError):
        table = {}
    rows = [r for r in table.get("rows", []) if r.get("architecture") == architecture]
    if not rows:
        return {"level": "unchecked", "summary": f"architecture '{architecture}' is not in the compatibility matrix "
                f"(docs/ARCHITECTURES.md): steering refuses a layer llama.cpp never computes, so try it: "
                f"`innsteer-local chat --flow FILE` says so at once if it cannot work"}
    r = rows[0]
    runtime = r.get("runtime", "")
    training = r.get("training", "")
    level = ("full" if runtime == "ok" and training == "ok" else "runtime" if runtime == "ok" else "unsupported")
    words = {"full": "steering and training through the model checked",
             "runtime": "steering checked; training through the model not available (" + training.split(":")[0] + ")",
             "unsupported": "steering refused: " + runtime}
    return {"level": level, "summary": f"{architecture}: {words[level]} (docs/ARCHITECTURES.md)", "row": r}


def model_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file (memory-mapped, only the header is read); "" for a
    file gguf-py cannot read (the flow reader then says precisely what is wrong with it)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        return str(field.contents()) if field is not None else ""
    except Exception:  # noqa: BLE001  (any malformed file: not a model we can name)
        return ""


def render_matrix(rows: list[dict[str, Any]], transformers_version: str, llama_cpp_version: str) -> str:
    """docs/ARCHITECTURES.md's table from the matrix's rows."""

    def cell(v: Any) -> str:
        v = str(v or "-")
        if v == "ok" or v == "equal":
            return "yes"
        if v.startswith("n/a"):
            return "n/a (no control vector in llama.cpp's graph)"
        if "cannot load GGUF models of architecture" in v:
            return "refused (transformers has no GGUF loader for it)"
        if v.startswith("refused"):
            return "refused: " + v.split(": ", 1)[-1].split(";")[0][:90]
        return v[:100]

    lines = ["| model | architecture | quant | runtime | = llama.cpp control vector | batched, per-sequence steering "
             "| transformers block L (median rel. error) | training through the model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['block_error']:.1e}" if isinstance(r.get("block_error"), float) else "-"
        lines.append(f"| {r['model']} | {r.get('architecture', '?')} | {r.get('quant', '?')} | {cell(r.get('runtime'))} "
                     f"| {cell(r.get('cvec'))} | {cell(r.get('batched'))} | {err} | {cell(r.get('training'))} |")
    return "\n".join(lines) + (f"\n\nChecked with llama-cpp-python {llama_cpp_version} (its vendored llama.cpp) and "
                               f"transformers {transformers_version}.\n")

"""GPU verification of the steering callback on both paths (docs/PERFORMANCE.md):

- host: l_out rows read to host memory, steered by the C kernel, written back;
- device: the flow as a ggml graph on ggml's GPU backend, activations copied device-to-device;
- auto (the default): the device graph for prompt batches, the host kernel below MIN_ROWS rows.

For each: cvec oracle, NumPy reference on device activations, bit-identity at strength 0 / off,
then interleaved throughput of every variant in one process.

    python scripts/gpu_check.py MODEL.gguf      # needs llama-cpp-python's libraries built with CUDA (or Metal)

Environment: NGL (layers to offload, default 99), REPS (bench repetitions, default 5), MIN_ROWS
(auto's threshold, default 32), OUT (directory for gpu_check.json), DEVICE_PATH (default device;
cpu-graph runs the same script on ggml's CPU backend).
"""
import llama_cpp  # noqa: F401  (first: on one CUDA image, numpy imported first crashed llama.cpp's loader)
import ctypes, json, os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
from innsteer_local import Flow, SteeredLlama
from innsteer_local.apps.bench import _time_variant, default_flows
from innsteer_local.flow import random_flow
from innsteer_local.runtime.native import NativeFlow

MODEL = sys.argv[1]
NGL = int(os.environ.get("NGL", "99"))
REPS = int(os.environ.get("REPS", "5"))
MIN_ROWS = int(os.environ.get("MIN_ROWS", "32"))
DEVICE = os.environ.get("DEVICE_PATH", "device")  # "cpu-graph": a dry run of this script without a GPU
PATHS = {"host": ("host", 1), "device": (DEVICE, 1), "auto": ("auto" if DEVICE == "device" else DEVICE, MIN_ROWS)}
res = {"n_gpu_layers": NGL, "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload())}
tmp = Path(tempfile.mkdtemp())


def rel(a, ref):
    return float((np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


llm = SteeredLlama(MODEL, n_ctx=1024, n_batch=512, logits_all=True, n_gpu_layers=NGL, verbose=False, seed=0)
info = llm.model_info
st = llm.native_steerer
toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. Then the fox ran into the forest and")


def logits(m):
    m.reset(); m.eval(toks); return np.array(m.scores[:len(toks)], dtype=np.float32)


base = logits(llm)
v = np.random.default_rng(15).normal(0, 1, info.n_embd).astype(np.float32) * 2
Flow.linear({15: v}, info).save(tmp / "lin.gguf")
cv = np.zeros((info.n_layer, info.n_embd), np.float32); cv[14] = np.float32(2.5) * v
llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, cv.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), cv.size, info.n_embd, 1, info.n_layer - 1)
oracle = logits(llm)
llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, info.n_embd, -1, -1)
res["cvec_effect_max_abs"] = float(np.abs(oracle - base).max())
st.capture(10); llm.reset(); llm.eval(toks); rows = st.captured(10); st.capture(10, on=False); st.clear_captured()
random_flow(info, [10], rank=48, blocks=4, hidden=96, seed=3, mean=rows.mean(0), std=rows.std(0)).save(tmp / "rnd.gguf")
ref_site = Flow.load(tmp / "rnd.gguf").site(10)

for name in ("host", "device"):
    path, min_rows = PATHS[name]
    st.set_path(path, min_rows)
    r = res[name] = {"backend": st.device_name or "host"}
    dev0 = st.rows_on_device
    # 1. oracle: linear flow vs llama.cpp control vector, both on the GPU
    h = llm.add_flow(tmp / "lin.gguf", strength=2.5)
    r["oracle_max_abs_diff"] = float(np.abs(logits(llm) - oracle).max())
    llm.remove_flow(h)
    # 2. nonlinear flow vs numpy reference on GPU activations
    h = llm.add_flow(tmp / "rnd.gguf", strength=0.8)
    st.capture(10, post=False); st.capture(10, post=True)
    steered = logits(llm)
    pre, post = st.captured(10, post=False), st.captured(10, post=True)
    st.capture(10, post=False, on=False); st.capture(10, post=True, on=False); st.clear_captured()
    ref = ref_site.steer(pre, 0.8)
    r["nonlinear_rel_err"] = rel(post, ref)
    r["nonlinear_moves"] = rel(ref, pre)
    r["steered_logit_effect"] = float(np.abs(steered - base).max())
    # 3. strength 0 and off: bit-identical
    llm.set_strength(0.0, h); r["strength0_bit_identical"] = bool(np.array_equal(logits(llm), base))
    llm.set_strength(0.8, h); llm.disable(); r["off_bit_identical"] = bool(np.array_equal(logits(llm), base))
    llm.enable(); llm.remove_flow(h)
    r["rows_on_device"] = st.rows_on_device - dev0
    r["last_error"] = st.last_error
res["rows_rejected"] = llm.steering_stats["rows_rejected_nonfinite"]
# the graph on the GPU applied to host rows, per batch size (f32 matrix products may use TF32 there)
nf = NativeFlow(tmp / "rnd.gguf")
big = np.concatenate([rows] * (512 // len(rows) + 1))[:512]
res["graph_rel_err_by_batch"] = {n: rel(nf.steer_graph(big[:n], 0.8, path=DEVICE), ref_site.steer(big[:n], 0.8))
                                 for n in (1, 7, 512)}
print(json.dumps(res, indent=1), flush=True)
llm.close()

# 4. throughput, interleaved: every variant once per repetition
llm = SteeredLlama(MODEL, n_ctx=1024, n_batch=512, n_gpu_layers=NGL, verbose=False)
plain = llama_cpp.Llama(MODEL, n_ctx=1024, n_batch=512, n_gpu_layers=NGL, verbose=False)
st = llm.native_steerer
rng = np.random.default_rng(0)
tokens = [int(t) for t in rng.integers(100, 30000, size=512 + 128)]
cvec = np.zeros((info.n_layer, info.n_embd), dtype=np.float32); cvec[14] = rng.normal(0, 1, info.n_embd)


def set_cvec(on):
    ptr = cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if on else None
    llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, cvec.size if on else 0, info.n_embd, 1 if on else -1,
                                     info.n_layer - 1 if on else -1)


first_use = {}


def flow_variant(path_name, flow_path):
    handle = []

    def setup():
        st.set_path(*PATHS[path_name])
        handle.append(llm.add_flow(flow_path))
        # steady state: weights uploaded and graphs built for both batch shapes before timing
        t0 = time.perf_counter(); llm.reset(); llm.eval(tokens[:512])
        first_use.setdefault(f"{path_name}: {flow_path.name}", (time.perf_counter() - t0) * 1e3)
        llm.eval(tokens[512:514])

    return setup, lambda: llm.remove_flow(handle.pop())


variants = [("unsteered", None, lambda: None, lambda: None), ("plain llama.cpp (no callback)", plain, lambda: None, lambda: None),
            ("llama.cpp control vector (layer 15)", None, lambda: set_cvec(True), lambda: set_cvec(False))]
flows = default_flows(llm, tmp)
for path_name in PATHS:
    for fname, fpath in flows.items():
        if "f16" in fname:
            continue
        variants.append((f"{fname}, {path_name}", None, *flow_variant(path_name, fpath)))
times = {v[0]: ([], []) for v in variants}
for m in (llm, plain):
    _time_variant(m, tokens, 64, 8)
for rep in range(REPS):
    for name, model, setup, teardown in variants:
        setup()
        try:
            p, d = _time_variant(model or llm, tokens, 512, 128)
        finally:
            teardown()
        times[name][0].append(p); times[name][1].append(d)
bp, bd = statistics.median(times["unsteered"][0]), statistics.median(times["unsteered"][1])
rows_out = []
print(f"{'variant':<44} {'prompt tok/s':>12} {'ratio':>6} {'decode tok/s':>12} {'ratio':>6}")
for name, (p, d) in times.items():
    mp, md = statistics.median(p), statistics.median(d)
    rows_out.append({"variant": name, "prompt_tps": mp, "prompt_ratio": mp / bp, "decode_tps": md, "decode_ratio": md / bd})
    print(f"{name:<44} {mp:>12.1f} {mp / bp:>6.3f} {md:>12.1f} {md / bd:>6.3f}")
print("first 512-token prompt after attaching (ms):", json.dumps(first_use), flush=True)
print("rows on device:", st.rows_on_device, "rows steered:", st.rows_steered, "last error:", repr(st.last_error))
out = os.environ.get("OUT")
if out:
    Path(out, "gpu_check.json").write_text(json.dumps({"checks": res, "bench": rows_out, "first_use_ms": first_use,
                                                        "reps": REPS, "min_rows": MIN_ROWS}, indent=1))

"""GPU verification of the steering callback: cvec oracle, NumPy reference on device activations,
bit-identity at strength 0 / off, and interleaved throughput (docs/PERFORMANCE.md).

    python scripts/gpu_check.py MODEL.gguf      # needs llama-cpp-python built with CUDA (or Metal)

Environment: NGL (layers to offload, default 99), REPS (bench repetitions, default 5).
"""
import llama_cpp  # noqa: F401  (first: on one CUDA image, numpy imported first crashed llama.cpp's loader)
import ctypes, json, os, sys, tempfile
from pathlib import Path
import numpy as np
from innsteer_local import Flow, SteeredLlama
from innsteer_local.bench import run_bench, default_flows, format_table

MODEL = sys.argv[1]
NGL = int(os.environ.get("NGL", "99"))
res = {"n_gpu_layers": NGL, "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload())}
tmp = Path(tempfile.mkdtemp())
llm = SteeredLlama(MODEL, n_ctx=1024, n_batch=512, logits_all=True, n_gpu_layers=NGL, verbose=False, seed=0)
info = llm.model_info
toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. Then the fox ran into the forest and")
def logits(m):
    m.reset(); m.eval(toks); return np.array(m.scores[:len(toks)], dtype=np.float32)
base = logits(llm)
# 1. oracle: linear flow vs llama.cpp control vector, both on the GPU
v = np.random.default_rng(15).normal(0, 1, info.n_embd).astype(np.float32) * 2
Flow.linear({15: v}, info).save(tmp / "lin.gguf")
cv = np.zeros((info.n_layer, info.n_embd), np.float32); cv[14] = np.float32(2.5) * v
llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, cv.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), cv.size, info.n_embd, 1, info.n_layer - 1)
oracle = logits(llm)
llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, info.n_embd, -1, -1)
h = llm.add_flow(tmp / "lin.gguf", strength=2.5)
ours = logits(llm)
llm.remove_flow(h)
res["oracle_max_abs_diff"] = float(np.abs(ours - oracle).max())
res["cvec_effect_max_abs"] = float(np.abs(oracle - base).max())
# 2. nonlinear flow vs numpy reference on GPU activations
st = llm.native_steerer
st.capture(10); llm.reset(); llm.eval(toks); rows = st.captured(10); st.capture(10, on=False); st.clear_captured()
Flow.random(info, [10], rank=48, blocks=4, hidden=96, seed=3, mean=rows.mean(0), std=rows.std(0)).save(tmp / "rnd.gguf")
h = llm.add_flow(tmp / "rnd.gguf", strength=0.8)
st.capture(10, post=False); st.capture(10, post=True)
steered = logits(llm)
pre, post = st.captured(10, post=False), st.captured(10, post=True)
st.capture(10, post=False, on=False); st.capture(10, post=True, on=False); st.clear_captured()
ref = Flow.load(tmp / "rnd.gguf").site(10).steer(pre, 0.8)
res["nonlinear_rel_err"] = float((np.linalg.norm(post - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())
res["nonlinear_moves"] = float((np.linalg.norm(post - pre, axis=1) / np.linalg.norm(pre, axis=1)).max())
res["steered_logit_effect"] = float(np.abs(steered - base).max())
# 3. strength 0 and off: bit-identical
llm.set_strength(0.0, h); res["strength0_bit_identical"] = bool(np.array_equal(logits(llm), base))
llm.set_strength(0.8, h); llm.disable(); res["off_bit_identical"] = bool(np.array_equal(logits(llm), base))
llm.enable(); llm.remove_flow(h)
res["rows_rejected"] = llm.steering_stats["rows_rejected_nonfinite"]
print(json.dumps(res, indent=1), flush=True)
llm.close()
# 4. throughput, interleaved
llm = SteeredLlama(MODEL, n_ctx=1024, n_batch=512, n_gpu_layers=NGL, verbose=False)
plain = llama_cpp.Llama(MODEL, n_ctx=1024, n_batch=512, n_gpu_layers=NGL, verbose=False)
result = run_bench(llm, default_flows(llm, tmp), n_prompt=512, n_gen=128, reps=int(os.environ.get("REPS", "5")), plain=plain)
print(format_table(result), flush=True)
out = os.environ.get("OUT")
if out:
    Path(out, "gpu_check.json").write_text(json.dumps({"checks": res, "bench": result}, indent=1))

"""Tiny GGUF models with random weights, one per architecture, for the compatibility matrix
(docs/ARCHITECTURES.md, tests/integration/test_architectures.py, scripts/architecture_matrix.py).

Random weights exercise everything steering touches: the architecture's graph (and so whether
llama.cpp computes `l_out-N`), tensor names, the KV cache, the eval callback, transformers' GGUF
loader and training through the model. Tensor names and keys follow gguf-py's per-architecture
tables; the tokenizer (and chat template) is the registry model's, copied from its GGUF, so both
llama.cpp and transformers accept it. Nothing is downloaded.

    path = write_tiny_model("qwen3", "tiny-qwen3.gguf")          # F16, ~13 MB
    path = write_tiny_model("llama", "tiny-llama-q4k.gguf", quant="Q4_K")
"""

from __future__ import annotations

import ctypes
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ..errors import InvalidArgument, InnsteerError

# the shape every tiny model shares: wide enough for Q4_K blocks (256) in the feed-forward rows
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 16
N_FF = 256
N_LAYER = 4
N_CTX = 2048
N_EXPERT, N_EXPERT_USED, N_FF_EXPERT = 4, 2, 256
QUANTS = ("F16", "Q8_0", "Q4_K")


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: llama.cpp's architecture name and what the tiny model needs."""

    name: str  # the matrix's name
    gguf_arch: str  # general.architecture
    quant: str = "F16"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # gemma2/3, olmo2: norms after attention and feed-forward
    pre_norms: bool = True  # olmo2 has none before the blocks
    fused_qkv: bool = False  # phi3
    fused_up: bool = False  # phi3: ffn_up holds gate and up
    moe: str = ""  # "", "shared" (qwen2moe), "plain" (qwen3moe)
    tied_output: bool = False  # no output.weight: the embedding is reused
    extra: dict[str, Any] = field(default_factory=dict)  # more {arch}.* keys
    extra_tokens: tuple[str, ...] = ()  # control tokens llama.cpp's vocabulary loader looks up by name
    # transformers' GGUF loader reads no head or expert widths for some architectures and uses its
    # config defaults instead (Qwen3's head_dim 128, Gemma 3's query scale 256, Qwen1.5-MoE's expert
    # widths 1408 / 5632, Qwen3-MoE's 768), as the real models have them: so does the tiny model
    head_dim: int = HEAD_DIM
    n_ff_expert: int = N_FF_EXPERT
    n_ff_shared: int = N_FF
    note: str = ""


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", "llama"),
    # Mistral's GGUFs (7B, Nemo, Small) are written with llama.cpp's llama architecture
    Arch("mistral", "llama", quant="Q8_0", note="Mistral's GGUFs use the llama architecture"),
    Arch("qwen2", "qwen2", qkv_bias=True),
    Arch("qwen3", "qwen3", qk_norm=True, quant="Q4_K", head_dim=128),
    Arch("gemma2", "gemma2", post_norms=True, tied_output=True,
         extra={"attention.sliding_window": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    Arch("gemma3", "gemma3", qk_norm=True, post_norms=True, tied_output=True, extra={"attention.sliding_window": 64},
         head_dim=256),  # transformers scales queries by its default query_pre_attn_scalar, 256
    Arch("phi3", "phi3", fused_qkv=True, fused_up=True, quant="Q8_0", extra_tokens=("<|end|>", "<|assistant|>", "<|system|>", "<|user|>", "<s>", "</s>", "<unk>")),
    Arch("granite", "granite", extra={"attention.scale": 0.25, "embedding_scale": 2.0, "residual_scale": 0.5,
                                      "logit_scale": 4.0}),
    Arch("olmo2", "olmo2", qk_norm=True, post_norms=True, pre_norms=False),
    Arch("qwen2moe", "qwen2moe", qkv_bias=True, moe="shared", quant="Q8_0", n_ff_expert=1408, n_ff_shared=5632),
    Arch("qwen3moe", "qwen3moe", qk_norm=True, moe="plain", quant="Q4_K", n_ff_expert=768),
]}


def _tokenizer_fields(source: Path) -> list[tuple[str, Any, Any]]:
    """(key, value, GGUF type) of the source model's tokenizer.* keys."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            out.append((key, list(f.contents()), f.types[1]))
        else:
            out.append((key, f.contents(), vtype))
    return out


def _tensors(a: Arch, n_vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor of the tiny model, numpy shape (rows, cols) = ggml's (ne1, ne0)."""

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.05).astype(np.float32)

    hd, ffe, ffs = a.head_dim, a.n_ff_expert, a.n_ff_shared
    q, kv = N_HEAD * hd, N_HEAD_KV * hd
    t = {"token_embd.weight": w(n_vocab, N_EMBD, scale=0.5), "output_norm.weight": norm(N_EMBD)}
    if not a.tied_output:
        t["output.weight"] = w(n_vocab, N_EMBD)
    for i in range(N_LAYER):
        b = f"blk.{i}."
        if a.pre_norms:
            t[b + "attn_norm.weight"] = norm(N_EMBD)
            t[b + "ffn_norm.weight"] = norm(N_EMBD)
        if a.fused_qkv:
            t[b + "attn_qkv.weight"] = w(q + 2 * kv, N_EMBD)
        else:
            t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"] = w(q, N_EMBD), w(kv, N_EMBD), w(kv, N_EMBD)
        if a.qkv_bias:
            t[b + "attn_q.bias"], t[b + "attn_k.bias"], t[b + "attn_v.bias"] = w(q), w(kv), w(kv)
        if a.qk_norm:
            # olmo2 normalises the whole projection, the others each head
            t[b + "attn_q_norm.weight"] = norm(q if a.name == "olmo2" else hd)
            t[b + "attn_k_norm.weight"] = norm(kv if a.name == "olmo2" else hd)
        t[b + "attn_output.weight"] = w(N_EMBD, q)
        if a.post_norms:
            t[b + "post_attention_norm.weight"] = norm(N_EMBD)
            t[b + "post_ffw_norm.weight"] = norm(N_EMBD)
        if a.moe:
            t[b + "ffn_gate_inp.weight"] = w(N_EXPERT, N_EMBD, scale=0.5)
            t[b + "ffn_gate_exps.weight"] = w(N_EXPERT, ffe, N_EMBD)
            t[b + "ffn_up_exps.weight"] = w(N_EXPERT, ffe, N_EMBD)
            t[b + "ffn_down_exps.weight"] = w(N_EXPERT, N_EMBD, ffe)
            if a.moe == "shared":
                t[b + "ffn_gate_inp_shexp.weight"] = w(N_EMBD)
                t[b + "ffn_gate_shexp.weight"] = w(ffs, N_EMBD)
                t[b + "ffn_up_shexp.weight"] = w(ffs, N_EMBD)
                t[b + "ffn_down_shexp.weight"] = w(N_EMBD, ffs)
        elif a.fused_up:
            t[b + "ffn_up.weight"] = w(2 * N_FF, N_EMBD)
            t[b + "ffn_down.weight"] = w(N_EMBD, N_FF)
        else:
            t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"] = w(N_FF, N_EMBD), w(N_FF, N_EMBD)
            t[b + "ffn_down.weight"] = w(N_EMBD, N_FF)
    return t


def write_tiny_model(name: str, path: str | Path, seed: int = 0, quant: Optional[str] = None,
                     tokenizer_from: Optional[str | Path] = None) -> Path:
    """Writes the tiny model of architecture `name` (ARCHITECTURES) to `path`, quantized to `quant`
    (default: the row's own; F16, Q8_0 or Q4_K by llama.cpp's own quantizer, which keeps types a
    row's width cannot hold, as it does for real models)."""
    import gguf

    from ..runtime import registry

    a = ARCHITECTURES[name]
    quant = quant or a.quant
    if quant not in QUANTS:
        raise InvalidArgument(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    source = Path(tokenizer_from) if tokenizer_from else registry.resolve_model("smollm2-135m")[0]
    tok = _tokenizer_fields(source)
    if a.extra_tokens:
        tok = [(k, v + list(a.extra_tokens) if k == "tokenizer.ggml.tokens" else
                v + [3] * len(a.extra_tokens) if k == "tokenizer.ggml.token_type" else v, t) for k, v, t in tok]
    n_vocab = next(len(v) for k, v, _ in tok if k == "tokenizer.ggml.tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f16 = path if quant == "F16" else Path(tempfile.mkdtemp(prefix="innsteer-tiny-")) / "f16.gguf"
    writer = gguf.GGUFWriter(str(f16), a.gguf_arch)
    writer.add_name(f"tiny-{name}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    arch = a.gguf_arch
    u32 = {"context_length": N_CTX, "embedding_length": N_EMBD, "block_count": N_LAYER,
           "feed_forward_length": N_FF, "attention.head_count": N_HEAD, "attention.head_count_kv": N_HEAD_KV,
           "attention.key_length": a.head_dim, "attention.value_length": a.head_dim,
           "rope.dimension_count": a.head_dim,
           "vocab_size": n_vocab}
    if a.moe:
        u32.update({"expert_count": N_EXPERT, "expert_used_count": N_EXPERT_USED,
                    "expert_feed_forward_length": a.n_ff_expert})
        if a.moe == "shared":
            u32["expert_shared_feed_forward_length"] = a.n_ff_shared
    for k, v in u32.items():
        writer.add_uint32(f"{arch}.{k}", v)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    for k, v in a.extra.items():
        (writer.add_uint32 if isinstance(v, int) else writer.add_float32)(f"{arch}.{k}", v)
    for key, value, vtype in tok:
        if isinstance(value, list):
            writer.add_array(key, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, bool(value))
        else:
            writer.add_uint32(key, int(value))
    for tname, data in _tensors(a, n_vocab, np.random.default_rng(seed)).items():
        # norms and biases stay f32 (as convert_hf_to_gguf.py keeps 1-D tensors); matrices f16
        writer.add_tensor(tname, data if data.ndim == 1 else data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if quant != "F16":
        _quantize(f16, path, quant)
        f16.unlink()
        f16.parent.rmdir()
    return path


def _quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from the F16 file."""
    import llama_cpp

    ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # a line for every tensor that keeps another type
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise InnsteerError(f"llama_model_quantize({quant}) failed with {rc}")

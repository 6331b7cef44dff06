"""A differentiable copy of the same GGUF model in PyTorch (transformers, dequantized to float32),
split at the steered layer: the layers up to L run once per text without gradients (their
output is cached), the layers above L run with gradients flowing back into the flow.

Layer L here is llama.cpp's `l_out-L`: the output of block L (transformers' hidden_states[L+1]).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ...choices import DEVICES, PRECISIONS
from ...errors import InnsteerError


def supported_architectures() -> list[str]:
    """GGUF architectures (general.architecture) transformers can load (its own list, whose
    mixture-of-experts entries carry transformers' names: qwen2_moe is GGUF's qwen2moe)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        return sorted(k.replace("_moe", "moe") for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
    except ImportError:  # moved in some release: name the ones we have checked
        return ["gemma3", "llama"]


def _transformers() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise InnsteerError("training through the model needs torch and transformers: "
                            "pip install 'innsteer-local[train]'") from e
    return transformers


def resolve_device(device: str) -> str:
    """auto -> cuda, then mps, then cpu; an explicit device must exist."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InnsteerError("--device cuda: torch sees no CUDA device (is this a CPU build of torch?)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise InnsteerError("--device mps: torch sees no Apple GPU")
    if device not in DEVICES:
        raise InnsteerError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    return device


@dataclass
class Batch:
    """Token ids of several texts, right-padded (what `below` reads)."""

    input_ids: Any  # (B, T) long
    attention_mask: Any  # (B, T) long
    lengths: list[int]


# prompt tokens before the reply that stay in the live part of `above` (gradients reach the steering
# of these and of the reply); the earlier prompt rows are steered too, but their keys and values are
# computed once without gradients: training's cost is then about proportional to the reply, not the
# prompt (a chat template's system prompt alone is 24 tokens on smollm2-135m)
LIVE_PROMPT = 8


@dataclass
class Layout:
    """Texts for `above`: the first `cuts[i]` rows of text i left-padded to P prefix columns, the
    rest right-padded to S live columns; `score` marks the live columns that predict a reply token,
    `targets` the token each live column predicts."""

    cuts: list[int]
    lengths: list[int]
    P: int
    S: int
    prefix_pos: Any
    prefix_valid: Any
    live_pos: Any
    live_valid: Any
    score: Any
    targets: Any


class HFModel:
    """The frozen model, split at layer L."""

    def __init__(self, model_path: str | os.PathLike[str], layer: int, device: str = "cpu",
                 architecture: str = "", threads: Optional[int] = None, cache_dir: Optional[Path] = None,
                 precision: str = "auto"):
        """cache_dir: where the dequantized copy is kept between runs (keyed by the GGUF's sha256);
        None loads from the GGUF every time. precision: of the layers above L (see PRECISIONS)."""
        _transformers()
        import torch

        if threads:
            torch.set_num_threads(threads)
        path = Path(model_path)
        supported = supported_architectures()
        if architecture and architecture not in supported:
            raise InnsteerError(f"transformers cannot load GGUF models of architecture '{architecture}' for training "
                                f"through the model; it supports: {', '.join(supported)}. Use --objective geometry "
                                "(activation space, no transformers) for this model.")
        model = None
        folder = None
        if cache_dir is not None:
            from ...runtime.registry import file_sha256

            folder = Path(cache_dir) / file_sha256(path)[:32]
            model = _load_copy(folder)
        if model is None:
            model = _load_gguf(path, supported)
            if folder is not None:
                _save_copy(model, folder)
        self._init(model, layer, resolve_device(device), precision)

    @classmethod
    def from_model(cls, model: Any, layer: int, device: str = "cpu", precision: str = "f32") -> "HFModel":
        """A transformers causal LM already in memory (tests build tiny ones)."""
        self = cls.__new__(cls)
        self._init(model, layer, device, precision)
        return self

    def _init(self, model: Any, layer: int, device: str, precision: str = "f32") -> None:
        self.device = device
        self.model = model
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = self._decoder_layers()
        n = len(self.layers)
        if not 0 <= layer < n - 1:
            raise InnsteerError(f"layer {layer} is outside 0..{n - 2} for this model ({n} layers)")
        self.layer = layer
        self.n_layer = n
        self.n_embd = int(self.model.config.hidden_size)
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.precision = choose_precision(precision, device)
        self._head = None
        if self.precision == "bf16":
            import torch

            # the frozen matrices above L once in bf16: autocast would cast them again at every pass
            # (they need no gradient, so its cast cache does not keep them). The output layer gets
            # its own copy: it is often the input embedding too, which the layers below L read in f32.
            for module in self.layers[layer + 1:].modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
            self._head = self.model.get_output_embeddings().weight.detach().to(torch.bfloat16)

    def _decoder_layers(self) -> Any:
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise InnsteerError(f"{type(self.model).__name__} has no decoder layer list that innsteer can split")
        return layers

    @property
    def decoder(self) -> Any:
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    def batch(self, texts: Sequence[tuple[list[int], int]]) -> Batch:
        """(tokens, reply start) pairs -> a right-padded batch."""
        import torch

        width = max(len(t) for t, _ in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        att = torch.zeros(len(texts), width, dtype=torch.long)
        for i, (tokens, _) in enumerate(texts):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            att[i, : len(tokens)] = 1
        return Batch(ids.to(self.device), att.to(self.device), [len(t) for t, _ in texts])

    def below(self, batch: Batch) -> Any:
        """Output of block L (llama.cpp's l_out-L) for every position, without gradients; the
        layers above L are not run."""
        import torch

        captured: list[Any] = []

        def stop(module: Any, inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        hook = self.layers[self.layer].register_forward_hook(stop)
        try:
            with torch.no_grad():
                self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured[0]

    def layout(self, texts: Sequence[tuple[list[int], int]], live_prompt: Optional[int] = LIVE_PROMPT) -> "Layout":
        """Where each text's rows go for `above`: (tokens, reply start) pairs, each cut
        `live_prompt` tokens before its reply starts (None: not cut, every row live)."""
        import torch

        cuts = [0 if live_prompt is None else max(0, min(start - live_prompt, len(tokens) - 1)) for tokens, start in texts]
        P, S = max(cuts), max(len(t) - c for (t, _), c in zip(texts, cuts))
        B = len(texts)
        prefix_pos = torch.zeros(B, P, dtype=torch.long)
        prefix_valid = torch.zeros(B, P, dtype=torch.bool)
        live_pos = torch.zeros(B, S, dtype=torch.long)
        live_valid = torch.zeros(B, S, dtype=torch.bool)
        score = torch.zeros(B, S, dtype=torch.bool)
        targets = torch.zeros(B, S, dtype=torch.long)
        for i, ((tokens, start), c) in enumerate(zip(texts, cuts)):
            n = len(tokens) - c
            prefix_pos[i, P - c:] = torch.arange(c)
            prefix_valid[i, P - c:] = True
            live_pos[i, :n] = torch.arange(c, len(tokens))
            live_valid[i, :n] = True
            targets[i, : n - 1] = torch.tensor(tokens[c + 1:])
            # column j predicts token c + j + 1: scored when that token belongs to the reply
            score[i, max(start - 1 - c, 0): n - 1] = True
        dev = self.device
        return Layout(cuts, [len(t) for t, _ in texts], P, S, prefix_pos.to(dev), prefix_valid.to(dev),
                      live_pos.to(dev), live_valid.to(dev), score.to(dev), targets.to(dev))

    def place(self, rows: Sequence[Any], lay: "Layout") -> tuple[Any, Any]:
        """Block L's output rows of each text (T_i, n_embd) in the layout: (B, P, n_embd) prefixes
        and (B, S, n_embd) live parts, zeros in the padding."""
        import torch

        B, d = len(rows), rows[0].shape[-1]
        prefix = torch.zeros(B, lay.P, d, dtype=rows[0].dtype, device=self.device)
        live = torch.zeros(B, lay.S, d, dtype=rows[0].dtype, device=self.device)
        for i, (r, c) in enumerate(zip(rows, lay.cuts)):
            prefix[i, lay.P - c:] = r[:c]
            live[i, : len(r) - c] = r[c:]
        return prefix, live

    def above(self, prefix: Any, live: Any, lay: "Layout") -> Any:
        """Final hidden states (B, S, n_embd), after the last norm, of the live columns, from block
        L's output in the layout: the layers above L only, the prefixes without gradients (their
        keys and values are cached), the live parts differentiable; matrix products in
        self.precision. Steering is a function of these inputs, so the prefix rows may be steered
        too: the forward pass is exact, only its gradient stops at the prefix."""
        import torch

        dtype = live.dtype
        with self._only_layers_above(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                        enabled=self.precision == "bf16"):
            cache = None
            if lay.P:
                with torch.no_grad():
                    cache = self.decoder(inputs_embeds=prefix, attention_mask=self._masks(lay, prefix_only=True),
                                         position_ids=lay.prefix_pos, use_cache=True).cache
            out = self.decoder(inputs_embeds=live, attention_mask=self._masks(lay, prefix_only=False),
                               position_ids=lay.live_pos, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state.to(dtype)

    def _masks(self, lay: "Layout", prefix_only: bool) -> Any:
        """The 4D boolean attention masks (True = attend) for the prefix columns or the live ones
        (which see every valid prefix column and the live columns up to themselves); a padding
        query attends to itself, so no row is empty (an empty row makes NaN keys for the others)."""
        import torch

        if prefix_only:
            q_valid, k_valid, q_at = lay.prefix_valid, lay.prefix_valid, 0
        else:
            q_valid, k_valid, q_at = lay.live_valid, torch.cat([lay.prefix_valid, lay.live_valid], 1), lay.P
        q = torch.arange(q_valid.shape[1], device=self.device)[:, None] + q_at
        k = torch.arange(k_valid.shape[1], device=self.device)[None, :]
        causal = k <= q
        mask = (causal[None] & k_valid[:, None, :] & q_valid[:, :, None]) | (k == q)[None]
        mask = mask[:, None]
        layer_types = getattr(self._inner_config(), "layer_types", None)
        if not layer_types:
            return mask
        window = getattr(self._inner_config(), "sliding_window", None)
        sliding = mask & ((q - k) < window)[None, None] if window else mask
        return {"full_attention": mask, "sliding_attention": sliding, "chunked_attention": mask}

    def _inner_config(self) -> Any:
        return getattr(self.decoder, "config", self.model.config)

    def logits(self, final_hidden: Any) -> Any:
        """Vocabulary logits of (N, n_embd) final hidden states (in their dtype), the product in self.precision."""
        import torch

        if self._head is not None:
            logits = torch.nn.functional.linear(final_hidden.to(self._head.dtype), self._head).to(final_hidden.dtype)
        else:
            logits = self.model.get_output_embeddings()(final_hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @contextlib.contextmanager
    def _only_layers_above(self) -> Iterator[None]:
        import torch

        decoder = self.decoder
        full = decoder.layers
        config = self.model.config
        inner_config = getattr(decoder, "config", config)
        n_hidden = inner_config.num_hidden_layers
        layer_types = getattr(inner_config, "layer_types", None)
        decoder.layers = torch.nn.ModuleList(list(full)[self.layer + 1:])
        inner_config.num_hidden_layers = len(decoder.layers)
        if layer_types is not None:
            inner_config.layer_types = list(layer_types)[self.layer + 1:]
        # a cache made for these layers numbers them from 0: so must the modules that index it
        numbered = [(m, m.layer_idx) for m in decoder.layers.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        for m, idx in numbered:
            m.layer_idx = idx - self.layer - 1
        try:
            yield
        finally:
            for m, idx in numbered:
                m.layer_idx = idx
            decoder.layers = full
            inner_config.num_hidden_layers = n_hidden
            if layer_types is not None:
                inner_config.layer_types = layer_types


# precision of the layers above L and the output layer during training: bf16 matrix products halve
# the time on CPUs with bf16 instructions (AVX512-BF16, AMX) and on GPUs; norms, softmax and the
# objective stay float32. On smollm2-135m the reply tokens' log-probabilities moved by 0.03 nat on
# average (KL 6e-4 nat) against a float32 pass, far below what steering changes, and the unsteered
# reference (encode) is computed the same way, so log-ratios to it carry no offset. The names:
# choices.PRECISIONS.


def choose_precision(precision: str, device: str) -> str:
    """auto: bf16 on a GPU that supports it and on CPUs with bf16 instructions (read from the CPU's
    flags, not timed: the choice must not depend on what else the machine is doing, since cached
    encodings are kept per precision), else f32."""
    import torch

    if precision not in PRECISIONS:
        raise InnsteerError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "f32"
    if device != "cpu":
        return "f32"
    return "bf16" if cpu_has_bf16() else "f32"


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (Linux: /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _load_gguf(path: Path, supported: Sequence[str]) -> Any:
    transformers = _transformers()
    import torch

    try:
        with _quiet(), _gguf_read_once():
            return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                     dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for an unsupported file
        raise InnsteerError(f"transformers could not load {path.name} ({type(e).__name__}: {str(e)[:300]}); "
                            f"architectures it loads from GGUF: {', '.join(supported)}") from None


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF twice (config, then weights: 4 s each for smollm2-135m, most of
    it the tokenizer's fields) and builds gguf-py's tensor-name table anew for every module (397
    times, 5 s), both read-only; during one load each is made once. Without gguf-py, nothing to do."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def read(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


# the dequantized copy on disk: config, float32 weights (safetensors: no pickle) and what wrote them
COPY_VERSION = 1


def _copy_meta() -> dict[str, Any]:
    import transformers

    return {"version": COPY_VERSION, "transformers": transformers.__version__}


def _save_copy(model: Any, folder: Path) -> None:
    """Writes the dequantized model once; a failure (disk full, read-only cache) only costs the
    next run the slow load again. Tensors that share storage (tied embeddings) are stored once."""
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors, aliases = {}, {}
    for key, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        tensors[key] = t.detach().contiguous()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
        (tmp / "copy.json").write_text(json.dumps({**_copy_meta(), "aliases": aliases,
                                                   "class": type(model).__name__}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_copy(folder: Path) -> Any:
    """The model from its dequantized copy; None when there is none or it was written by another
    version (then it is rebuilt from the GGUF)."""
    import json

    try:
        meta = json.loads((folder / "copy.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if {k: meta.get(k) for k in _copy_meta()} != _copy_meta():
        return None
    transformers = _transformers()
    import torch
    from safetensors.torch import load_file

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older releases: initialise (slower, same result after loading)
        no_init_weights = contextlib.nullcontext
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with no_init_weights(), _quiet():
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tensors = load_file(str(folder / "model.safetensors"))
        result = model.load_state_dict(tensors, strict=False)
    except Exception:  # a damaged copy: load from the GGUF again
        return None
    aliases = meta.get("aliases", {})
    if result.unexpected_keys or set(result.missing_keys) - set(aliases):
        return None
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, source in aliases.items():  # tied weights: the same tensor again
        if key in state and source in state:
            _assign(model, key, state[source])
    return model.eval()


def _assign(model: Any, key: str, tensor: Any) -> None:
    *parents, name = key.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, tensor)


class _Stop(Exception):
    """Raised by the hook on block L: nothing above it needs computing."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers reports its dequantization with its own progress bars and logs; keep the user's
    terminal for ours."""
    import logging

    from transformers.utils import logging as hf_logging

    try:  # the GGUF dequantization bar is a plain tqdm that no setting turns off
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    logger = logging.getLogger("transformers")
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar

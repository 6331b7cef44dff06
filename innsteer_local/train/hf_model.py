"""A differentiable copy of the same GGUF model in PyTorch (transformers, dequantized to float32),
split at the steered layer: the layers up to L run once per text without gradients (their
output is cached), the layers above L run with gradients flowing back into the flow.

Layer L here is llama.cpp's `l_out-L`: the output of block L (transformers' hidden_states[L+1]).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..errors import InnsteerError


def supported_architectures() -> list[str]:
    """GGUF architectures transformers can load (its own list)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
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
    if device not in ("cpu", "cuda", "mps"):
        raise InnsteerError(f"unknown device {device!r}; choose cpu, cuda, mps or auto")
    return device


@dataclass
class Batch:
    """Token ids of several texts, right-padded, with the positions whose next token is scored."""

    input_ids: Any  # (B, T) long
    attention_mask: Any  # (B, T) long
    score_mask: Any  # (B, T) bool: position t predicts token t+1, which belongs to the reply
    lengths: list[int]


class HFModel:
    """The frozen model, split at layer L."""

    def __init__(self, model_path: str | os.PathLike[str], layer: int, device: str = "cpu",
                 architecture: str = "", threads: Optional[int] = None):
        transformers = _transformers()
        import torch

        if threads:
            torch.set_num_threads(threads)
        path = Path(model_path)
        supported = supported_architectures()
        if architecture and architecture not in supported:
            raise InnsteerError(f"transformers cannot load GGUF models of architecture '{architecture}' for training "
                                f"through the model; it supports: {', '.join(supported)}. Use --objective geometry "
                                "(activation space, no transformers) for this model.")
        try:
            with _quiet():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds for an unsupported file
            raise InnsteerError(f"transformers could not load {path.name} ({type(e).__name__}: {str(e)[:300]}); "
                                f"architectures it loads from GGUF: {', '.join(supported)}") from None
        self._init(model, layer, resolve_device(device))

    @classmethod
    def from_model(cls, model: Any, layer: int, device: str = "cpu") -> "HFModel":
        """A transformers causal LM already in memory (tests build tiny ones)."""
        self = cls.__new__(cls)
        self._init(model, layer, device)
        return self

    def _init(self, model: Any, layer: int, device: str) -> None:
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
        """(tokens, reply start) pairs -> a right-padded batch; the scored positions are those
        predicting reply tokens."""
        import torch

        width = max(len(t) for t, _ in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        att = torch.zeros(len(texts), width, dtype=torch.long)
        score = torch.zeros(len(texts), width, dtype=torch.bool)
        for i, (tokens, start) in enumerate(texts):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            att[i, : len(tokens)] = 1
            score[i, max(start - 1, 0): len(tokens) - 1] = True
        return Batch(ids.to(self.device), att.to(self.device), score.to(self.device), [len(t) for t, _ in texts])

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

    def above(self, hidden: Any, batch: Batch) -> Any:
        """Final hidden states (after the last norm) from block L's output `hidden` (B, T, n_embd):
        the layers above L only, differentiable in `hidden`."""
        import torch

        with self._only_layers_above():
            position_ids = (torch.cumsum(batch.attention_mask, 1) - 1).clamp(min=0)
            out = self.decoder(inputs_embeds=hidden, attention_mask=batch.attention_mask, position_ids=position_ids,
                               use_cache=False)
        return out.last_hidden_state

    def logits(self, final_hidden: Any) -> Any:
        """Vocabulary logits of (N, n_embd) final hidden states."""
        import torch

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
        try:
            yield
        finally:
            decoder.layers = full
            inner_config.num_hidden_layers = n_hidden
            if layer_types is not None:
                inner_config.layer_types = layer_types


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

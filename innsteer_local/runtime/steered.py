"""SteeredLlama: llama_cpp.Llama with flows applied inside the forward pass by native code."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import llama_cpp
from llama_cpp import Llama
from llama_cpp import _internals as internals
from llama_cpp._utils import suppress_stdout_stderr

from ..choices import PATHS
from ..errors import FlowMismatchError, InvalidArgument, SteeringError, UnknownFlow
from ..flow import ModelInfo
from .native import FlowInfo, NativeFlow, Steerer, eval_callback_address


@dataclass
class AttachedFlow:
    """A flow attached to a SteeredLlama; pass it back to set_strength/enable/disable/remove_flow."""

    id: int
    path: str
    flow: FlowInfo  # name, behavior, method, default_strength, model, layers, sites
    strength: float
    enabled: bool = True
    gate: str = "off"

    @property
    def layers(self) -> list[int]:
        return self.flow.layers


# A flow as the methods below take it: the AttachedFlow that add_flow returned, its id, or its file
# path. None means every attached flow; for enable() and disable() that is the master switch, which
# also holds for flows attached later (disable() then leaves the model bit-identical to unsteered).
FlowRef = Union[AttachedFlow, int, str, None]


def _finite(strength: float) -> float:
    value = float(strength)
    if not math.isfinite(value):
        raise InvalidArgument(f"strength must be a finite number, got {strength!r}")
    return value


def model_info_of(llm: Llama) -> ModelInfo:
    """What a loaded model says about itself (a flow is checked against it)."""
    return ModelInfo(name=str(llm.metadata.get("general.name", Path(llm.model_path).stem)),
                     architecture=str(llm.metadata.get("general.architecture", "")),
                     n_embd=int(llm._model.n_embd()), n_layer=int(llama_cpp.llama_model_n_layer(llm._model.model)))


def new_steerer(info: ModelInfo, context_params: Any, max_rows: int) -> Steerer:
    """The native state behind one context's eval callback."""
    steerer = Steerer(info.n_embd, info.n_layer, max_rows=max(1, max_rows))
    # prompt batches: as many threads as llama.cpp uses for them (it waits while we run)
    steerer.set_threads(max(1, min(32, int(context_params.n_threads_batch))))
    path_from_environment(steerer)
    return steerer


def missing_layers_error(architecture: str, missing: Sequence[int]) -> SteeringError:
    """A flow whose layers the graph never computes would silently do nothing."""
    return SteeringError(
        f"model architecture '{architecture}' never computed tensor "
        f"{', '.join(f'l_out-{l}' for l in missing)}: this architecture has no per-layer output "
        "that innsteer can steer, so the flow would silently do nothing")


def path_from_environment(steerer: Steerer) -> None:
    """INNSTEER_PATH (auto, host, device, cpu-graph) and INNSTEER_DEVICE_MIN_ROWS choose where the
    flow is computed (docs/PERFORMANCE.md); unset means auto."""
    path = os.environ.get("INNSTEER_PATH", "").strip()
    rows = os.environ.get("INNSTEER_DEVICE_MIN_ROWS", "").strip()
    if not path and not rows:
        return
    if path and path not in PATHS:
        raise InvalidArgument(f"INNSTEER_PATH must be one of {', '.join(PATHS)}, got {path!r}")
    if rows and not (rows.isdigit() and int(rows) >= 1):
        raise InvalidArgument(f"INNSTEER_DEVICE_MIN_ROWS must be a positive integer, got {rows!r}")
    steerer.set_path(path or "auto", int(rows) if rows else 32)


def check_fits(path: Union[str, os.PathLike[str]], meta: FlowInfo, info: ModelInfo) -> None:
    """Refuses a flow that cannot steer this model (width, layer); warns when it was trained for
    another model."""
    if meta.model.n_embd != info.n_embd:
        raise FlowMismatchError(
            f"{path}: flow n_embd {meta.model.n_embd} (trained for '{meta.model.name}') does not fit "
            f"model '{info.name}' with n_embd {info.n_embd}")
    for layer in meta.layers:
        if layer >= info.n_layer:
            raise FlowMismatchError(
                f"{path}: flow layer {layer} is out of range for model '{info.name}' with {info.n_layer} "
                f"layers (0..{info.n_layer - 1})")
    if (meta.model.architecture and meta.model.architecture != info.architecture) or \
            (meta.model.name and meta.model.name != info.name) or meta.model.n_layer != info.n_layer:
        warnings.warn(
            f"{path} was trained for '{meta.model.name}' ({meta.model.architecture}, {meta.model.n_layer} layers), "
            f"not for this model '{info.name}' ({info.architecture}, {info.n_layer} layers); steering may not "
            "mean the same here", UserWarning, stacklevel=4)


_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


@contextlib.contextmanager
def _layer_assignments(into: dict[int, str]) -> Iterator[None]:
    """Records llama.cpp's 'layer N assigned to device D' log lines (debug level) while a model
    loads, passing every line on to llama-cpp-python's own logger."""
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        m = _ASSIGNED.search(text.decode("utf-8", "replace"))
        if m:
            into[int(m.group(1))] = m.group(2)
        _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(record, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class SteeredLlama(Llama):
    """A `llama_cpp.Llama` (same constructor) whose context steers with flows:

        llm = SteeredLlama("model.gguf", n_ctx=2048, verbose=False)
        honesty = llm.add_flow("honesty.gguf", strength=4.0)
        llm.create_chat_completion(messages=[...])      # steered
        llm.set_strength(2.0, honesty); llm.disable()   # change at any time
    """

    def __init__(self, model_path: str, *args: Any, rpc: Optional[Sequence[str] | str] = None, **kwargs: Any):
        """rpc: rpc-server endpoints (HOST:PORT) to split the model's layers across
        (runtime/rpc.py); the layers are offloaded to them unless n_gpu_layers says otherwise.
        `layer_devices` then says which device holds each layer (llama.cpp's own assignment)."""
        self.layer_devices: dict[int, str] = {}
        self._stack = contextlib.ExitStack()  # Llama.__del__ closes it even if loading fails below
        if rpc:
            from . import rpc as rpc_backend

            devices = rpc_backend.add_servers(rpc_backend.parse_endpoints(rpc))
            self.rpc_devices = [d.name for d in devices]
            kwargs.setdefault("n_gpu_layers", -1)
            with _layer_assignments(self.layer_devices), rpc_backend.loading_onto(devices):
                super().__init__(model_path, *args, **kwargs)
        else:
            super().__init__(model_path, *args, **kwargs)
        self.model_info = model_info_of(self)
        self._steerer = new_steerer(self.model_info, self.context_params, int(self.context_params.n_ubatch))
        if rpc:  # the graph path, when asked for, runs on the first server (the flow's weights go there once)
            self._steerer.set_device(devices[0].ptr)
        self._stack.callback(self._steerer.close)  # runs after the context below is freed
        self._install_callback()
        self._attached: list[AttachedFlow] = []
        self._unverified_layers: set[int] = set()
        self._steer_version = 0
        self._kv_version = 0

    def _install_callback(self) -> None:
        # llama.cpp reads cb_eval when a context is created, and Llama.__init__ creates its
        # context before a subclass can set it; so we swap in a context made with the callback.
        self.context_params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(eval_callback_address())
        self.context_params.cb_eval_user_data = self._steerer.ptr
        self._ctx.close()
        with suppress_stdout_stderr(disable=self.verbose):
            ctx = internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
        self._ctx = self._stack.enter_context(contextlib.closing(ctx))
        if getattr(self, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (llama_cpp.ctypes.c_float * 1)(self.lora_scale)
            llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales)
        self.reset()

    # ---- flows -------------------------------------------------------------------------

    def add_flow(self, path: Union[str, os.PathLike[str]], strength: Optional[float] = None,
                 gate: str = "off") -> AttachedFlow:
        """Attaches a flow file; strength defaults to the flow's own default strength. gate: 'off',
        'density' (damp rows off the training support) or 'target' (move each row only as far as
        the positive class), for flows that carry gate parameters."""
        native = NativeFlow(path, self.model_info)  # the strict C loader: the one gate for untrusted files
        try:
            meta = native.info
            self._check_fits(path, meta)
            value = meta.default_strength if strength is None else _finite(strength)
            fid = self._steerer.attach(native, value)
        finally:
            native.close()  # the steerer holds its own reference
        attached = AttachedFlow(id=fid, path=str(path), flow=meta, strength=value)
        if gate != "off":
            try:
                self._steerer.set_gate(fid, gate)
            except ValueError:
                self._steerer.detach(fid)
                raise
            attached.gate = gate
        self._attached.append(attached)
        self._unverified_layers.update(meta.layers)
        self._changed()
        return attached

    def _check_fits(self, path: Union[str, os.PathLike[str]], meta: FlowInfo) -> None:
        check_fits(path, meta, self.model_info)

    @property
    def flows(self) -> list[AttachedFlow]:
        return list(self._attached)

    def _resolve(self, ref: FlowRef) -> list[AttachedFlow]:
        if ref is None:
            return list(self._attached)
        for a in self._attached:
            if a is ref or a.id == ref or (isinstance(ref, str) and a.path == ref):
                return [a]
        raise UnknownFlow(f"no attached flow matches {ref!r}")

    def set_strength(self, strength: float, flow: FlowRef = None) -> None:
        """Sets the strength of one flow, or of every attached flow. Takes effect at the next token."""
        value = _finite(strength)
        for a in self._resolve(flow):
            self._steerer.set_strength(a.id, value)
            a.strength = value
        self._changed()

    def set_gate(self, gate: str, flow: FlowRef = None) -> None:
        """Gate mode of one flow or of every attached flow ('off', 'density', 'target')."""
        for a in self._resolve(flow):
            self._steerer.set_gate(a.id, gate)
            a.gate = gate
        self._changed()

    def enable(self, flow: FlowRef = None) -> None:
        """Turns one flow back on, or steering as a whole when no flow is given."""
        self._switch(flow, True)

    def disable(self, flow: FlowRef = None) -> None:
        """Turns one flow off, or steering as a whole when no flow is given (bit-identical to unsteered)."""
        self._switch(flow, False)

    def _switch(self, flow: FlowRef, on: bool) -> None:
        if flow is None:
            self._steerer.set_active(on)
            self._active = on
        else:
            for a in self._resolve(flow):
                self._steerer.set_enabled(a.id, on)
                a.enabled = on
        self._changed()

    @property
    def steering_active(self) -> bool:
        return getattr(self, "_active", True)

    def remove_flow(self, flow: FlowRef) -> None:
        for a in self._resolve(flow):
            self._steerer.detach(a.id)
            self._attached.remove(a)
        self._changed()

    @property
    def steering_stats(self) -> dict[str, int]:
        return {"rows_steered": self._steerer.rows_steered, "rows_rejected_nonfinite": self._steerer.rows_rejected}

    @property
    def native_steerer(self) -> Steerer:
        """The native state behind the callback (capture, counters)."""
        return self._steerer

    def _changed(self) -> None:
        # KV entries computed under other steering must not be reused as a prompt prefix.
        self._steer_version += 1

    # ---- llama_cpp.Llama hooks -----------------------------------------------------------

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        if self._kv_version != self._steer_version:
            self.reset()
            self._kv_version = self._steer_version
        yield from super().generate(tokens, *args, **kwargs)

    def eval(self, tokens: Sequence[int]) -> None:
        super().eval(tokens)
        if self._unverified_layers and len(tokens):
            self._verify_layers()

    def _verify_layers(self) -> None:
        missing = sorted(l for l in self._unverified_layers if self._steerer.layer_visits(l) == 0)
        self._unverified_layers.clear()
        if missing:
            raise missing_layers_error(self.model_info.architecture, missing)

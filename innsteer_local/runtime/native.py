"""ctypes binding of libinnsteer (native/include/innsteer.h).

The library calls a few ggml functions without linking ggml: it resolves them against the ggml
that llama-cpp-python loaded, which we make globally visible first.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..choices import GATES, PATHS, check_gate
from ..errors import FlowFormatError, FlowMismatchError, InnsteerError, InvalidArgument
from ..flow import ModelInfo
from ..flow.format import parse_provenance
from . import paths
from .paths import installed

_ERR_LEN = 512
_F32P = ctypes.POINTER(ctypes.c_float)
_I32P = ctypes.POINTER(ctypes.c_int32)
# innsteer_split: how llama.cpp cuts a multi-sequence batch into ubatches
SPLIT_SIMPLE, SPLIT_EQUAL = 0, 1


class _FlowInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("behavior", ctypes.c_char_p), ("method", ctypes.c_char_p),
                ("model_name", ctypes.c_char_p), ("model_architecture", ctypes.c_char_p),
                ("model_n_embd", ctypes.c_int), ("model_n_layer", ctypes.c_int), ("n_sites", ctypes.c_int),
                ("default_strength", ctypes.c_float), ("provenance_json", ctypes.c_char_p)]


class _SlotStats(ctypes.Structure):
    _fields_ = [("tokens_evaluated", ctypes.c_uint64), ("rows_steered", ctypes.c_uint64), ("rows_rejected", ctypes.c_uint64)]


class _SiteInfo(ctypes.Structure):
    _fields_ = [("layer", ctypes.c_int), ("latent_dim", ctypes.c_int), ("n_ops", ctypes.c_int),
                ("ops", ctypes.c_char_p), ("has_gate", ctypes.c_bool), ("has_edit_scale", ctypes.c_bool),
                ("delta_norm", ctypes.c_float)]


@dataclass(frozen=True)
class SiteInfo:
    """What the C loader read about the flow at one layer."""

    layer: int
    latent_dim: int
    ops: tuple[str, ...]
    has_gate: bool
    has_edit_scale: bool
    delta_norm: float


@dataclass(frozen=True)
class FlowInfo:
    """A flow file's metadata as the C loader validated it (the attach path reads nothing else)."""

    name: str
    behavior: str
    method: str
    default_strength: float
    model: ModelInfo
    sites: tuple[SiteInfo, ...]
    provenance_json: str = ""

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sites]

    @property
    def has_gate(self) -> bool:
        return all(s.has_gate for s in self.sites)

    @property
    def provenance(self) -> dict[str, Any]:
        """The training record, parsed on demand as the NumPy reader parses it."""
        return parse_provenance(self.provenance_json)

# innsteer_status values
OK, ERR_IO, ERR_FORMAT, ERR_NOT_FLOW, ERR_UNSUPPORTED, ERR_INVALID, ERR_MISMATCH, ERR_ARG, ERR_NOMEM = range(9)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _lib_name() -> str:
    return {"darwin": "libinnsteer.dylib", "win32": "innsteer.dll"}.get(sys.platform, "libinnsteer.so")


def library_path() -> Path:
    """Where libinnsteer is: $INNSTEER_NATIVE_LIB, else where the package was installed."""
    env = os.environ.get("INNSTEER_NATIVE_LIB")
    if env:
        return Path(env)
    rel = f"innsteer_local/lib/{_lib_name()}"
    return installed(rel) or paths.PACKAGE / "lib" / _lib_name()


def _expose_ggml() -> None:
    import llama_cpp  # noqa: F401  (loads libllama and ggml)

    # the same directory llama-cpp-python loaded its libraries from
    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).resolve().parent / "lib")
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    for stem in ("ggml-base", "ggml", "llama"):
        for cand in (lib_dir / f"lib{stem}.so", lib_dir / f"lib{stem}.dylib", lib_dir / f"{stem}.dll"):
            if cand.exists():
                ctypes.CDLL(str(cand), mode=mode)
                break


def lib() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not path.exists():
            raise InnsteerError(
                f"native library not found at {path}; reinstall the package (pip install .) "
                "or set INNSTEER_NATIVE_LIB")
        _expose_ggml()
        l = ctypes.CDLL(str(path))
        c_int, c_float, c_bool, c_void_p, c_char_p, c_size_t, c_int64, c_uint64 = (
            ctypes.c_int, ctypes.c_float, ctypes.c_bool, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
            ctypes.c_int64, ctypes.c_uint64)
        sigs = {
            "innsteer_status_name": (c_char_p, [c_int]),
            "innsteer_flow_load": (c_int, [c_char_p, ctypes.POINTER(c_void_p), c_char_p, c_size_t]),
            "innsteer_flow_load_for": (c_int, [c_char_p, c_int, c_int, ctypes.POINTER(c_void_p), c_char_p, c_size_t]),
            "innsteer_flow_load_buffer": (c_int, [c_void_p, c_size_t, ctypes.POINTER(c_void_p), c_char_p, c_size_t]),
            "innsteer_flow_free": (None, [c_void_p]),
            "innsteer_flow_n_embd": (c_int, [c_void_p]),
            "innsteer_flow_n_sites": (c_int, [c_void_p]),
            "innsteer_flow_site_layer": (c_int, [c_void_p, c_int]),
            "innsteer_flow_default_strength": (c_float, [c_void_p]),
            "innsteer_flow_forward": (c_int, [c_void_p, c_int, _F32P, _F32P, c_int64]),
            "innsteer_flow_inverse": (c_int, [c_void_p, c_int, _F32P, _F32P, c_int64]),
            "innsteer_flow_steer": (c_int, [c_void_p, c_int, c_float, _F32P, _F32P, c_int64]),
            "innsteer_flow_steer_gated": (c_int, [c_void_p, c_int, c_float, c_int, _F32P, _F32P, c_int64]),
            "innsteer_flow_has_gate": (c_bool, [c_void_p]),
            "innsteer_flow_get_info": (c_int, [c_void_p, ctypes.POINTER(_FlowInfo)]),
            "innsteer_flow_get_site_info": (c_int, [c_void_p, c_int, ctypes.POINTER(_SiteInfo)]),
            "innsteer_steerer_set_gate": (c_int, [c_void_p, c_int, c_int]),
            "innsteer_steerer_set_threads": (c_int, [c_void_p, c_int]),
            "innsteer_steerer_new": (c_void_p, [c_int, c_int, c_int]),
            "innsteer_steerer_free": (None, [c_void_p]),
            "innsteer_steerer_attach": (c_int, [c_void_p, c_void_p, c_float, ctypes.POINTER(c_int), c_char_p, c_size_t]),
            "innsteer_steerer_detach": (c_int, [c_void_p, c_int]),
            "innsteer_steerer_set_strength": (c_int, [c_void_p, c_int, c_float]),
            "innsteer_steerer_set_enabled": (c_int, [c_void_p, c_int, c_bool]),
            "innsteer_steerer_set_active": (None, [c_void_p, c_bool]),
            "innsteer_steerer_capture": (c_int, [c_void_p, c_int, c_bool, c_bool]),
            "innsteer_steerer_captured_rows": (c_int64, [c_void_p, c_int, c_bool]),
            "innsteer_steerer_copy_captured": (c_int, [c_void_p, c_int, c_bool, _F32P, c_int64]),
            "innsteer_steerer_clear_captured": (None, [c_void_p]),
            "innsteer_steerer_layer_visits": (c_uint64, [c_void_p, c_int]),
            "innsteer_steerer_rows_steered": (c_uint64, [c_void_p]),
            "innsteer_steerer_rows_rejected": (c_uint64, [c_void_p]),
            "innsteer_steerer_last_error": (c_char_p, [c_void_p]),
            "innsteer_flow_steer_graph": (c_int, [c_void_p, c_int, c_float, c_int, c_int, _F32P, _F32P, c_int64, c_char_p, c_size_t]),
            "innsteer_steerer_set_path": (c_int, [c_void_p, c_int, c_int, c_char_p, c_size_t]),
            "innsteer_steerer_set_device": (c_int, [c_void_p, c_void_p]),
            "innsteer_steerer_device_name": (c_char_p, [c_void_p]),
            "innsteer_steerer_rows_on_device": (c_uint64, [c_void_p]),
            "innsteer_slot_new": (c_int, [c_void_p, ctypes.POINTER(c_int)]),
            "innsteer_slot_free": (c_int, [c_void_p, c_int]),
            "innsteer_slot_put": (c_int, [c_void_p, c_int, c_int, c_float, c_int, c_char_p, c_size_t]),
            "innsteer_slot_clear": (c_int, [c_void_p, c_int]),
            "innsteer_slot_get_stats": (c_int, [c_void_p, c_int, ctypes.POINTER(_SlotStats)]),
            "innsteer_steerer_batch_begin": (c_int, [c_void_p, c_int, _I32P, _I32P, ctypes.POINTER(ctypes.c_int8), c_int,
                                                     c_int, c_char_p, c_size_t]),
            "innsteer_steerer_batch_end": (None, [c_void_p]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(l, name)
            fn.restype = res
            fn.argtypes = args
        _lib = l
        return l


def eval_callback_address() -> int:
    """Address of innsteer_eval_callback, for llama_context_params.cb_eval."""
    return ctypes.cast(lib().innsteer_eval_callback, ctypes.c_void_p).value or 0


def gate_code(gate: str) -> int:
    return GATES.index(check_gate(gate))


def path_code(path: str) -> int:
    if path not in PATHS:
        raise InvalidArgument(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return PATHS.index(path)


def _rows(a: np.ndarray, n_embd: int) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n_embd:
        raise InvalidArgument(f"expected rows of width {n_embd}, got shape {a.shape}")
    return arr


class NativeFlow:
    """A flow loaded and validated by the C library."""

    def __init__(self, path: str | os.PathLike[str], model: Optional[ModelInfo] = None):
        """With `model`, a flow of another width or with a layer the model lacks is refused
        (FlowMismatchError) before any of its tensors is read or validated."""
        l = lib()
        handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(_ERR_LEN)
        n_embd, n_layer = (model.n_embd, model.n_layer) if model is not None else (0, 0)
        st = l.innsteer_flow_load_for(os.fsencode(path), n_embd, n_layer, ctypes.byref(handle), err, _ERR_LEN)
        if st != OK:
            message = f"{path}: {err.value.decode(errors='replace') or l.innsteer_status_name(st).decode()}"
            if st == ERR_MISMATCH and model is not None:
                raise FlowMismatchError(f"{message} ('{model.name}')")
            raise FlowFormatError(message)
        self._h = handle
        self.path = str(path)
        self.n_embd = l.innsteer_flow_n_embd(handle)
        self.layers = [l.innsteer_flow_site_layer(handle, i) for i in range(l.innsteer_flow_n_sites(handle))]
        self.default_strength = float(l.innsteer_flow_default_strength(handle))
        self.info = self._read_info()

    def _read_info(self) -> FlowInfo:
        l, raw = lib(), _FlowInfo()
        if l.innsteer_flow_get_info(self._h, ctypes.byref(raw)) != OK:
            raise InnsteerError(f"{self.path}: cannot read the flow's metadata")
        text = lambda b: (b or b"").decode("utf-8")  # noqa: E731  (the loader checked UTF-8)
        sites = []
        for i in range(raw.n_sites):
            s = _SiteInfo()
            if l.innsteer_flow_get_site_info(self._h, i, ctypes.byref(s)) != OK:
                raise InnsteerError(f"{self.path}: cannot read site {i}")
            sites.append(SiteInfo(layer=s.layer, latent_dim=s.latent_dim, ops=tuple(text(s.ops).split()),
                                  has_gate=bool(s.has_gate), has_edit_scale=bool(s.has_edit_scale),
                                  delta_norm=float(s.delta_norm)))
        model = ModelInfo(name=text(raw.model_name), architecture=text(raw.model_architecture),
                          n_embd=raw.model_n_embd, n_layer=raw.model_n_layer)
        return FlowInfo(name=text(raw.name), behavior=text(raw.behavior), method=text(raw.method),
                        default_strength=float(raw.default_strength), model=model, sites=tuple(sites),
                        provenance_json=text(raw.provenance_json))

    @property
    def handle(self) -> ctypes.c_void_p:
        return self._h

    def _map(self, fn_name: str, site: int, x: np.ndarray, *extra: float) -> np.ndarray:
        rows = _rows(x, self.n_embd)
        out = np.empty_like(rows)
        st = getattr(lib(), fn_name)(self._h, site, *extra, rows.ctypes.data_as(_F32P), out.ctypes.data_as(_F32P), rows.shape[0])
        if st != OK:
            raise InnsteerError(f"{fn_name} failed: {lib().innsteer_status_name(st).decode()}")
        return out.reshape(np.shape(x)) if np.ndim(x) == 1 else out

    def forward(self, x: np.ndarray, site: int = 0) -> np.ndarray:
        return self._map("innsteer_flow_forward", site, x)

    def inverse(self, z: np.ndarray, site: int = 0) -> np.ndarray:
        return self._map("innsteer_flow_inverse", site, z)

    def steer(self, x: np.ndarray, strength: float, site: int = 0, gate: str = "off") -> np.ndarray:
        return self._map("innsteer_flow_steer_gated", site, x, ctypes.c_float(strength), gate_code(gate))

    def steer_graph(self, x: np.ndarray, strength: float, site: int = 0, gate: str = "off",
                    path: str = "cpu-graph") -> np.ndarray:
        """The same steering computed as a ggml graph on a ggml backend (what the eval callback runs
        on device tensors): "cpu-graph" on ggml's CPU backend, "device" on its first GPU."""
        rows = _rows(x, self.n_embd)
        out = np.empty_like(rows)
        err = ctypes.create_string_buffer(_ERR_LEN)
        st = lib().innsteer_flow_steer_graph(self._h, site, ctypes.c_float(strength), gate_code(gate), path_code(path),
                                             rows.ctypes.data_as(_F32P), out.ctypes.data_as(_F32P), rows.shape[0],
                                             err, _ERR_LEN)
        if st != OK:
            raise InnsteerError(f"innsteer_flow_steer_graph failed: {err.value.decode(errors='replace')}")
        return out.reshape(np.shape(x)) if np.ndim(x) == 1 else out

    @property
    def has_gate(self) -> bool:
        return bool(lib().innsteer_flow_has_gate(self._h))

    def close(self) -> None:
        if getattr(self, "_h", None):
            lib().innsteer_flow_free(self._h)
            self._h = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Steerer:
    """The native steering state a llama context's eval callback points at."""

    def __init__(self, n_embd: int, n_layer: int, max_rows: int):
        self._l = lib()
        ptr = self._l.innsteer_steerer_new(n_embd, n_layer, max_rows)
        if not ptr:
            raise InnsteerError(f"cannot create a steerer for n_embd={n_embd}, n_layer={n_layer}")
        self.ptr = ctypes.c_void_p(ptr)
        self.n_embd, self.n_layer = n_embd, n_layer

    def attach(self, flow: NativeFlow, strength: float) -> int:
        out = ctypes.c_int()
        err = ctypes.create_string_buffer(_ERR_LEN)
        st = self._l.innsteer_steerer_attach(self.ptr, flow.handle, ctypes.c_float(strength), ctypes.byref(out), err, _ERR_LEN)
        if st == ERR_MISMATCH:
            raise FlowMismatchError(f"{flow.path}: {err.value.decode(errors='replace')}")
        if st != OK:
            raise InnsteerError(f"{flow.path}: {err.value.decode(errors='replace')}")
        return out.value

    def _check(self, st: int, what: str) -> None:
        if st != OK:
            raise InnsteerError(f"{what}: {self._l.innsteer_status_name(st).decode()}")

    def detach(self, fid: int) -> None:
        self._check(self._l.innsteer_steerer_detach(self.ptr, fid), f"detach flow {fid}")

    def set_strength(self, fid: int, strength: float) -> None:
        self._check(self._l.innsteer_steerer_set_strength(self.ptr, fid, ctypes.c_float(strength)), f"set strength of flow {fid}")

    def set_enabled(self, fid: int, enabled: bool) -> None:
        self._check(self._l.innsteer_steerer_set_enabled(self.ptr, fid, enabled), f"enable flow {fid}")

    def set_gate(self, fid: int, gate: str) -> None:
        st = self._l.innsteer_steerer_set_gate(self.ptr, fid, gate_code(gate))
        if st == ERR_UNSUPPORTED:
            raise InvalidArgument(f"flow {fid} carries no gate parameters, so gate '{gate}' is not available "
                             "(train it with this version, or use gate 'off')")
        self._check(st, f"set gate of flow {fid}")

    def set_threads(self, n_threads: int) -> None:
        self._check(self._l.innsteer_steerer_set_threads(self.ptr, int(n_threads)), f"set {n_threads} threads")

    def set_path(self, path: str, min_rows: int = 32) -> None:
        """Where the callback computes the flow: "auto", "host", "device" or "cpu-graph"; batches of
        fewer than min_rows rows take the host path (the default 32 sends decode to the host
        kernel, which measured faster there; docs/PERFORMANCE.md)."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        if self._l.innsteer_steerer_set_path(self.ptr, path_code(path), int(min_rows), err, _ERR_LEN) != OK:
            raise InnsteerError(f"steering path {path!r}: {err.value.decode(errors='replace')}")

    def set_device(self, device: Optional[int]) -> None:
        """The ggml device (a ggml_backend_dev_t) the "device" path runs on, e.g. a remote RPC
        device (runtime/rpc.py); None: ggml's first GPU device."""
        self._check(self._l.innsteer_steerer_set_device(self.ptr, device), "set the graph path's device")

    @property
    def device_name(self) -> str:
        return (self._l.innsteer_steerer_device_name(self.ptr) or b"").decode(errors="replace")

    @property
    def rows_on_device(self) -> int:
        return int(self._l.innsteer_steerer_rows_on_device(self.ptr))

    def set_active(self, active: bool) -> None:
        self._l.innsteer_steerer_set_active(self.ptr, active)

    def capture(self, layer: int, post: bool = False, on: bool = True) -> None:
        self._check(self._l.innsteer_steerer_capture(self.ptr, layer, post, on), f"capture layer {layer}")

    def captured(self, layer: int, post: bool = False) -> np.ndarray:
        n = self._l.innsteer_steerer_captured_rows(self.ptr, layer, post)
        out = np.empty((max(n, 0), self.n_embd), dtype=np.float32)
        if n > 0:
            self._check(self._l.innsteer_steerer_copy_captured(self.ptr, layer, post, out.ctypes.data_as(_F32P), n), "copy capture")
        return out

    def clear_captured(self) -> None:
        self._l.innsteer_steerer_clear_captured(self.ptr)

    def layer_visits(self, layer: int) -> int:
        return int(self._l.innsteer_steerer_layer_visits(self.ptr, layer))

    @property
    def rows_steered(self) -> int:
        return int(self._l.innsteer_steerer_rows_steered(self.ptr))

    @property
    def rows_rejected(self) -> int:
        return int(self._l.innsteer_steerer_rows_rejected(self.ptr))

    @property
    def last_error(self) -> str:
        return (self._l.innsteer_steerer_last_error(self.ptr) or b"").decode(errors="replace")

    # ---- many sequences in one batch (innsteer.h: slots) ----

    def new_slot(self) -> int:
        out = ctypes.c_int()
        if self._l.innsteer_slot_new(self.ptr, ctypes.byref(out)) != OK:
            raise InnsteerError("all steering slots are in use")
        return out.value

    def free_slot(self, slot: int) -> None:
        self._check(self._l.innsteer_slot_free(self.ptr, slot), f"free slot {slot}")

    def slot_put(self, slot: int, fid: int, strength: float, gate: str = "off") -> None:
        """Flow fid at this strength and gate in the slot (strength 0 takes it out)."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        if self._l.innsteer_slot_put(self.ptr, slot, fid, ctypes.c_float(strength), gate_code(gate), err, _ERR_LEN) != OK:
            raise InvalidArgument(f"slot {slot}: {err.value.decode(errors='replace')}")

    def slot_clear(self, slot: int) -> None:
        self._check(self._l.innsteer_slot_clear(self.ptr, slot), f"clear slot {slot}")

    def slot_stats(self, slot: int) -> dict[str, int]:
        raw = _SlotStats()
        self._check(self._l.innsteer_slot_get_stats(self.ptr, slot, ctypes.byref(raw)), f"stats of slot {slot}")
        return {"tokens_evaluated": int(raw.tokens_evaluated), "rows_steered": int(raw.rows_steered),
                "rows_rejected_nonfinite": int(raw.rows_rejected)}

    def batch_begin(self, seq_ids: np.ndarray, slots: np.ndarray, outputs: np.ndarray, n_ubatch: int,
                    split: int = SPLIT_SIMPLE) -> None:
        """Which sequence and slot each token of the next llama_decode belongs to (int32 arrays;
        outputs int8), and how llama.cpp will split the batch."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        st = self._l.innsteer_steerer_batch_begin(
            self.ptr, int(seq_ids.shape[0]), seq_ids.ctypes.data_as(_I32P), slots.ctypes.data_as(_I32P),
            outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), int(n_ubatch), int(split), err, _ERR_LEN)
        if st != OK:
            raise InnsteerError(f"batch: {err.value.decode(errors='replace')}")

    def batch_end(self) -> None:
        self._l.innsteer_steerer_batch_end(self.ptr)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._l.innsteer_steerer_free(self.ptr)
            self.ptr = None

"""The flow file format (docs/flow-format.md): the writer, and the strict NumPy reader that is the
test oracle for the C loader and what `inspect` shows. Attaching a flow to a model goes through
the C loader only (runtime/native.py)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import (
    ARCHITECTURE,
    FORMAT_VERSION,
    MAX_EMBD,
    MAX_FILE_BYTES,
    MAX_LAYERS,
    MAX_META_STRING,
    MAX_OPS,
    MAX_SITES,
    MAX_STRING,
)
from ..errors import FlowFormatError, InvalidArgument
from . import gguf
from .core import Flow, ModelInfo
from .ops import OP_KINDS, Op, Slot, xorshift_states
from .site import Gate, Site

DTYPES = {"f32": np.float32, "f16": np.float16}


def write_flow(flow: Flow, path: str | os.PathLike[str], dtype: str = "f32") -> None:
    """Writes atomically: a crash mid-write never leaves a half-written flow at `path`."""
    import gguf

    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    float_type = DTYPES[dtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCHITECTURE)

        def put_str(key: str, value: str) -> None:
            cap = MAX_META_STRING if key in META_KEYS else MAX_STRING
            if len(value.encode("utf-8")) > cap:
                raise InvalidArgument(f"{key} is {len(value.encode('utf-8'))} bytes long, a flow file allows {cap}")
            # GGUFWriter.add_string drops empty strings; a flow file always has its keys
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)

        def put_meta(key: str, value: int | float | str) -> None:
            if isinstance(value, str):
                put_str(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            else:
                w.add_float32(key, float(value))

        put_str("general.name", flow.name or flow.behavior or "flow")
        w.add_uint32("innsteer.format_version", FORMAT_VERSION)
        put_str("innsteer.model.name", flow.model.name)
        put_str("innsteer.model.architecture", flow.model.architecture)
        w.add_uint32("innsteer.model.n_embd", int(flow.model.n_embd))
        w.add_uint32("innsteer.model.n_layer", int(flow.model.n_layer))
        put_str("innsteer.method", flow.method)
        put_str("innsteer.behavior", flow.behavior)
        w.add_float32("innsteer.default_strength", float(flow.default_strength))
        w.add_key_value("innsteer.layers", [int(s.layer) for s in flow.sites], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.UINT32)
        if flow.provenance:
            put_str("innsteer.provenance", json.dumps(flow.provenance, sort_keys=True))
        for si, site in enumerate(flow.sites):
            # a space-separated string rather than an array: GGUF has no empty arrays, and a
            # linear flow has no ops
            w.add_key_value(f"innsteer.site.{si}.ops", " ".join(op.kind for op in site.ops), gguf.GGUFValueType.STRING)
            for k, op in enumerate(site.ops):
                prefix = f"site.{si}.op.{k}"
                for key, value in op.metadata().items():
                    put_meta(f"innsteer.{prefix}.{key}", value)
                for name, arr in op.tensors().items():
                    if np.issubdtype(arr.dtype, np.integer):
                        data = arr.astype(np.int32)
                    elif name in op.exact_f32:
                        data = np.ascontiguousarray(arr, dtype=np.float32)
                    else:
                        data = np.ascontiguousarray(arr, dtype=float_type)
                    w.add_tensor(f"{prefix}.{name}", data)
            w.add_tensor(f"site.{si}.delta", np.ascontiguousarray(site.delta, dtype=float_type))
            if site.edit_scale is not None:
                w.add_tensor(f"site.{si}.edit_scale", np.ascontiguousarray(site.edit_scale, dtype=float_type))
            if site.gate is not None:
                w.add_tensor(f"site.{si}.gate_center", np.ascontiguousarray(site.gate.center, dtype=np.float32))
                for f in ("radius", "softness", "target_pos", "target_neg"):
                    w.add_float32(f"innsteer.site.{si}.gate.{f}", float(getattr(site.gate, f)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a flow file is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- reading ------------------------------------------------------------------------------


class _Fields:
    """Typed access to GGUF key/values with messages that name the key."""

    def __init__(self, kv: dict[str, Any]):
        self._kv = kv

    def has(self, key: str) -> bool:
        return key in self._kv

    def _get(self, key: str, types: tuple[int, ...], what: str) -> Any:
        v = self._kv.get(key)
        if v is None:
            raise FlowFormatError(f"missing {what} {key}")
        if v.type not in types:
            raise FlowFormatError(f"{key} must be {what}, found GGUF type {v.type}")
        return v

    def u32(self, key: str) -> int:
        v = int(self._get(key, (gguf.U32, gguf.I32), "a u32").value)
        if v < 0:
            raise FlowFormatError(f"{key} must be non-negative, found {v}")
        return v

    def f32(self, key: str) -> float:
        return float(self._get(key, (gguf.F32,), "an f32").value)

    def str(self, key: str, cap: int = MAX_STRING) -> str:
        raw = self._get(key, (gguf.STRING,), "a string").value
        if len(raw) > cap:
            raise FlowFormatError(f"{key} is {len(raw)} bytes long, cap is {cap}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FlowFormatError(f"{key} is not valid UTF-8") from None

    def u32_array(self, key: str) -> list[int]:
        v = self._get(key, (gguf.ARRAY,), "an array of u32")
        if v.elem_type not in (gguf.U32, gguf.I32):
            raise FlowFormatError(f"{key} must be an array of u32")
        vals = [int(x) for x in v.value]
        if any(x < 0 for x in vals):
            raise FlowFormatError(f"{key} has negative entries")
        return vals


class _Tensors:
    def __init__(self, tensors: dict[str, Any]):
        self._by_name = tensors

    def has(self, name: str) -> bool:
        return name in self._by_name

    def rows(self, name: str) -> int:
        """Leading dimension (numpy order) of a 2-D tensor, 1 for a vector."""
        t = self._by_name.get(name)
        if t is None:
            raise FlowFormatError(f"missing tensor '{name}'")
        return int(t.shape[0]) if len(t.shape) > 1 else 1

    def get(self, name: str, shape: tuple[int, ...], integer: bool = False) -> np.ndarray:
        t = self._by_name.get(name)
        if t is None:
            raise FlowFormatError(f"missing tensor '{name}'")
        have = [d for d in t.shape]
        while len(have) > 1 and have[0] == 1:
            have = have[1:]
        want = [d for d in shape]
        while len(want) > 1 and want[0] == 1:
            want = want[1:]
        if have != want:
            raise FlowFormatError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if integer:
            if t.type != 26:
                raise FlowFormatError(f"tensor '{name}' must be i32")
            return np.array(t.data, dtype=np.int32).reshape(shape)
        if t.type not in (0, 1):
            raise FlowFormatError(f"tensor '{name}' must be f32 or f16")
        arr = np.array(t.data, dtype=np.float32).reshape(shape)
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
            raise FlowFormatError(f"tensor '{name}' element {bad} is not finite")
        return arr


def read_flow(path: str | os.PathLike[str]) -> Flow:
    """Reads and validates a flow file. Raises FlowFormatError with a specific message."""
    p = Path(path)
    if not p.exists():
        raise FlowFormatError(f"flow file not found: {p}")
    if not p.is_file():
        raise FlowFormatError(f"not a file: {p}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise FlowFormatError(f"{p} is {p.stat().st_size} bytes, cap is {MAX_FILE_BYTES}")
    try:
        g = gguf.parse(p.read_bytes())
        kv = _Fields(g.kv)
        arch = kv.str("general.architecture") if kv.has("general.architecture") else ""
        if arch != ARCHITECTURE:
            raise FlowFormatError(f"not an innsteer flow file: general.architecture is '{arch[:40]}', "
                                  f"expected '{ARCHITECTURE}'")
        return _build(kv, _Tensors(g.tensors()))
    except FlowFormatError as e:
        raise FlowFormatError(f"{p}: {e}") from None
    except (ValueError, OverflowError, MemoryError, IndexError, KeyError, TypeError) as e:
        raise FlowFormatError(f"{p} is corrupt: {type(e).__name__}: {e}") from None


# the descriptive strings, checked first as the C loader does (native/src/flow.c, load_strings)
META_KEYS = ("general.name", "innsteer.behavior", "innsteer.method", "innsteer.model.name", "innsteer.model.architecture")


def _build(kv: _Fields, tensors: _Tensors) -> Flow:
    meta = {k: kv.str(k, MAX_META_STRING) if kv.has(k) else "" for k in META_KEYS}
    provenance_text = kv.str("innsteer.provenance") if kv.has("innsteer.provenance") else ""
    arch = kv.str("general.architecture") if kv.has("general.architecture") else ""
    if arch != ARCHITECTURE:
        raise FlowFormatError(f"not an innsteer flow file: general.architecture is '{arch}', expected '{ARCHITECTURE}'")
    version = kv.u32("innsteer.format_version")
    if version != FORMAT_VERSION:
        raise FlowFormatError(f"flow format version {version}, this reader supports version {FORMAT_VERSION}")
    n_embd = kv.u32("innsteer.model.n_embd")
    n_layer = kv.u32("innsteer.model.n_layer")
    if not 1 <= n_embd <= MAX_EMBD:
        raise FlowFormatError(f"innsteer.model.n_embd {n_embd} outside 1..{MAX_EMBD}")
    if not 1 <= n_layer <= MAX_LAYERS:
        raise FlowFormatError(f"innsteer.model.n_layer {n_layer} outside 1..{MAX_LAYERS}")
    strength = kv.f32("innsteer.default_strength")
    if not math.isfinite(strength):
        raise FlowFormatError("innsteer.default_strength is not finite")
    model = ModelInfo(
        name=meta["innsteer.model.name"],
        architecture=meta["innsteer.model.architecture"],
        n_embd=n_embd,
        n_layer=n_layer,
    )
    layers = kv.u32_array("innsteer.layers")
    if not 1 <= len(layers) <= MAX_SITES:
        raise FlowFormatError(f"innsteer.layers has {len(layers)} entries, expected 1..{MAX_SITES}")
    sites = []
    for si, layer in enumerate(layers):
        if layer >= n_layer:
            raise FlowFormatError(f"innsteer.layers[{si}] = {layer} is outside the model's 0..{n_layer - 1}")
        if layer in layers[:si]:
            raise FlowFormatError(f"layer {layer} appears twice in innsteer.layers")
        sites.append(_read_site(kv, tensors, si, layer, n_embd))
    return Flow(
        model=model,
        sites=sites,
        method=meta["innsteer.method"],
        behavior=meta["innsteer.behavior"],
        default_strength=strength,
        name=meta["general.name"],
        provenance=parse_provenance(provenance_text),
    )


def parse_provenance(text: str) -> dict[str, Any]:
    """The training record. Informational only, so neither reader refuses a file for it: text
    that is not a JSON object is kept as it is, under "unparsed"."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"unparsed": text}


def _read_site(kv: _Fields, tensors: _Tensors, si: int, layer: int, n_embd: int) -> Site:
    kinds = [k for k in kv.str(f"innsteer.site.{si}.ops").split(" ") if k]
    if len(kinds) > MAX_OPS:
        raise FlowFormatError(f"innsteer.site.{si}.ops has {len(kinds)} ops, cap is {MAX_OPS}")
    dim = n_embd
    ops: list[Op] = []
    for k, kind in enumerate(kinds):
        cls = OP_KINDS.get(kind)
        if cls is None:
            raise FlowFormatError(f"site {si} op {k}: unknown op kind '{kind[:40]}'")
        op = cls.read(kv, tensors, Slot(si=si, k=k, dim=dim, n_embd=n_embd, before=tuple(ops)))
        ops.append(op)
        dim = op.out_dim(dim)
    delta = tensors.get(f"site.{si}.delta", (dim,))
    edit_scale = tensors.get(f"site.{si}.edit_scale", (dim,)) if tensors.has(f"site.{si}.edit_scale") else None
    gate = None
    if tensors.has(f"site.{si}.gate_center"):
        vals = {f: kv.f32(f"innsteer.site.{si}.gate.{f}") for f in ("radius", "softness", "target_pos", "target_neg")}
        if not all(math.isfinite(v) for v in vals.values()):
            raise FlowFormatError(f"site {si}: gate parameters must be finite")
        if not (vals["radius"] > 0 and vals["softness"] > 0):
            raise FlowFormatError(f"site {si}: gate radius and softness must be positive")
        gate = Gate(center=tensors.get(f"site.{si}.gate_center", (dim,)), **vals)
    site = Site(layer=layer, ops=ops, delta=delta, edit_scale=edit_scale, gate=gate)
    _check_roundtrip(site, si, n_embd)
    return site


def _probe_rows(n: int) -> np.ndarray:
    """The native loader's probe rows (xorshift32), so both readers test the same inputs."""
    rows = ((xorshift_states(n) & 0xFFFF) / 65535.0 - 0.5) * 4.0
    return rows.astype(np.float32).astype(np.float64)


def _check_roundtrip(site: Site, si: int, n_embd: int) -> None:
    """phi^-1(phi(x)) must return x on fixed probe rows (same rows and bound as the C loader; the
    C loader computes in float32, so a flow right at the bound may pass one and fail the other)."""
    x = _probe_rows(n_embd)
    with np.errstate(all="ignore"):
        back = site.inverse(site.forward(x))
    err = np.linalg.norm(back - x, axis=1)
    if not np.all(np.isfinite(back)) or np.any(err > 1e-3 * np.linalg.norm(x, axis=1) + 1e-6):
        raise FlowFormatError(f"site {si} (layer {site.layer}): phi is not invertible on a probe row")

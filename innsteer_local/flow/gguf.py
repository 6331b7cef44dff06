"""A strict GGUF reader for untrusted flow files: the same caps and checks as
native/src/gguf_read.c, so both readers accept and refuse the same files. Pure Python + NumPy;
every count, length and offset is checked against the file before use."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..choices import MAX_ARRAY, MAX_KV, MAX_NESTING, MAX_STRING, MAX_TENSORS
from ..errors import FlowFormatError

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4", BOOL: "<u1",
           U64: "<u8", I64: "<i8", F64: "<f8"}
# ggml tensor types this project reads
TENSOR_TYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 26: np.dtype("<i4")}


@dataclass
class Value:
    type: int
    value: Any
    elem_type: int = -1  # arrays


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first)
    type: int
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.buf) - self.pos:
            raise FlowFormatError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, file has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def raw_str(self, what: str) -> bytes:
        n = self.u64(what)
        if n > MAX_STRING:
            raise FlowFormatError(f"{what}: string length {n} exceeds the cap of {MAX_STRING}")
        return self.take(n, what)

    def name(self, what: str) -> str:
        try:
            return self.raw_str(what).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise FlowFormatError(f"{what} is not valid UTF-8") from None


def _value(c: _Cursor, vtype: int, depth: int, key: str) -> Value:
    if vtype == STRING:
        return Value(STRING, c.raw_str(key))  # bytes: decoded (strictly) by whoever reads the key
    if vtype == ARRAY:
        if depth >= MAX_NESTING:
            raise FlowFormatError(f"key '{key}': arrays nested too deeply")
        et, n = c.u32(key), c.u64(key)
        if n > MAX_ARRAY:
            raise FlowFormatError(f"key '{key}': array of {n} items exceeds the cap of {MAX_ARRAY}")
        if et in _SCALAR:
            dt = np.dtype(_SCALAR[et])
            return Value(ARRAY, np.frombuffer(c.take(n * dt.itemsize, key), dtype=dt), et)
        if et not in (STRING, ARRAY):
            raise FlowFormatError(f"key '{key}': unknown array element type {et}")
        return Value(ARRAY, [_value(c, et, depth + 1, key).value for _ in range(n)], et)
    if vtype not in _SCALAR:
        raise FlowFormatError(f"key '{key}': unknown value type {vtype}")
    dt = np.dtype(_SCALAR[vtype])
    return Value(vtype, np.frombuffer(c.take(dt.itemsize, key), dtype=dt)[0].item())


@dataclass
class GGUFFile:
    kv: dict[str, Value]
    _cursor: _Cursor
    _n_tensors: int
    _alignment: int

    def tensors(self) -> dict[str, TensorInfo]:
        """Tensor infos and data views: parsed after the caller has checked the keys, so a GGUF
        that is not a flow is called that rather than refused for its tensor types."""
        c, align = self._cursor, self._alignment
        infos = []
        seen: set[str] = set()
        for i in range(self._n_tensors):
            name = c.name("tensor name")
            if not 1 <= len(name.encode()) <= 63:
                raise FlowFormatError(f"tensor {i}: name length outside 1..63")
            if name in seen:
                raise FlowFormatError(f"duplicate tensor '{name}'")
            seen.add(name)
            n_dims = c.u32(name)
            if not 1 <= n_dims <= 4:
                raise FlowFormatError(f"tensor '{name}': {n_dims} dimensions, expected 1..4")
            ne = [c.u64(name) for _ in range(n_dims)]
            if any(d == 0 or d > (1 << 31) for d in ne):
                raise FlowFormatError(f"tensor '{name}': a dimension has size outside 1..2^31")
            ttype, offset = c.u32(name), c.u64(name)
            if ttype not in TENSOR_TYPES:
                raise FlowFormatError(f"tensor '{name}': ggml type {ttype} is not supported in flow files (f32, f16, i32)")
            if offset % align:
                raise FlowFormatError(f"tensor '{name}': data offset {offset} not aligned to {align}")
            infos.append((name, ne, ttype, offset))
        data_start = (c.pos + align - 1) // align * align
        if infos and data_start > len(c.buf):
            raise FlowFormatError(f"truncated file: tensor data would start at {data_start}, file has {len(c.buf)} bytes")
        out = {}
        for name, ne, ttype, offset in infos:
            dt = TENSOR_TYPES[ttype]
            count = int(np.prod(ne, dtype=object))
            nbytes = count * dt.itemsize
            avail = len(c.buf) - data_start
            if offset > avail or nbytes > avail - offset:
                raise FlowFormatError(f"truncated file: tensor '{name}' needs {nbytes} bytes at data offset {offset}, "
                                      f"only {avail} available")
            start = data_start + offset
            arr = np.frombuffer(c.buf, dtype=dt, count=count, offset=start).reshape(tuple(reversed(ne)))
            out[name] = TensorInfo(name=name, shape=tuple(reversed(ne)), type=ttype, data=arr)
        return out


def parse(buf: bytes) -> GGUFFile:
    """Header and key/values; call .tensors() for the tensors."""
    c = _Cursor(buf)
    if len(buf) < 4 or c.take(4, "magic") != b"GGUF":
        raise FlowFormatError("not a GGUF file: bad magic bytes")
    version = c.u32("version")
    if version not in (2, 3):
        raise FlowFormatError(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("key count")
    if n_kv > MAX_KV:
        raise FlowFormatError(f"GGUF header claims {n_kv} keys, cap is {MAX_KV}")
    if n_tensors > MAX_TENSORS:
        raise FlowFormatError(f"GGUF header claims {n_tensors} tensors, cap is {MAX_TENSORS}")
    kv: dict[str, Value] = {}
    alignment = 32
    for i in range(n_kv):
        key = c.name(f"key {i} name")
        if key in kv:
            raise FlowFormatError(f"duplicate key '{key}'")
        kv[key] = _value(c, c.u32(key), 0, key)
        if key == "general.alignment":
            if kv[key].type != U32:
                raise FlowFormatError(f"general.alignment must be u32, got type {kv[key].type}")
            alignment = int(kv[key].value)
            if alignment == 0 or alignment & (alignment - 1) or alignment > 65536:
                raise FlowFormatError(f"general.alignment {alignment} is not a power of two up to 65536")
    return GGUFFile(kv=kv, _cursor=c, _n_tensors=n_tensors, _alignment=alignment)

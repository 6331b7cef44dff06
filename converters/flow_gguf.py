"""Writes a Flow as a GGUF flow file (layout: docs/flow-format.md)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from innsteer_local.flow import Flow

DTYPES = {"f32": np.float32, "f16": np.float16}
# Kept in f32 whatever the dtype: rounded to f16, a basis is no longer orthonormal and a matrix
# no longer the inverse of its stored inverse, so phi^-1(phi(h)) would drift (~1e-3).
EXACT_F32 = ("basis", "matrix", "matrix_inv")


def write_flow(flow: "Flow", path: str | os.PathLike[str], dtype: str = "f32") -> None:
    """Writes atomically: a crash mid-write never leaves a half-written flow at `path`."""
    import gguf

    from innsteer_local.flow import ARCHITECTURE, FORMAT_VERSION, Coupling

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    float_type = DTYPES[dtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCHITECTURE)

        def put_str(key: str, value: str) -> None:
            # GGUFWriter.add_string drops empty strings; a flow file always has its keys
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)

        w.add_name(flow.name or flow.behavior or "flow")
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
                if isinstance(op, Coupling):
                    w.add_uint32(f"innsteer.{prefix}.mlp_layers", len(op.weights))
                    w.add_float32(f"innsteer.{prefix}.clamp", float(op.clamp))
                    put_str(f"innsteer.{prefix}.activation", op.activation)
                for name, arr in op.tensors().items():
                    if name == "perm":
                        data = arr.astype(np.int32)
                    elif name in EXACT_F32:
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

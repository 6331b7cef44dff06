"""llama.cpp control vectors <-> linear flows.

A control vector GGUF (llama.cpp `--control-vector`, `cvector-generator`, repeng's export) has
general.architecture = controlvector and one f32 tensor `direction.<L>` per layer; llama.cpp adds
`direction.<L>` to the output of block L (`l_out-<L>`), which is exactly where a flow's layer L
applies. So the conversion keeps layer numbers as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import FlowFormatError
from ..flow import Flow, ModelInfo

_DIRECTION = re.compile(r"^direction\.(\d+)$")


def read_cvec(path: str | os.PathLike[str], model: Optional[ModelInfo] = None) -> Flow:
    """A control vector file as a linear flow (identity phi, delta = direction)."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise FlowFormatError(f"control vector file not found: {p}")
    try:
        reader = GGUFReader(str(p))
    except Exception as e:
        raise FlowFormatError(f"{p} is not a readable GGUF file: {e}") from None
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
    if arch != "controlvector":
        raise FlowFormatError(f"{p}: general.architecture is '{arch}', expected 'controlvector'")
    vectors: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if not m:
            continue
        layer = int(m.group(1))
        if layer == 0:
            continue  # llama.cpp has no control vector for layer 0 and skips it too
        v = np.array(t.data, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(v)):
            raise FlowFormatError(f"{p}: tensor {t.name} has non-finite values")
        vectors[layer] = v
    if not vectors:
        raise FlowFormatError(f"{p}: no direction.<layer> tensors")
    widths = {v.shape[0] for v in vectors.values()}
    if len(widths) != 1:
        raise FlowFormatError(f"{p}: directions of different widths {sorted(widths)}")
    n_embd = widths.pop()
    hint_field = reader.fields.get("controlvector.model_hint")
    hint = bytes(hint_field.parts[hint_field.data[0]]).decode() if hint_field else ""
    if model is None:
        count_field = reader.fields.get("controlvector.layer_count")
        count = int(count_field.parts[count_field.data[0]][0]) if count_field else 0
        model = ModelInfo(name="", architecture=hint, n_embd=n_embd, n_layer=max(count + 1, max(vectors) + 1))
    elif model.n_embd != n_embd:
        raise FlowFormatError(f"{p}: directions have n_embd {n_embd}, the model has {model.n_embd}")
    nonzero = {l: v for l, v in vectors.items() if np.any(v)}
    return Flow.linear(nonzero or vectors, model, method="cvec", behavior=p.stem, name=p.stem, default_strength=1.0,
                       provenance={"imported_from": p.name, "model_hint": hint})


def write_cvec(flow: Flow, path: str | os.PathLike[str], strength: Optional[float] = None) -> None:
    """Writes a linear flow as a control vector with the strength baked in."""
    import gguf

    for s in flow.sites:
        if s.ops or s.edit_scale is not None:
            raise FlowFormatError(
                f"flow '{flow.name}' is not a plain vector at layer {s.layer} ({flow.method}: "
                f"{'ops ' + ' '.join(op.kind for op in s.ops) if s.ops else 'per-dimension edit scale'}); "
                "a llama.cpp control vector can only add a fixed vector")
        if s.layer == 0:
            raise FlowFormatError("llama.cpp control vectors cannot steer layer 0")
    a = flow.default_strength if strength is None else float(strength)
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", flow.model.architecture or "llama")
    w.add_uint32("controlvector.layer_count", max(1, flow.model.n_layer - 1))
    for s in flow.sites:
        w.add_tensor(f"direction.{s.layer}", (np.float32(a) * s.delta.astype(np.float32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

"""Flows as ONNX graphs: phi, phi^-1 and the steering map of every site.

Each graph is built op by op from the Flow object (the same op list as the GGUF file and the
native kernels), with `onnx.helper`; neither torch nor pickle is involved. Per site at layer L:

- `phi_L.onnx`:      h [N, n_embd] -> z [N, n_embd]   (the full-width latent, as innsteer_flow_forward)
- `phi_inv_L.onnx`:  z [N, n_embd] -> h [N, n_embd]
- `steer_L.onnx`:    h [N, n_embd], strength [] -> h' [N, n_embd], gate off
- `steer_density_L.onnx`, `steer_target_L.onnx`: the same with a gate, for sites that carry one

The steering graphs compute h' = h + dh exactly as native/src/flow_steer.c does: the latent edit
is carried back through each op as a difference (see docs/flow-format.md), so their rounding
scales with the edit and not with |h|. `manifest.json` lists the files, shapes and the flow's
metadata. All graphs are float32, opset 17.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import GATES
from ..errors import InnsteerError
from ..flow import Affine, Coupling, Flow, Linear, Permute, Site, Subspace

OPSET = 17
MANIFEST = "manifest.json"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise InnsteerError("ONNX export needs the onnx package: pip install 'innsteer-local[onnx]'") from None
    return onnx


class _Graph:
    """A growing ONNX graph: unique value names, float32 constants as initializers."""

    def __init__(self, name: str):
        self.onnx = _onnx()
        self.name = name
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self._fresh(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def op(self, kind: str, *inputs: str, hint: str = "", **attrs: Any) -> str:
        out = self._fresh(hint or kind.lower())
        self.nodes.append(self.onnx.helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out

    def cols(self, x: str, start: int, end: int) -> str:
        """x[:, start:end]"""
        return self.op("Slice", x, self.const([start], "start", np.int64), self.const([end], "end", np.int64),
                       self.const([1], "axis", np.int64), hint="cols")

    def model(self, inputs: list[tuple[str, list[Any]]], outputs: list[tuple[str, str, list[Any]]],
              doc: str) -> Any:
        """inputs: (name, shape); outputs: (final value name, wanted output name, shape)."""
        h = self.onnx.helper
        f32 = self.onnx.TensorProto.FLOAT
        for value, name, _ in outputs:
            self.nodes.append(h.make_node("Identity", [value], [name], name=f"out_{name}"))
        graph = h.make_graph(self.nodes, self.name, [h.make_tensor_value_info(n, f32, s) for n, s in inputs],
                             [h.make_tensor_value_info(n, f32, s) for _, n, s in outputs], initializer=self.inits)
        graph.doc_string = doc
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="innsteer-local")
        model.ir_version = 8  # what opset 17 needs; readable by onnxruntime >= 1.14
        self.onnx.checker.check_model(model, full_check=True)
        return model


# ---- the ops: forward, inverse and the edit carried back, each in one place ------------------


def _mlp(g: _Graph, op: Coupling, cond: str, d2: int) -> tuple[str, str]:
    """(s, t) of a coupling for conditioning rows `cond`: s = clamp * tanh(s_raw / clamp)."""
    h = cond
    for k, (w, b) in enumerate(zip(op.weights, op.biases)):
        h = g.op("Gemm", h, g.const(w, f"w{k}"), g.const(b, f"b{k}"), transB=1)
        if k + 1 < len(op.weights):
            if op.activation == "relu":
                h = g.op("Relu", h)
            elif op.activation == "tanh":
                h = g.op("Tanh", h)
            else:  # silu
                h = g.op("Mul", h, g.op("Sigmoid", h))
    clamp = g.const(op.clamp, "clamp")
    s = g.op("Mul", clamp, g.op("Tanh", g.op("Div", g.cols(h, 0, d2), clamp)), hint="s")
    return s, g.cols(h, d2, 2 * d2)


class _AffineOnnx:
    @staticmethod
    def forward(g: _Graph, op: Affine, x: str, width: int) -> str:
        return g.op("Add", g.op("Mul", x, g.const(op.scale, "scale")), g.const(op.bias, "bias"))

    @staticmethod
    def inverse(g: _Graph, op: Affine, y: str, width: int) -> str:
        return g.op("Div", g.op("Sub", y, g.const(op.bias, "bias")), g.const(op.scale, "scale"))

    @staticmethod
    def edit_back(g: _Graph, op: Affine, x_in: str, x_out: str, d: str, width: int) -> str:
        return g.op("Div", d, g.const(op.scale, "scale"))


class _SubspaceOnnx:
    """Only the projection and the lift of the edit: phi_graph keeps the complement itself."""

    @staticmethod
    def forward(g: _Graph, op: Subspace, x: str, width: int) -> str:
        return g.op("MatMul", x, g.const(op.basis.T, "basis_t"), hint="project")

    @staticmethod
    def inverse(g: _Graph, op: Subspace, y: str, width: int) -> str:
        raise InnsteerError("ONNX export: a subspace is inverted by its site, not on its own")

    @staticmethod
    def edit_back(g: _Graph, op: Subspace, x_in: str, x_out: str, d: str, width: int) -> str:
        return g.op("MatMul", d, g.const(op.basis, "basis"), hint="lift")


class _CouplingOnnx:
    @staticmethod
    def forward(g: _Graph, op: Coupling, x: str, width: int) -> str:
        d1 = width // 2
        s, t = _mlp(g, op, g.cols(x, 0, d1), width - d1)
        x2 = g.op("Add", g.op("Mul", g.cols(x, d1, width), g.op("Exp", s)), t)
        return g.op("Concat", g.cols(x, 0, d1), x2, axis=1)

    @staticmethod
    def inverse(g: _Graph, op: Coupling, y: str, width: int) -> str:
        d1 = width // 2
        s, t = _mlp(g, op, g.cols(y, 0, d1), width - d1)
        x2 = g.op("Mul", g.op("Sub", g.cols(y, d1, width), t), g.op("Exp", g.op("Neg", s)))
        return g.op("Concat", g.cols(y, 0, d1), x2, axis=1)

    @staticmethod
    def edit_back(g: _Graph, op: Coupling, x_in: str, x_out: str, d: str, width: int) -> str:
        d1 = width // 2
        e1, e2 = g.cols(d, 0, d1), g.cols(d, d1, width)
        # condition on the moved first half; rows whose first half did not move take the exact
        # linear form e2 * exp(-s) (their s and t equal the forward pass's), as the native kernel
        s, t = _mlp(g, op, g.op("Add", g.cols(x_in, 0, d1), e1), width - d1)
        inv_scale = g.op("Exp", g.op("Neg", s))
        moved_x2 = g.op("Mul", g.op("Sub", g.op("Add", g.cols(x_out, d1, width), e2), t), inv_scale)
        general = g.op("Sub", moved_x2, g.cols(x_in, d1, width))
        moved = g.op("Greater", g.op("ReduceMax", g.op("Abs", e1), axes=[1], keepdims=1), g.const(0.0, "zero"))
        return g.op("Concat", e1, g.op("Where", moved, general, g.op("Mul", e2, inv_scale)), axis=1)


class _PermuteOnnx:
    @staticmethod
    def forward(g: _Graph, op: Permute, x: str, width: int) -> str:
        return g.op("Gather", x, g.const(op.perm, "perm", np.int64), axis=1)

    @staticmethod
    def inverse(g: _Graph, op: Permute, y: str, width: int) -> str:
        return g.op("Gather", y, g.const(np.argsort(op.perm), "perm_inv", np.int64), axis=1)

    @staticmethod
    def edit_back(g: _Graph, op: Permute, x_in: str, x_out: str, d: str, width: int) -> str:
        return _PermuteOnnx.inverse(g, op, d, width)


class _LinearOnnx:
    @staticmethod
    def forward(g: _Graph, op: Linear, x: str, width: int) -> str:
        return g.op("Gemm", x, g.const(op.matrix, "matrix"), g.const(op.bias, "bias"), transB=1)

    @staticmethod
    def inverse(g: _Graph, op: Linear, y: str, width: int) -> str:
        return g.op("MatMul", g.op("Sub", y, g.const(op.bias, "bias")), g.const(op.matrix_inv.T, "matrix_inv_t"))

    @staticmethod
    def edit_back(g: _Graph, op: Linear, x_in: str, x_out: str, d: str, width: int) -> str:
        return g.op("MatMul", d, g.const(op.matrix_inv.T, "matrix_inv_t"))


# One emitter per op kind of flow/ops.py: forward, inverse, and edit_back (the edit of the op's
# input from the edit d of its output, as the native op_inverse_delta_block).
EMITTERS: dict[str, Any] = {"affine": _AffineOnnx, "subspace": _SubspaceOnnx, "coupling": _CouplingOnnx,
                            "permute": _PermuteOnnx, "linear": _LinearOnnx}


def _emitter(op: Any) -> Any:
    em = EMITTERS.get(op.kind)
    if em is None:
        raise InnsteerError(f"ONNX export: op kind '{op.kind}' is not supported")
    return em


def _forward(g: _Graph, op: Any, x: str, width: int) -> str:
    return _emitter(op).forward(g, op, x, width)


def _inverse(g: _Graph, op: Any, y: str, width: int) -> str:
    return _emitter(op).inverse(g, op, y, width)


def _edit_back(g: _Graph, op: Any, x_in: str, x_out: str, d: str, width: int) -> str:
    return _emitter(op).edit_back(g, op, x_in, x_out, d, width)


# ---- whole sites --------------------------------------------------------------------------


def _split(site: Site) -> tuple[list[Any], Subspace | None, list[Any]]:
    k = site.subspace_index
    if k < 0:
        return list(site.ops), None, []
    return list(site.ops[:k]), site.ops[k], list(site.ops[k + 1:])  # type: ignore[return-value]


def phi_graph(site: Site, n_embd: int, inverse: bool = False) -> Any:
    """phi (or phi^-1) of one site; a subspace keeps its orthogonal complement unchanged."""
    g = _Graph(f"phi_inv_{site.layer}" if inverse else f"phi_{site.layer}")
    pre, sub, post = _split(site)
    x = "z" if inverse else "h"
    if not inverse:
        for op in pre:
            x = _forward(g, op, x, n_embd)
    if sub is not None:
        y0 = _forward(g, sub, x, n_embd)
        y = y0
        for op in (reversed(post) if inverse else post):
            y = (_inverse if inverse else _forward)(g, op, y, sub.rank)
        x = g.op("Add", x, g.op("MatMul", g.op("Sub", y, y0), g.const(sub.basis, "basis")), hint="lift")
    if inverse:
        for op in reversed(pre):
            x = _inverse(g, op, x, n_embd)
    if x in ("h", "z"):  # identity phi: the graph still needs a node
        x = g.op("Identity", x)
    name_in, name_out = ("z", "h") if inverse else ("h", "z")
    what = "phi^-1" if inverse else "phi"
    return g.model([(name_in, ["N", n_embd])], [(x, name_out, ["N", n_embd])],
                   f"innsteer {what} at layer {site.layer}: {name_in} [N, {n_embd}] -> {name_out} [N, {n_embd}]")


def _gate_factor(g: _Graph, site: Site, gate: str, z: str, strength: str) -> str:
    """Per-row strength a * w [N, 1] of a gate (as gate_weight in native/src/flow_steer.c)."""
    gp = site.gate
    assert gp is not None
    if gate == "density":
        dist2 = g.op("ReduceMean", g.op("Mul", *(2 * [g.op("Sub", z, g.const(gp.center, "center"))])), axes=[1],
                     keepdims=1)
        step = g.op("Div", g.op("Mul", g.const(0.5, "half"), g.op("Sub", dist2, g.const(gp.radius, "radius"))),
                    g.const(gp.softness, "softness"))
        w = g.op("Mul", g.const(0.5, "half"), g.op("Sub", g.const(1.0, "one"), g.op("Tanh", step)))
        return g.op("Mul", strength, w)
    delta = site.delta.astype(np.float32)
    norm = np.float32(np.sqrt(np.dot(delta, delta)))
    positive = g.op("Greater", strength, g.const(0.0, "zero"))
    target = g.op("Where", positive, g.const(gp.target_pos, "target_pos"), g.const(gp.target_neg, "target_neg"))
    proj = g.op("Div", g.op("MatMul", z, g.const(delta[:, None], "delta_col")), g.const(norm, "norm"))
    need = g.op("Div", g.op("Sub", target, proj), g.const(norm, "norm"))  # multiples of delta to the target
    zero = g.const(0.0, "zero")
    up = g.op("Min", g.op("Max", need, zero), strength)
    down = g.op("Max", g.op("Min", need, zero), strength)
    k = g.op("Where", positive, up, down)
    is_zero = g.op("Equal", strength, zero)
    w = g.op("Where", is_zero, zero, g.op("Div", k, g.op("Where", is_zero, g.const(1.0, "one"), strength)))
    if norm <= 0:
        w = g.op("Mul", w, zero)
    return g.op("Mul", strength, w)


def steer_graph(site: Site, n_embd: int, gate: str = "off") -> Any:
    """h' = phi^-1(phi(h) + a (delta + edit_scale * phi(h))) of one site, as h + dh."""
    if gate != "off" and site.gate is None:
        raise InnsteerError(f"site at layer {site.layer} has no gate parameters; only gate 'off' can be exported")
    g = _Graph(f"steer_{gate}_{site.layer}" if gate != "off" else f"steer_{site.layer}")
    acts, widths = ["h"], [n_embd]
    for op in site.ops:
        acts.append(_forward(g, op, acts[-1], widths[-1]))
        widths.append(op.out_dim(widths[-1]))
    z = acts[-1]
    edit = g.const(site.delta, "delta")
    if site.edit_scale is not None:
        edit = g.op("Add", edit, g.op("Mul", g.const(site.edit_scale, "edit_scale"), z))
    scale = "strength" if gate == "off" else _gate_factor(g, site, gate, z, "strength")
    d = g.op("Mul", scale, edit)
    d = g.op("Expand", d, g.op("Shape", z))  # one edit row per input row
    for k in reversed(range(len(site.ops))):
        d = _edit_back(g, site.ops[k], acts[k], acts[k + 1], d, widths[k])
    out = g.op("Add", "h", d)
    doc = (f"innsteer steering at layer {site.layer} (gate {gate}): h [N, {n_embd}], strength [] -> "
           f"h' [N, {n_embd}]")
    return g.model([("h", ["N", n_embd]), ("strength", [])], [(out, "h_steered", ["N", n_embd])], doc)


def export_onnx(flow: Flow, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Writes every site's graphs and manifest.json into out_dir; returns the manifest."""
    onnx = _onnx()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = flow.model.n_embd
    sites = []
    for site in flow.sites:
        L = site.layer
        files = {"phi": f"phi_{L}.onnx", "phi_inv": f"phi_inv_{L}.onnx", "steer": {"off": f"steer_{L}.onnx"}}
        onnx.save(phi_graph(site, n), out / files["phi"])
        onnx.save(phi_graph(site, n, inverse=True), out / files["phi_inv"])
        onnx.save(steer_graph(site, n), out / files["steer"]["off"])
        if site.gate is not None:
            for gate in GATES[1:]:
                files["steer"][gate] = f"steer_{gate}_{L}.onnx"
                onnx.save(steer_graph(site, n, gate), out / files["steer"][gate])
        sites.append({"layer": L, "tensor": f"l_out-{L}", "latent_dim": site.latent_dim,
                      "ops": [op.kind for op in site.ops], **files})
    manifest = {
        "format": "innsteer-onnx", "version": 1, "opset": OPSET, "dtype": "float32",
        "flow": {"name": flow.name, "method": flow.method, "behavior": flow.behavior,
                 "default_strength": flow.default_strength, "model": vars(flow.model).copy()},
        "inputs": {"phi": {"h": ["N", n]}, "phi_inv": {"z": ["N", n]}, "steer": {"h": ["N", n], "strength": []}},
        "outputs": {"phi": {"z": ["N", n]}, "phi_inv": {"h": ["N", n]}, "steer": {"h_steered": ["N", n]}},
        "sites": sites,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

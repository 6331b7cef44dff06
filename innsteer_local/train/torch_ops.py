"""The op kinds of flow/ops.py as torch modules, one class per kind with the same names and
parameters: forward, inverse, and conversion to and from the NumPy op (`from_op`, `to_op`).
train/inn.py builds its flows from them; TorchSite is flow/site.py's Site in torch (the plain
formula phi^-1(phi(h) + e), an independent reference for the exported and native maps).

Only training and tests import this module: the runtime never needs torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InnsteerError
from ..flow import ops as flow_ops
from ..flow.site import Site


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise InnsteerError("training flows needs torch: pip install 'innsteer-local[train]'") from None
    return torch


torch = require_torch()
nn = torch.nn

_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU}


def _tensor(a: Any, dtype: Any) -> Any:
    return torch.as_tensor(np.asarray(a)).to(dtype)


def _np(t: Any, dtype: Any = np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype).copy()


class TorchAffine(nn.Module):
    """y = x * scale + bias."""

    kind = "affine"

    def __init__(self, scale: Any, bias: Any):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: Any) -> Any:
        return x * self.scale + self.bias

    def inverse(self, y: Any) -> Any:
        return (y - self.bias) / self.scale

    def inverse_delta(self, d: Any) -> Any:
        """The edit of the input that an edit d of the output corresponds to."""
        return d / self.scale

    @classmethod
    def from_op(cls, op: flow_ops.Affine, dtype: Any = torch.float32) -> TorchAffine:
        return cls(_tensor(op.scale, dtype), _tensor(op.bias, dtype))

    def to_op(self) -> flow_ops.Affine:
        return flow_ops.Affine(scale=_np(self.scale), bias=_np(self.bias))


class TorchSubspace(nn.Module):
    """y = basis x: the coordinates in the subspace. The site lifts a change of y back and keeps
    the orthogonal complement (TorchSite), as flow/site.py does."""

    kind = "subspace"

    def __init__(self, basis: Any):
        super().__init__()
        self.register_buffer("basis", basis)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def forward(self, x: Any) -> Any:
        return x @ self.basis.T

    def inverse_delta(self, dy: Any) -> Any:
        """A change of the subspace coordinates as a change of the full-width row."""
        return dy @ self.basis

    @classmethod
    def from_op(cls, op: flow_ops.Subspace, dtype: Any = torch.float32) -> TorchSubspace:
        return cls(_tensor(op.basis, dtype))

    def to_op(self) -> flow_ops.Subspace:
        return flow_ops.Subspace(basis=_np(self.basis))


class TorchCoupling(nn.Sequential):
    """x[d1:] <- x[d1:] * exp(s) + t, (s_raw, t) = mlp(x[:d1]), s = clamp * tanh(s_raw / clamp).
    The module's layers are the conditioner MLP (Linear, activation, ..., Linear), so its
    state-dict keys are those of a plain nn.Sequential."""

    kind = "coupling"

    def __init__(self, widths: list[int], clamp: float = 2.0, activation: str = "silu"):
        layers: list[Any] = []
        for j, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if j + 2 < len(widths):
                layers.append(_ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.d1, self.d2 = widths[0], widths[-1] // 2
        self.clamp, self.activation = clamp, activation

    def linears(self) -> list[Any]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def couple(self, x: Any, inverse: bool) -> tuple[Any, Any]:
        """(the op's output, or its input when inverse; the log-scale s)."""
        h = x[..., : self.d1]
        for layer in self:
            h = layer(h)
        s = self.clamp * torch.tanh(h[..., : self.d2] / self.clamp)
        t = h[..., self.d2:]
        x2 = x[..., self.d1:]
        x2 = (x2 - t) * torch.exp(-s) if inverse else x2 * torch.exp(s) + t
        return torch.cat([x[..., : self.d1], x2], -1), s

    def forward(self, x: Any) -> Any:
        return self.couple(x, False)[0]

    def inverse(self, y: Any) -> Any:
        return self.couple(y, True)[0]

    @classmethod
    def from_op(cls, op: flow_ops.Coupling, dtype: Any = torch.float32) -> TorchCoupling:
        widths = [int(op.weights[0].shape[1])] + [int(w.shape[0]) for w in op.weights]
        m = cls(widths, op.clamp, op.activation).to(dtype)
        with torch.no_grad():
            for lin, w, b in zip(m.linears(), op.weights, op.biases):
                lin.weight.copy_(_tensor(w, dtype))
                lin.bias.copy_(_tensor(b, dtype))
        return m

    def to_op(self) -> flow_ops.Coupling:
        lins = self.linears()
        return flow_ops.Coupling(weights=[_np(m.weight) for m in lins], biases=[_np(m.bias) for m in lins],
                                 clamp=self.clamp, activation=self.activation)


class TorchPermute(nn.Module):
    """y[i] = x[perm[i]]."""

    kind = "permute"

    def __init__(self, perm: Any):
        super().__init__()
        self.register_buffer("perm", perm.to(torch.int64))

    def forward(self, x: Any) -> Any:
        return x[..., self.perm]

    def inverse(self, y: Any) -> Any:
        return y[..., torch.argsort(self.perm)]

    @classmethod
    def from_op(cls, op: flow_ops.Permute, dtype: Any = torch.float32) -> TorchPermute:
        return cls(torch.as_tensor(np.asarray(op.perm, dtype=np.int64)))

    def to_op(self) -> flow_ops.Permute:
        return flow_ops.Permute(perm=_np(self.perm, np.int32))


class TorchLinear(nn.Module):
    """y = matrix x + bias, x = matrix_inv (y - bias)."""

    kind = "linear"

    def __init__(self, matrix: Any, matrix_inv: Any, bias: Any):
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("matrix_inv", matrix_inv)
        self.register_buffer("bias", bias)

    def forward(self, x: Any) -> Any:
        return x @ self.matrix.T + self.bias

    def inverse(self, y: Any) -> Any:
        return (y - self.bias) @ self.matrix_inv.T

    @classmethod
    def from_op(cls, op: flow_ops.Linear, dtype: Any = torch.float32) -> TorchLinear:
        return cls(_tensor(op.matrix, dtype), _tensor(op.matrix_inv, dtype), _tensor(op.bias, dtype))

    def to_op(self) -> flow_ops.Linear:
        return flow_ops.Linear(matrix=_np(self.matrix), matrix_inv=_np(self.matrix_inv), bias=_np(self.bias))


TORCH_OPS: dict[str, Any] = {cls.kind: cls for cls in (TorchAffine, TorchSubspace, TorchCoupling, TorchPermute, TorchLinear)}


def from_op(op: Any, dtype: Any = torch.float32) -> Any:
    """The torch module of a NumPy op."""
    cls = TORCH_OPS.get(op.kind)
    if cls is None:
        raise InnsteerError(f"op kind '{op.kind}' has no torch module")
    return cls.from_op(op, dtype)


class TorchSite(nn.Module):
    """flow/site.py's Site in torch: phi, phi^-1, and steering as phi^-1(phi(h) + e) (the plain
    formula, not the difference form the native kernel uses)."""

    def __init__(self, site: Site, dtype: Any = torch.float64):
        super().__init__()
        self.site = site
        self.dtype = dtype
        self.ops = nn.ModuleList(from_op(op, dtype) for op in site.ops)
        self.sub = site.subspace_index
        self.requires_grad_(False)  # a reference of a trained site, not something to train

    def _t(self, a: Any) -> Any:
        return _tensor(a, self.dtype)

    def latent(self, h: Any) -> tuple[Any, Any]:
        """(phi(h) n_embd wide, the latent z where delta lives)."""
        k = self.sub
        pre, post = (self.ops, []) if k < 0 else (self.ops[:k], self.ops[k + 1:])
        x = h
        for op in pre:
            x = op(x)
        if k < 0:
            return x, x
        y = self.ops[k](x)
        z = y
        for op in post:
            z = op(z)
        return x + self.ops[k].inverse_delta(z - y), z

    def forward(self, h: Any) -> Any:
        return self.latent(h)[0]

    def inverse(self, z: Any) -> Any:
        k = self.sub
        pre, post = (self.ops, []) if k < 0 else (self.ops[:k], self.ops[k + 1:])
        x = z
        if k >= 0:
            y0 = self.ops[k](x)
            y = y0
            for op in reversed(post):
                y = op.inverse(y)
            x = x + self.ops[k].inverse_delta(y - y0)
        for op in reversed(pre):
            x = op.inverse(x)
        return x

    def gate_weight(self, z: Any, strength: float, gate: str) -> Any:
        """The per-row share of the edit, [N, 1] (docs/flow-format.md, Gates)."""
        site, g = self.site, self.site.gate
        if gate == "off":
            return torch.ones(z.shape[0], 1, dtype=self.dtype)
        if g is None:
            raise InnsteerError(f"site at layer {site.layer} has no gate parameters")
        if gate == "density":
            d2 = ((z - self._t(g.center)) ** 2).mean(1, keepdim=True)
            return torch.sigmoid(-(d2 - g.radius) / g.softness)
        if strength == 0:
            return torch.zeros(z.shape[0], 1, dtype=self.dtype)
        delta = self._t(site.delta)
        norm = delta.norm()
        target = g.target_pos if strength > 0 else g.target_neg
        need = (target - (z @ delta)[:, None] / norm) / norm
        return need.clamp(min(0.0, strength), max(0.0, strength)) / strength

    def steer(self, h: Any, strength: float, gate: str = "off") -> Any:
        full, z = self.latent(h)
        edit = self._t(self.site.delta)
        if self.site.edit_scale is not None:
            edit = edit + self._t(self.site.edit_scale) * z
        e = strength * self.gate_weight(z, strength, gate) * edit
        if self.sub >= 0:  # the edit lives in the subspace: the full-width latent moves by basis^T e
            e = self.ops[self.sub].inverse_delta(e)
        return self.inverse(full + e)

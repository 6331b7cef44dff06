"""The flow at one layer as torch modules, differentiable in its parameters and in h (needs torch).

    phi = normalise (data mean/std) -> [rank-r subspace -> standardise] -> K affine couplings,
          separated by fixed mixing (orthogonal matrices up to width 128, permutations above)
    h'  = h + lift( f^-1( f(y) + a * delta ) - y ),  y = coords(h)

The couplings' output layers start at zero, so phi starts linear, and delta starts at the
coordinates of the mean-diff vector v: at initialisation h' = h + a * v exactly (the identity
start). `site()` writes the same ops, in the same order, as the flow file (docs/flow-format.md);
`VectorFlow` is the plain trained vector (h' = h + a * v), stored as a flow without ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..choices import ACTIVATIONS
from ..errors import InnsteerError, InvalidArgument
from ..flow import Affine, Coupling, Linear, Permute, Site, Subspace


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise InnsteerError("training flows needs torch: pip install 'innsteer-local[train]'") from None
    return torch


torch = require_torch()
nn = torch.nn

# Above this width the mixing between couplings is a permutation: an orthogonal matrix would add
# 2 * width^2 floats to the file (a full-width flow on a 576-wide model: 2.6 MB per mixing).
MAX_MATRIX_MIX = 128


@dataclass
class InnConfig:
    """The flow's shape. rank 0: phi acts on the whole width; rank r: on an r-dim subspace."""

    rank: int = 0
    blocks: int = 4
    hidden: int = 64
    clamp: float = 2.0
    activation: str = "silu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise InvalidArgument(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.rank < 0 or self.blocks < 0 or self.hidden < 1:
            raise InvalidArgument("rank and blocks must be >= 0 and hidden >= 1")


class Couplings(nn.Module):
    """K affine couplings on width w: x[d1:] <- x[d1:] * exp(s) + t, (s_raw, t) = mlp(x[:d1]),
    s = clamp * tanh(s_raw / clamp) (the flow file's coupling op)."""

    def __init__(self, width: int, cfg: InnConfig):
        super().__init__()
        if width < 2 and cfg.blocks:
            raise InnsteerError(f"a coupling needs width >= 2, got {width}")
        g = torch.Generator().manual_seed(cfg.seed)
        self.d1, self.d2 = width // 2, width - width // 2
        self.clamp, self.activation = cfg.clamp, cfg.activation
        act = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU}[cfg.activation]
        self.nets = nn.ModuleList()
        self.matrix_mix = width <= MAX_MATRIX_MIX
        for b in range(cfg.blocks):
            first, last = nn.Linear(self.d1, cfg.hidden), nn.Linear(cfg.hidden, 2 * self.d2)
            with torch.no_grad():
                first.weight.copy_(torch.randn(first.weight.shape, generator=g) / math.sqrt(self.d1))
                first.bias.zero_()
                last.weight.zero_()  # the coupling starts as the identity
                last.bias.zero_()
            self.nets.append(nn.Sequential(first, act(), last))
            if b + 1 < cfg.blocks:
                if self.matrix_mix:
                    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
                    self.register_buffer(f"mix{b}", q.to(torch.float32))
                else:
                    self.register_buffer(f"mix{b}", torch.randperm(width, generator=g))

    def _mix(self, k: int, x: Any, inverse: bool) -> Any:
        m = getattr(self, f"mix{k}")
        if self.matrix_mix:
            return x @ m if inverse else x @ m.T
        if inverse:
            return x[..., torch.argsort(m)]
        return x[..., m]

    def _couple(self, k: int, x: Any, inverse: bool) -> tuple[Any, Any]:
        h = self.nets[k](x[..., : self.d1])
        s = self.clamp * torch.tanh(h[..., : self.d2] / self.clamp)
        t = h[..., self.d2:]
        x2 = x[..., self.d1:]
        x2 = (x2 - t) * torch.exp(-s) if inverse else x2 * torch.exp(s) + t
        return torch.cat([x[..., : self.d1], x2], -1), s.sum(-1)

    def forward(self, y: Any) -> tuple[Any, Any]:
        """(z, log|det dz/dy|)."""
        logdet = torch.zeros(y.shape[:-1], dtype=y.dtype)
        for k in range(len(self.nets)):
            y, ld = self._couple(k, y, False)
            logdet = logdet + ld
            if k + 1 < len(self.nets):
                y = self._mix(k, y, False)
        return y, logdet

    def inverse(self, z: Any) -> Any:
        for k in reversed(range(len(self.nets))):
            if k + 1 < len(self.nets):
                z = self._mix(k, z, True)
            z, _ = self._couple(k, z, True)
        return z

    def ops(self) -> list[Any]:
        out: list[Any] = []
        for k, seq in enumerate(self.nets):
            out.append(Coupling(weights=[_np(seq[0].weight), _np(seq[2].weight)], biases=[_np(seq[0].bias), _np(seq[2].bias)],
                                clamp=self.clamp, activation=self.activation))
            if k + 1 < len(self.nets):
                m = getattr(self, f"mix{k}").numpy()
                if self.matrix_mix:
                    out.append(Linear(matrix=m.copy(), matrix_inv=m.T.copy(), bias=np.zeros(len(m), np.float32)))
                else:
                    out.append(Permute(perm=m.astype(np.int32)))
        return out


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32).copy()


class InnFlow(nn.Module):
    """phi and delta at one layer (see the module docstring)."""

    def __init__(self, mu: np.ndarray, sd: np.ndarray, v: np.ndarray, cfg: InnConfig,
                 basis: Optional[np.ndarray] = None, y_mu: Optional[np.ndarray] = None,
                 y_sd: Optional[np.ndarray] = None):
        super().__init__()
        f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.register_buffer("mu", f32(mu))
        self.register_buffer("sd", f32(np.maximum(sd, 1e-6)))
        self.subspace = basis is not None
        if self.subspace:
            self.register_buffer("basis", f32(basis))
            self.register_buffer("y_mu", f32(y_mu if y_mu is not None else np.zeros(len(basis))))
            self.register_buffer("y_sd", f32(y_sd if y_sd is not None else np.ones(len(basis))))
        self.width = len(basis) if self.subspace else len(mu)
        self.couplings = Couplings(self.width, cfg)
        with torch.no_grad():
            c = self.shift_coords(f32(v)[None])
            delta = self.couplings(c)[0] - self.couplings(torch.zeros_like(c))[0]
        self.delta = nn.Parameter(delta[0].clone())

    # -- coordinates: y = coords(h), h + lift(dy) --
    def coords(self, h: Any) -> Any:
        y = (h - self.mu) / self.sd
        if self.subspace:
            y = (y @ self.basis.T - self.y_mu) / self.y_sd
        return y

    def shift_coords(self, v: Any) -> Any:
        """The coordinates change that a raw shift v causes (linear)."""
        y = v / self.sd
        return (y @ self.basis.T) / self.y_sd if self.subspace else y

    def lift(self, dy: Any) -> Any:
        if self.subspace:
            dy = (dy * self.y_sd) @ self.basis
        return dy * self.sd

    def latent(self, h: Any) -> Any:
        return self.couplings(self.coords(h))[0]

    def steer(self, h: Any, a: Any) -> Any:
        """h' for rows h (..., n_embd) at strength a (a number or a tensor broadcasting over rows)."""
        y = self.coords(h)
        z, _ = self.couplings(y)
        return h + self.lift(self.couplings.inverse(z + a * self.delta) - y)

    def site(self, layer: int, delta_scale: float = 1.0) -> Site:
        """The flow-file site (delta scaled: the strength that becomes 1)."""
        mu, sd = self.mu.numpy().astype(np.float64), self.sd.numpy().astype(np.float64)
        ops: list[Any] = [Affine(scale=(1 / sd).astype(np.float32), bias=(-mu / sd).astype(np.float32))]
        if self.subspace:
            y_mu, y_sd = self.y_mu.numpy().astype(np.float64), self.y_sd.numpy().astype(np.float64)
            ops += [Subspace(basis=self.basis.numpy().astype(np.float32).copy()),
                    Affine(scale=(1 / y_sd).astype(np.float32), bias=(-y_mu / y_sd).astype(np.float32))]
        ops += self.couplings.ops()
        return Site(layer=layer, ops=ops, delta=(_np(self.delta) * delta_scale).astype(np.float32))

    def coupling_parameters(self) -> list[Any]:
        return list(self.couplings.parameters())


class VectorFlow(nn.Module):
    """The plain trained vector, h' = h + a * v: the same normalised coordinates and learning rate
    as InnFlow's shift (a flow with no couplings), written as a flow without ops (llama.cpp's
    control vector)."""

    def __init__(self, sd: np.ndarray, v: np.ndarray):
        super().__init__()
        self.register_buffer("sd", torch.tensor(np.maximum(np.asarray(sd, dtype=np.float32), 1e-6)))
        self.delta = nn.Parameter(torch.tensor(np.asarray(v, dtype=np.float32)) / self.sd)

    def steer(self, h: Any, a: Any) -> Any:
        return h + a * (self.delta * self.sd)

    def site(self, layer: int, delta_scale: float = 1.0) -> Site:
        return Site(layer=layer, ops=[], delta=(_np(self.delta * self.sd) * delta_scale).astype(np.float32))

    def coupling_parameters(self) -> list[Any]:
        return []

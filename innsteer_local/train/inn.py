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
from ..flow import Site
from .torch_ops import TorchAffine, TorchCoupling, TorchLinear, TorchPermute, TorchSubspace, from_op, torch

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
    """K affine couplings on width w (torch_ops.TorchCoupling), separated by fixed mixing
    (TorchLinear with an orthogonal matrix, or TorchPermute): the flow file's ops, in order."""

    def __init__(self, width: int, cfg: InnConfig):
        super().__init__()
        if width < 2 and cfg.blocks:
            raise InnsteerError(f"a coupling needs width >= 2, got {width}")
        g = torch.Generator().manual_seed(cfg.seed)
        self.d1, self.d2 = width // 2, width - width // 2
        self.clamp, self.activation = cfg.clamp, cfg.activation
        self.nets = nn.ModuleList()
        self.matrix_mix = width <= MAX_MATRIX_MIX
        for b in range(cfg.blocks):
            net = TorchCoupling([self.d1, cfg.hidden, 2 * self.d2], cfg.clamp, cfg.activation)
            first, last = net.linears()
            with torch.no_grad():
                first.weight.copy_(torch.randn(first.weight.shape, generator=g) / math.sqrt(self.d1))
                first.bias.zero_()
                last.weight.zero_()  # the coupling starts as the identity
                last.bias.zero_()
            self.nets.append(net)
            if b + 1 < cfg.blocks:
                if self.matrix_mix:
                    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
                    q = q.to(torch.float32)
                    mix = TorchLinear(q, q.T.contiguous(), torch.zeros(width))
                else:
                    mix = TorchPermute(torch.randperm(width, generator=g))
                self.add_module(f"mix{b}", mix)
        self._register_load_state_dict_pre_hook(self._legacy_mix)

    def _legacy_mix(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before the mixing became op modules hold mix{b} as one tensor."""
        for b in range(len(self.nets) - 1):
            old = state.pop(f"{prefix}mix{b}", None)
            if old is None:
                continue
            if self.matrix_mix:
                state.update({f"{prefix}mix{b}.matrix": old, f"{prefix}mix{b}.matrix_inv": old.T.contiguous(),
                              f"{prefix}mix{b}.bias": torch.zeros(len(old))})
            else:
                state[f"{prefix}mix{b}.perm"] = old

    def forward(self, y: Any) -> tuple[Any, Any]:
        """(z, log|det dz/dy|)."""
        logdet = torch.zeros(y.shape[:-1], dtype=y.dtype)
        for k, net in enumerate(self.nets):
            y, s = net.couple(y, False)
            logdet = logdet + s.sum(-1)
            if k + 1 < len(self.nets):
                y = getattr(self, f"mix{k}")(y)
        return y, logdet

    def inverse(self, z: Any) -> Any:
        for k in reversed(range(len(self.nets))):
            if k + 1 < len(self.nets):
                z = getattr(self, f"mix{k}").inverse(z)
            z = self.nets[k].inverse(z)
        return z

    def ops(self) -> list[Any]:
        out: list[Any] = []
        for k, net in enumerate(self.nets):
            out.append(net.to_op())
            if k + 1 < len(self.nets):
                out.append(getattr(self, f"mix{k}").to_op())
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
        sd = np.maximum(np.asarray(sd, np.float64), 1e-6)
        # the ops before the couplings, as the file stores them: normalise, then (rank r) project
        # onto the basis and normalise there
        inputs: list[Any] = [TorchAffine(f32(1 / sd), f32(-np.asarray(mu, np.float64) / sd))]
        self.subspace = basis is not None
        if self.subspace:
            y_mu = np.zeros(len(basis)) if y_mu is None else np.asarray(y_mu, np.float64)
            y_sd = np.ones(len(basis)) if y_sd is None else np.asarray(y_sd, np.float64)
            inputs += [TorchSubspace(f32(basis)), TorchAffine(f32(1 / y_sd), f32(-y_mu / y_sd))]
        self.inputs = nn.ModuleList(inputs)
        self.width = len(basis) if self.subspace else len(mu)
        self.couplings = Couplings(self.width, cfg)
        with torch.no_grad():
            c = torch.tensor(self.shift_coords(np.asarray(v, np.float64))[None], dtype=torch.float32)
            delta = self.couplings(c)[0] - self.couplings(torch.zeros_like(c))[0]
        self.delta = nn.Parameter(delta[0].clone())
        self._register_load_state_dict_pre_hook(self._legacy_inputs)

    def _legacy_inputs(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before the input ops were op modules hold mu, sd (and basis, y_mu,
        y_sd) as buffers."""
        if f"{prefix}mu" not in state:
            return
        mu, sd = state.pop(f"{prefix}mu"), state.pop(f"{prefix}sd")
        state[f"{prefix}inputs.0.scale"], state[f"{prefix}inputs.0.bias"] = 1 / sd, -mu / sd
        if f"{prefix}basis" in state:
            y_mu, y_sd = state.pop(f"{prefix}y_mu"), state.pop(f"{prefix}y_sd")
            state[f"{prefix}inputs.1.basis"] = state.pop(f"{prefix}basis")
            state[f"{prefix}inputs.2.scale"], state[f"{prefix}inputs.2.bias"] = 1 / y_sd, -y_mu / y_sd

    # -- coordinates: y = coords(h); an edit dy of them is the edit lift(dy) of h --
    def coords(self, h: Any) -> Any:
        for op in self.inputs:
            h = op(h)
        return h

    def shift_coords(self, v: np.ndarray) -> np.ndarray:
        """The coordinates change that a raw shift v causes (the input ops are linear), in float64."""
        x, zero = torch.tensor(v, dtype=torch.float64), torch.zeros(len(v), dtype=torch.float64)
        for op in self.inputs:
            op64 = from_op(op.to_op(), torch.float64)
            x, zero = op64(x), op64(zero)
        return (x - zero).numpy()

    def lift(self, dy: Any) -> Any:
        for op in reversed(self.inputs):
            dy = op.inverse_delta(dy)
        return dy

    def latent(self, h: Any) -> Any:
        return self.couplings(self.coords(h))[0]

    def steer(self, h: Any, a: Any) -> Any:
        """h' for rows h (..., n_embd) at strength a (a number or a tensor broadcasting over rows)."""
        y = self.coords(h)
        z, _ = self.couplings(y)
        return h + self.lift(self.couplings.inverse(z + a * self.delta) - y)

    def site(self, layer: int, delta_scale: float = 1.0) -> Site:
        """The flow-file site (delta scaled: the strength that becomes 1)."""
        ops = [op.to_op() for op in self.inputs] + self.couplings.ops()
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

"""The flow at one layer (Site) and its runtime gate parameters (Gate), in NumPy float64: the
reference that the native library, the ONNX export and the torch modules are tested against:

    h' = phi^-1( phi(h) + a * (delta + edit_scale * phi(h)) )
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ops import Op, Subspace
from ..errors import InvalidArgument


@dataclass
class Gate:
    """Parameters of the runtime gates, in the latent where delta lives (width latent_dim).

    density: weight 1 / (1 + exp((mean((z - center)^2) - radius) / softness)): rows far from the
    training support get a damped edit. target: move along delta only until the projection on
    delta reaches target_pos (target_neg for negative strength), at most `strength` deltas."""

    center: np.ndarray
    radius: float
    softness: float
    target_pos: float
    target_neg: float

    @classmethod
    def fit(cls, z_pos: np.ndarray, z_neg: np.ndarray, z_held_out: np.ndarray, delta: np.ndarray,
            quantile: float = 0.95) -> "Gate":
        """Support = the class rows; radius = `quantile` of held-out class rows' distances."""
        zc = np.concatenate([z_pos, z_neg]).astype(np.float64)
        center = zc.mean(0)
        held = np.asarray(z_held_out, np.float64) if len(z_held_out) else zc
        d2 = ((held - center) ** 2).mean(1)
        radius = float(max(np.quantile(d2, quantile), 1e-6))
        u = delta.astype(np.float64) / max(np.linalg.norm(delta), 1e-12)
        return cls(center=center.astype(np.float32), radius=radius, softness=max(0.1 * radius, 1e-6),
                   target_pos=float((z_pos @ u).mean()), target_neg=float((z_neg @ u).mean()))

    def weight(self, z: np.ndarray, delta: np.ndarray, strength: float, mode: str) -> np.ndarray:
        z = np.atleast_2d(z)
        if mode == "density":
            d2 = ((z - self.center.astype(np.float64)) ** 2).mean(1)
            return 0.5 * (1.0 - np.tanh(0.5 * (d2 - self.radius) / self.softness))  # = logistic, no overflow
        if mode == "target":
            if strength == 0:
                return np.zeros(len(z))
            norm = np.linalg.norm(delta.astype(np.float64))
            need = ((self.target_pos if strength > 0 else self.target_neg) - z @ delta.astype(np.float64) / norm) / norm
            k = np.clip(need, 0, strength) if strength > 0 else np.clip(need, strength, 0)
            return k / strength
        return np.ones(len(z))


@dataclass
class Site:
    """The flow at one layer."""

    layer: int
    ops: list[Op]
    delta: np.ndarray
    edit_scale: np.ndarray | None = None
    gate: Gate | None = None

    @property
    def subspace_index(self) -> int:
        return next((i for i, op in enumerate(self.ops) if isinstance(op, Subspace)), -1)

    def _split(self) -> tuple[list[Op], Subspace | None, list[Op]]:
        k = self.subspace_index
        if k < 0:
            return list(self.ops), None, []
        return list(self.ops[:k]), self.ops[k], list(self.ops[k + 1 :])  # type: ignore[return-value]

    def forward(self, h: np.ndarray) -> np.ndarray:
        """phi(h), n_embd wide (a subspace op leaves the complement unchanged)."""
        pre, sub, post = self._split()
        x = np.asarray(h, dtype=np.float64)
        for op in pre:
            x = op.forward(x)
        if sub is not None:
            u = sub.basis.astype(np.float64)
            y0 = x @ u.T
            y = y0
            for op in post:
                y = op.forward(y)
            x = x + (y - y0) @ u
        return x

    def inverse(self, z: np.ndarray) -> np.ndarray:
        pre, sub, post = self._split()
        x = np.asarray(z, dtype=np.float64)
        if sub is not None:
            u = sub.basis.astype(np.float64)
            y0 = x @ u.T
            y = y0
            for op in reversed(post):
                y = op.inverse(y)
            x = x + (y - y0) @ u
        for op in reversed(pre):
            x = op.inverse(x)
        return x

    def steer(self, h: np.ndarray, strength: float, gate: str = "off") -> np.ndarray:
        """h' = phi^-1(phi(h) + a (delta + edit_scale * phi(h))), in float64.

        Computed as h + dh: the latent edit is carried back through each op as a difference
        (as native/src/flow_steer.c does), so rounding scales with the edit, not with |h|."""
        x = np.asarray(h, dtype=np.float64)
        acts = [x]
        for op in self.ops:
            acts.append(acts[-1] @ op.basis.T.astype(np.float64) if isinstance(op, Subspace) else op.forward(acts[-1]))
        z = acts[-1]
        d = self.delta.astype(np.float64) + (self.edit_scale * z if self.edit_scale is not None else 0.0)
        d = np.broadcast_to(d, z.shape).copy()
        if gate != "off":
            if self.gate is None:
                raise InvalidArgument(f"site at layer {self.layer} has no gate parameters")
            w = self.gate.weight(z, self.delta, strength, gate)
            d = d * (strength * w).reshape(z.shape[:-1] + (1,)) if z.ndim > 1 else d * strength * w[0]
        else:
            d = strength * d
        for k in reversed(range(len(self.ops))):
            d = self.ops[k].inverse_delta(acts[k], acts[k + 1], d)
        return x + d

    @property
    def latent_dim(self) -> int:
        k = self.subspace_index
        return self.ops[k].rank if k >= 0 else int(self.delta.shape[0])  # type: ignore[union-attr]

"""The op kinds a flow is made of. Each knows its forward map, its inverse and how an edit of its
output carries back to its input; the same ordered list is the GGUF layout (docs/flow-format.md),
the C structs (native/src/flow.h) and the torch modules (train/inn.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np


def _activate(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    return x / (1.0 + np.exp(-x))


@dataclass
class Affine:
    """Per-dimension affine map y = x * scale + bias (input normalisation)."""

    scale: np.ndarray
    bias: np.ndarray
    kind = "affine"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.bias

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (y - self.bias) / self.scale

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The edit of the input that an edit d of the output corresponds to (see Site.steer)."""
        return d / self.scale

    def tensors(self) -> dict[str, np.ndarray]:
        return {"scale": self.scale, "bias": self.bias}


@dataclass
class Subspace:
    """Restricts the following ops to span(basis rows); the orthogonal rest passes unchanged."""

    basis: np.ndarray  # (rank, n_embd), orthonormal rows
    kind = "subspace"

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        return d @ self.basis.astype(np.float64)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"basis": self.basis}


@dataclass
class Coupling:
    """Affine coupling: x[d1:] <- x[d1:] * exp(s) + t with (s_raw, t) = mlp(x[:d1]) and
    s = clamp * tanh(s_raw / clamp). weights[k] has shape (out_k, in_k)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    clamp: float = 2.0
    activation: str = "silu"
    kind = "coupling"

    def _params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        d1 = x.shape[-1] // 2
        d2 = x.shape[-1] - d1
        h = x[..., :d1]
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.T.astype(np.float64) + b
            if k + 1 < len(self.weights):
                h = _activate(self.activation, h)
        s = self.clamp * np.tanh(h[..., :d2] / self.clamp)
        return s, h[..., d2:], d1

    def forward(self, x: np.ndarray) -> np.ndarray:
        s, t, d1 = self._params(x)
        y = x.copy()
        y[..., d1:] = x[..., d1:] * np.exp(s) + t
        return y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        s, t, d1 = self._params(y)
        x = y.copy()
        x[..., d1:] = (y[..., d1:] - t) * np.exp(-s)
        return x

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        moved = self.inverse(x_out + d)  # conditions on x_in[:d1] + d[:d1]
        out = d.copy()
        d1 = x_in.shape[-1] // 2
        out[..., d1:] = moved[..., d1:] - x_in[..., d1:]
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"w{k}"] = w
            out[f"b{k}"] = b
        return out


@dataclass
class Permute:
    """y[i] = x[perm[i]]: mixes which coordinates the next coupling conditions on."""

    perm: np.ndarray
    kind = "permute"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x[..., self.perm]

    def inverse(self, y: np.ndarray) -> np.ndarray:
        x = np.empty_like(y)
        x[..., self.perm] = y
        return x

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.inverse(d)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"perm": self.perm.astype(np.int32)}


@dataclass
class Linear:
    """Invertible dense map y = matrix x + bias; the file stores the inverse as well."""

    matrix: np.ndarray
    matrix_inv: np.ndarray
    bias: np.ndarray
    kind = "linear"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x @ self.matrix.T.astype(np.float64) + self.bias

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (y - self.bias) @ self.matrix_inv.T.astype(np.float64)

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        return d @ self.matrix_inv.T.astype(np.float64)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"matrix": self.matrix, "matrix_inv": self.matrix_inv, "bias": self.bias}


Op = Union[Affine, Subspace, Coupling, Permute, Linear]
OP_KINDS = {cls.kind: cls for cls in (Affine, Subspace, Coupling, Permute, Linear)}

"""The op kinds a flow is made of. Each class is the whole op kind: its forward map, its inverse,
how an edit of its output carries back to its input, and its part of the flow file (what it
writes, and how the strict reader validates it). The same ordered list is the GGUF layout
(docs/flow-format.md), the C table (native/src/flow_ops.c), the ONNX emitters (convert/onnx.py)
and the torch modules (train/torch_ops.py); tests/integration/test_op_conformance.py runs every
kind in OP_KINDS through all of them.

Adding a kind: a class here (registered in OP_KINDS), its torch twin, its C table entry, its ONNX
emitter and a row in docs/flow-format.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union

import numpy as np

from ..choices import ACTIVATIONS, MAX_MLP_LAYERS, MAX_RANK, MAX_WIDTH
from ..errors import FlowFormatError


def _activate(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives x / inf = -0, silu's limit there
        return x / (1.0 + np.exp(-x))


class Fields(Protocol):
    """The typed key/value access the reader hands an op (flow/format.py, _Fields)."""

    def u32(self, key: str) -> int: ...
    def f32(self, key: str) -> float: ...
    def str(self, key: str) -> str: ...


class Tensors(Protocol):
    """The tensor access the reader hands an op (flow/format.py, _Tensors)."""

    def rows(self, name: str) -> int: ...
    def get(self, name: str, shape: tuple[int, ...], integer: bool = False) -> np.ndarray: ...


@dataclass(frozen=True)
class Slot:
    """Where an op sits while the file is read: site si, op k, acting on width dim, after `before`."""

    si: int
    k: int
    dim: int
    n_embd: int
    before: tuple[Any, ...]

    @property
    def prefix(self) -> str:
        return f"site.{self.si}.op.{self.k}"


class _OpKind:
    """What every op kind shares: the defaults of its file entry."""

    kind: ClassVar[str]
    # tensors kept in f32 whatever the file's dtype: rounded to f16 they would no longer invert
    # exactly (a basis no longer orthonormal, a matrix no longer its stored inverse's inverse)
    exact_f32: ClassVar[tuple[str, ...]] = ()

    def out_dim(self, dim: int) -> int:
        """Width of the vector after this op."""
        return dim

    def metadata(self) -> dict[str, Union[int, float, str]]:
        """Keys innsteer.<prefix>.<name>: int is written as u32, float as f32, str as a string."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What `inspect` shows beyond the tensors."""
        return {}


@dataclass
class Affine(_OpKind):
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

    @classmethod
    def read(cls, kv: Fields, tensors: Tensors, at: Slot) -> "Affine":
        scale = tensors.get(f"{at.prefix}.scale", (at.dim,))
        mag = np.abs(scale)
        ok = (mag >= np.float32(1e-6)) & (mag <= np.float32(1e6))
        if not np.all(ok):
            i = int(np.flatnonzero(~ok)[0])
            raise FlowFormatError(f"site {at.si} op {at.k} (affine): scale[{i}] = {scale[i]} is outside 1e-6..1e6 in magnitude")
        return cls(scale=scale, bias=tensors.get(f"{at.prefix}.bias", (at.dim,)))

    @classmethod
    def random(cls, width: int, n_embd: int, rng: np.random.Generator) -> Affine:
        """Non-trivial weights, for tests and benchmarks (every kind has one)."""
        return cls(scale=(rng.uniform(0.5, 2.0, width) * rng.choice([-1.0, 1.0], width)).astype(np.float32),
                   bias=rng.normal(0, 0.5, width).astype(np.float32))


@dataclass
class Subspace(_OpKind):
    """Restricts the following ops to span(basis rows); the orthogonal rest passes unchanged
    (the site, flow/site.py, does the projection and the lift back)."""

    basis: np.ndarray  # (rank, n_embd), orthonormal rows
    kind = "subspace"
    exact_f32 = ("basis",)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def out_dim(self, dim: int) -> int:
        return self.rank

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        return d @ self.basis.astype(np.float64)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"basis": self.basis}

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def read(cls, kv: Fields, tensors: Tensors, at: Slot) -> "Subspace":
        if any(isinstance(o, Subspace) for o in at.before):
            raise FlowFormatError(f"site {at.si}: more than one subspace op")
        rank = tensors.rows(f"{at.prefix}.basis")
        max_rank = min(at.n_embd, MAX_RANK)
        if not 1 <= rank <= max_rank:
            raise FlowFormatError(f"site {at.si} op {at.k}: subspace rank {rank} outside 1..{max_rank}")
        basis = tensors.get(f"{at.prefix}.basis", (rank, at.n_embd))
        if not rows_orthonormal(basis, 1e-2):
            raise FlowFormatError(f"site {at.si} op {at.k}: subspace basis rows are not orthonormal")
        return cls(basis=orthonormalise(basis))

    @classmethod
    def random(cls, width: int, n_embd: int, rng: np.random.Generator) -> Subspace:
        rank = int(rng.integers(2, min(n_embd, MAX_RANK + 1)))
        return cls(basis=np.linalg.qr(rng.normal(size=(n_embd, rank)))[0].T.astype(np.float32))


@dataclass
class Coupling(_OpKind):
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

    def metadata(self) -> dict[str, Union[int, float, str]]:
        return {"mlp_layers": len(self.weights), "clamp": float(self.clamp), "activation": self.activation}

    def describe(self) -> dict[str, Any]:
        return {"clamp": self.clamp, "activation": self.activation,
                "widths": [int(self.weights[0].shape[1])] + [int(w.shape[0]) for w in self.weights]}

    @classmethod
    def read(cls, kv: Fields, tensors: Tensors, at: Slot) -> "Coupling":
        prefix, dim = at.prefix, at.dim
        if dim < 2:
            raise FlowFormatError(f"site {at.si} op {at.k}: coupling needs width >= 2, got {dim}")
        n_layers = kv.u32(f"innsteer.{prefix}.mlp_layers")
        if not 1 <= n_layers <= MAX_MLP_LAYERS:
            raise FlowFormatError(f"innsteer.{prefix}.mlp_layers must be in 1..{MAX_MLP_LAYERS}, found {n_layers}")
        clamp = kv.f32(f"innsteer.{prefix}.clamp")
        if not 0.0 < clamp <= 20.0:
            raise FlowFormatError(f"innsteer.{prefix}.clamp must be in (0, 20], found {clamp}")
        act = kv.str(f"innsteer.{prefix}.activation")
        if act not in ACTIVATIONS:
            raise FlowFormatError(f"innsteer.{prefix}.activation: unknown activation '{act[:40]}'")
        d1, d2 = dim // 2, dim - dim // 2
        width, weights, biases = d1, [], []
        for j in range(n_layers):
            out = 2 * d2 if j + 1 == n_layers else tensors.rows(f"{prefix}.w{j}")
            if out > MAX_WIDTH:
                raise FlowFormatError(f"tensor '{prefix}.w{j}': hidden width above {MAX_WIDTH}")
            weights.append(tensors.get(f"{prefix}.w{j}", (out, width)))
            biases.append(tensors.get(f"{prefix}.b{j}", (out,)))
            width = out
        return cls(weights=weights, biases=biases, clamp=clamp, activation=act)

    @classmethod
    def random(cls, width: int, n_embd: int, rng: np.random.Generator) -> Coupling:
        hidden = int(rng.integers(3, 17))
        widths = [width // 2] + [hidden] * int(rng.integers(0, 3)) + [2 * (width - width // 2)]
        return cls(weights=[rng.normal(0, 0.8 / np.sqrt(a), (b, a)).astype(np.float32) for a, b in zip(widths, widths[1:])],
                   biases=[rng.normal(0, 0.3, b).astype(np.float32) for b in widths[1:]],
                   clamp=float(rng.uniform(0.5, 3.0)), activation=str(rng.choice(ACTIVATIONS)))


@dataclass
class Permute(_OpKind):
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

    @classmethod
    def read(cls, kv: Fields, tensors: Tensors, at: Slot) -> "Permute":
        perm = tensors.get(f"{at.prefix}.perm", (at.dim,), integer=True)
        if sorted(perm.tolist()) != list(range(at.dim)):
            raise FlowFormatError(f"tensor '{at.prefix}.perm' is not a permutation of 0..{at.dim - 1}")
        return cls(perm=perm)

    @classmethod
    def random(cls, width: int, n_embd: int, rng: np.random.Generator) -> Permute:
        return cls(perm=rng.permutation(width).astype(np.int32))


@dataclass
class Linear(_OpKind):
    """Invertible dense map y = matrix x + bias; the file stores the inverse as well."""

    matrix: np.ndarray
    matrix_inv: np.ndarray
    bias: np.ndarray
    kind = "linear"
    exact_f32 = ("matrix", "matrix_inv")

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x @ self.matrix.T.astype(np.float64) + self.bias

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (y - self.bias) @ self.matrix_inv.T.astype(np.float64)

    def inverse_delta(self, x_in: np.ndarray, x_out: np.ndarray, d: np.ndarray) -> np.ndarray:
        return d @ self.matrix_inv.T.astype(np.float64)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"matrix": self.matrix, "matrix_inv": self.matrix_inv, "bias": self.bias}

    @classmethod
    def read(cls, kv: Fields, tensors: Tensors, at: Slot) -> "Linear":
        d = at.dim
        return cls(matrix=tensors.get(f"{at.prefix}.matrix", (d, d)),
                   matrix_inv=tensors.get(f"{at.prefix}.matrix_inv", (d, d)),
                   bias=tensors.get(f"{at.prefix}.bias", (d,)))

    @classmethod
    def random(cls, width: int, n_embd: int, rng: np.random.Generator) -> Linear:
        m = np.linalg.qr(rng.normal(size=(width, width)))[0] * rng.uniform(0.5, 2.0, width)
        return cls(matrix=m.astype(np.float32), matrix_inv=np.linalg.inv(m).astype(np.float32),
                   bias=rng.normal(0, 0.5, width).astype(np.float32))


Op = Union[Affine, Subspace, Coupling, Permute, Linear]
OP_KINDS: dict[str, Any] = {cls.kind: cls for cls in (Affine, Subspace, Coupling, Permute, Linear)}


# ---- the subspace's validation, shared with the C loader (native/src/flow_ops.c) -------------


def xorshift_states(n: int) -> np.ndarray:
    """The C loader's probe generator: three xorshift32 streams of n states, shape (3, n)."""
    out = np.empty((3, n), dtype=np.uint32)
    for p in range(3):
        s = (2463534242 + p * 7919) & 0xFFFFFFFF
        for i in range(n):
            s ^= (s << 13) & 0xFFFFFFFF
            s ^= s >> 17
            s ^= (s << 5) & 0xFFFFFFFF
            out[p, i] = s
    return out


def rows_orthonormal(basis: np.ndarray, tol: float) -> bool:
    """The C loader's test, in O(rows * cols): squared row norms within tol of 1, and
    B B^T v within tol * sqrt(rows) of v for three fixed sign vectors v."""
    b = np.asarray(basis, np.float64)
    if not np.all(np.abs((b * b).sum(1) - 1.0) <= tol):
        return False
    v = np.where(xorshift_states(b.shape[0]) & 1, 1.0, -1.0)  # three fixed +-1 vectors
    return bool(np.all(np.abs((v @ b) @ b.T - v) <= tol * np.sqrt(b.shape[0])))


def orthonormalise(basis: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt in float64, row by row: the same loop as the C loader, so both
    readers end with the same basis (project/lift are exact only for orthonormal rows)."""
    q = np.array(basis, dtype=np.float64)
    for k in range(q.shape[0]):
        for j in range(k):
            q[k] -= (q[k] @ q[j]) * q[j]
        q[k] /= np.sqrt(q[k] @ q[k])
    return q.astype(np.float32)

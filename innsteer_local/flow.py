"""Flows: the invertible map phi and latent shift delta for each steered layer.

A flow is an ordered list of op kinds per layer (affine, subspace, coupling, permute, linear),
followed by the shift. The same list is the GGUF layout (docs/flow-format.md), the C structs
(native/src/flow.h) and the torch modules. The NumPy maps here are the reference that the
native library is tested against:

    h' = phi^-1( phi(h) + a * (delta + edit_scale * phi(h)) )
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import FlowFormatError

FORMAT_VERSION = 1
ARCHITECTURE = "innsteer"
METHODS = ("innsteer", "mean-diff", "pca", "affine-ot", "cvec", "random")
ACTIVATIONS = ("relu", "tanh", "silu")

# caps shared with native/src/flow.c
MAX_EMBD = 65536
MAX_SITES = 512
MAX_OPS = 64
MAX_MLP_LAYERS = 4
MAX_WIDTH = 65536
MAX_KV = 4096
MAX_TENSORS = 4096
MAX_FILE_BYTES = 1 << 31


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


GATES = ("off", "density", "target")


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
        (as native/src/flow_math.c does), so rounding scales with the edit, not with |h|."""
        x = np.asarray(h, dtype=np.float64)
        acts = [x]
        for op in self.ops:
            acts.append(acts[-1] @ op.basis.T.astype(np.float64) if isinstance(op, Subspace) else op.forward(acts[-1]))
        z = acts[-1]
        d = self.delta.astype(np.float64) + (self.edit_scale * z if self.edit_scale is not None else 0.0)
        d = np.broadcast_to(d, z.shape).copy()
        if gate != "off":
            if self.gate is None:
                raise ValueError(f"site at layer {self.layer} has no gate parameters")
            w = self.gate.weight(z, self.delta, strength, gate)
            d = d * (strength * w).reshape(z.shape[:-1] + (1,)) if z.ndim > 1 else d * strength * w[0]
        else:
            d = strength * d
        for k in reversed(range(len(self.ops))):
            d = self.ops[k].inverse_delta(acts[k], acts[k + 1], d)
        return x + d

    def _shift(self, z: np.ndarray, strength: float) -> np.ndarray:
        edit = self.delta.astype(np.float64)
        if self.edit_scale is not None:
            edit = edit + self.edit_scale * z
        return z + strength * edit

    @property
    def latent_dim(self) -> int:
        k = self.subspace_index
        return self.ops[k].rank if k >= 0 else int(self.delta.shape[0])  # type: ignore[union-attr]

    def is_linear(self) -> bool:
        return all(isinstance(op, (Affine, Permute, Linear, Subspace)) for op in self.ops)


@dataclass
class ModelInfo:
    """The model a flow was trained for."""

    name: str
    architecture: str
    n_embd: int
    n_layer: int


@dataclass
class Flow:
    """A steering flow for one model, at one or more layers."""

    model: ModelInfo
    sites: list[Site]
    method: str = "innsteer"
    behavior: str = ""
    default_strength: float = 1.0
    name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sites]

    def site(self, layer: int) -> Site:
        for s in self.sites:
            if s.layer == layer:
                return s
        raise KeyError(f"flow has no site at layer {layer} (layers: {self.layers})")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Flow":
        return read_flow(path)

    def save(self, path: str | os.PathLike[str], dtype: str = "f32") -> None:
        from .converters.flow_gguf import write_flow

        write_flow(self, path, dtype=dtype)

    @classmethod
    def linear(cls, vectors: dict[int, np.ndarray], model: ModelInfo, **meta: Any) -> "Flow":
        """A plain steering vector per layer (identity phi): h' = h + a * v."""
        sites = [Site(layer=int(l), ops=[], delta=np.asarray(v, dtype=np.float32)) for l, v in sorted(vectors.items())]
        return cls(model=model, sites=sites, **meta)

    @classmethod
    def random(cls, model: ModelInfo, layers: list[int], rank: int = 64, blocks: int = 4, hidden: int = 128,
               seed: int = 0, delta_scale: float = 1.0, mean: np.ndarray | None = None,
               std: np.ndarray | None = None) -> "Flow":
        """An untrained flow with non-trivial weights in every op kind (tests and benchmarks).
        mean/std: activation statistics for the input normalisation, as a trained flow has."""
        rng = np.random.default_rng(seed)
        n = model.n_embd
        mu = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64)
        sd = np.ones(n) if std is None else np.maximum(np.asarray(std, dtype=np.float64), 1e-3)
        sites = []
        for layer in layers:
            ops: list[Op] = [Affine(scale=(1.0 / sd).astype(np.float32), bias=(-mu / sd).astype(np.float32))]
            q, _ = np.linalg.qr(rng.normal(size=(n, rank)))
            ops.append(Subspace(basis=q.T.astype(np.float32)))
            d1, d2 = rank // 2, rank - rank // 2
            for b in range(blocks):
                ops.append(Coupling(
                    weights=[rng.normal(0, 1 / np.sqrt(d1), (hidden, d1)).astype(np.float32),
                             rng.normal(0, 0.5 / np.sqrt(hidden), (2 * d2, hidden)).astype(np.float32)],
                    biases=[rng.normal(0, 0.1, hidden).astype(np.float32), rng.normal(0, 0.1, 2 * d2).astype(np.float32)],
                    clamp=2.0, activation=ACTIVATIONS[b % len(ACTIVATIONS)]))
                if b % 2 == 0:
                    ops.append(Permute(perm=rng.permutation(rank).astype(np.int32)))
                else:
                    m = np.linalg.qr(rng.normal(size=(rank, rank)))[0] * rng.uniform(0.8, 1.25, rank)
                    ops.append(Linear(matrix=m.astype(np.float32), matrix_inv=np.linalg.inv(m).astype(np.float32),
                                      bias=rng.normal(0, 0.1, rank).astype(np.float32)))
            sites.append(Site(layer=layer, ops=ops, delta=(rng.normal(size=rank) * delta_scale).astype(np.float32)))
        return cls(model=model, sites=sites, method="random", behavior="random", default_strength=1.0,
                   name=f"random-{seed}")

    def describe(self) -> dict[str, Any]:
        """Everything in the file, as plain data (for `inspect --json`)."""
        sites = []
        for s in self.sites:
            ops = []
            for op in s.ops:
                entry: dict[str, Any] = {"kind": op.kind}
                if isinstance(op, Coupling):
                    entry.update(clamp=op.clamp, activation=op.activation,
                                 widths=[int(op.weights[0].shape[1])] + [int(w.shape[0]) for w in op.weights])
                if isinstance(op, Subspace):
                    entry["rank"] = op.rank
                entry["tensors"] = {k: list(v.shape) for k, v in op.tensors().items()}
                entry["parameters"] = int(sum(v.size for v in op.tensors().values()))
                ops.append(entry)
            sites.append({
                "layer": s.layer,
                "ops": ops,
                "latent_dim": s.latent_dim,
                "delta_norm": float(np.linalg.norm(s.delta)),
                "has_edit_scale": s.edit_scale is not None,
                "gate": None if s.gate is None else {"radius": s.gate.radius, "softness": s.gate.softness,
                                                     "target_pos": s.gate.target_pos, "target_neg": s.gate.target_neg},
                "parameters": int(sum(o["parameters"] for o in ops) + s.delta.size +
                                  (s.edit_scale.size if s.edit_scale is not None else 0)),
            })
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "behavior": self.behavior,
            "method": self.method,
            "default_strength": self.default_strength,
            "model": vars(self.model).copy(),
            "layers": self.layers,
            "sites": sites,
            "provenance": self.provenance,
        }


# ---- reading -----------------------------------------------------------------------------


class _Fields:
    """Typed access to GGUF key/values with messages that name the key."""

    def __init__(self, kv: dict[str, Any]):
        self._kv = kv

    def has(self, key: str) -> bool:
        return key in self._kv

    def _get(self, key: str, types: tuple[int, ...], what: str) -> Any:
        v = self._kv.get(key)
        if v is None:
            raise FlowFormatError(f"missing {what} {key}")
        if v.type not in types:
            raise FlowFormatError(f"{key} must be {what}, found GGUF type {v.type}")
        return v

    def u32(self, key: str) -> int:
        from . import gguf_read as g

        v = int(self._get(key, (g.U32, g.I32), "a u32").value)
        if v < 0:
            raise FlowFormatError(f"{key} must be non-negative, found {v}")
        return v

    def f32(self, key: str) -> float:
        from . import gguf_read as g

        return float(self._get(key, (g.F32,), "an f32").value)

    def str(self, key: str) -> str:
        from . import gguf_read as g

        return self._get(key, (g.STRING,), "a string").value

    def u32_array(self, key: str) -> list[int]:
        from . import gguf_read as g

        v = self._get(key, (g.ARRAY,), "an array of u32")
        if v.elem_type not in (g.U32, g.I32):
            raise FlowFormatError(f"{key} must be an array of u32")
        vals = [int(x) for x in v.value]
        if any(x < 0 for x in vals):
            raise FlowFormatError(f"{key} has negative entries")
        return vals


class _Tensors:
    def __init__(self, tensors: dict[str, Any]):
        self._by_name = tensors

    def has(self, name: str) -> bool:
        return name in self._by_name

    def rows(self, name: str) -> int:
        """Leading dimension (numpy order) of a 2-D tensor, 1 for a vector."""
        t = self._by_name.get(name)
        if t is None:
            raise FlowFormatError(f"missing tensor '{name}'")
        return int(t.shape[0]) if len(t.shape) > 1 else 1

    def get(self, name: str, shape: tuple[int, ...], integer: bool = False) -> np.ndarray:
        t = self._by_name.get(name)
        if t is None:
            raise FlowFormatError(f"missing tensor '{name}'")
        have = [d for d in t.shape]
        while len(have) > 1 and have[0] == 1:
            have = have[1:]
        want = [d for d in shape]
        while len(want) > 1 and want[0] == 1:
            want = want[1:]
        if have != want:
            raise FlowFormatError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if integer:
            if t.type != 26:
                raise FlowFormatError(f"tensor '{name}' must be i32")
            return np.array(t.data, dtype=np.int32).reshape(shape)
        if t.type not in (0, 1):
            raise FlowFormatError(f"tensor '{name}' must be f32 or f16")
        arr = np.array(t.data, dtype=np.float32).reshape(shape)
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
            raise FlowFormatError(f"tensor '{name}' element {bad} is not finite")
        return arr


def read_flow(path: str | os.PathLike[str]) -> Flow:
    """Reads and validates a flow file. Raises FlowFormatError with a specific message."""
    from . import gguf_read

    p = Path(path)
    if not p.exists():
        raise FlowFormatError(f"flow file not found: {p}")
    if not p.is_file():
        raise FlowFormatError(f"not a file: {p}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise FlowFormatError(f"{p} is {p.stat().st_size} bytes, cap is {MAX_FILE_BYTES}")
    try:
        g = gguf_read.parse(p.read_bytes())
        kv = _Fields(g.kv)
        arch = kv.str("general.architecture") if kv.has("general.architecture") else ""
        if arch != ARCHITECTURE:
            raise FlowFormatError(f"not an innsteer flow file: general.architecture is '{arch[:40]}', "
                                  f"expected '{ARCHITECTURE}'")
        return _build(kv, _Tensors(g.tensors()))
    except FlowFormatError as e:
        raise FlowFormatError(f"{p}: {e}") from None
    except (ValueError, OverflowError, MemoryError, IndexError, KeyError, TypeError) as e:
        raise FlowFormatError(f"{p} is corrupt: {type(e).__name__}: {e}") from None


def _build(kv: _Fields, tensors: _Tensors) -> Flow:
    arch = kv.str("general.architecture") if kv.has("general.architecture") else ""
    if arch != ARCHITECTURE:
        raise FlowFormatError(f"not an innsteer flow file: general.architecture is '{arch}', expected '{ARCHITECTURE}'")
    version = kv.u32("innsteer.format_version")
    if version != FORMAT_VERSION:
        raise FlowFormatError(f"flow format version {version}, this reader supports version {FORMAT_VERSION}")
    n_embd = kv.u32("innsteer.model.n_embd")
    n_layer = kv.u32("innsteer.model.n_layer")
    if not 1 <= n_embd <= MAX_EMBD:
        raise FlowFormatError(f"innsteer.model.n_embd {n_embd} outside 1..{MAX_EMBD}")
    if not 1 <= n_layer <= 100000:
        raise FlowFormatError(f"innsteer.model.n_layer {n_layer} outside 1..100000")
    strength = kv.f32("innsteer.default_strength")
    if not math.isfinite(strength):
        raise FlowFormatError("innsteer.default_strength is not finite")
    model = ModelInfo(
        name=kv.str("innsteer.model.name") if kv.has("innsteer.model.name") else "",
        architecture=kv.str("innsteer.model.architecture") if kv.has("innsteer.model.architecture") else "",
        n_embd=n_embd,
        n_layer=n_layer,
    )
    layers = kv.u32_array("innsteer.layers")
    if not 1 <= len(layers) <= MAX_SITES:
        raise FlowFormatError(f"innsteer.layers has {len(layers)} entries, expected 1..{MAX_SITES}")
    sites = []
    for si, layer in enumerate(layers):
        if layer >= n_layer:
            raise FlowFormatError(f"innsteer.layers[{si}] = {layer} is outside the model's 0..{n_layer - 1}")
        if layer in layers[:si]:
            raise FlowFormatError(f"layer {layer} appears twice in innsteer.layers")
        sites.append(_read_site(kv, tensors, si, layer, n_embd))
    provenance: dict[str, Any] = {}
    if kv.has("innsteer.provenance"):
        try:
            provenance = json.loads(kv.str("innsteer.provenance"))
        except json.JSONDecodeError as e:
            raise FlowFormatError(f"innsteer.provenance is not valid JSON: {e}") from None
        if not isinstance(provenance, dict):
            raise FlowFormatError("innsteer.provenance must be a JSON object")
    return Flow(
        model=model,
        sites=sites,
        method=kv.str("innsteer.method") if kv.has("innsteer.method") else "",
        behavior=kv.str("innsteer.behavior") if kv.has("innsteer.behavior") else "",
        default_strength=strength,
        name=kv.str("general.name") if kv.has("general.name") else "",
        provenance=provenance,
    )


def _read_site(kv: _Fields, tensors: _Tensors, si: int, layer: int, n_embd: int) -> Site:
    kinds = [k for k in kv.str(f"innsteer.site.{si}.ops").split(" ") if k]
    if len(kinds) > MAX_OPS:
        raise FlowFormatError(f"innsteer.site.{si}.ops has {len(kinds)} ops, cap is {MAX_OPS}")
    dim = n_embd
    ops: list[Op] = []
    for k, kind in enumerate(kinds):
        prefix = f"site.{si}.op.{k}"
        if kind == "affine":
            scale = tensors.get(f"{prefix}.scale", (dim,))
            mag = np.abs(scale)
            if not np.all((mag >= np.float32(1e-6)) & (mag <= np.float32(1e6))):
                i = int(np.flatnonzero(~((mag >= np.float32(1e-6)) & (mag <= np.float32(1e6))))[0])
                raise FlowFormatError(f"site {si} op {k} (affine): scale[{i}] = {scale[i]} is outside 1e-6..1e6 in magnitude")
            ops.append(Affine(scale=scale, bias=tensors.get(f"{prefix}.bias", (dim,))))
        elif kind == "subspace":
            if any(isinstance(o, Subspace) for o in ops):
                raise FlowFormatError(f"site {si}: more than one subspace op")
            rank = tensors.rows(f"{prefix}.basis")
            if not 1 <= rank <= n_embd:
                raise FlowFormatError(f"site {si} op {k}: subspace rank {rank} outside 1..{n_embd}")
            basis = tensors.get(f"{prefix}.basis", (rank, n_embd))
            gram = basis.astype(np.float64) @ basis.T.astype(np.float64)
            if np.max(np.abs(gram - np.eye(rank))) > 1e-2:
                raise FlowFormatError(f"site {si} op {k}: subspace basis rows are not orthonormal")
            ops.append(Subspace(basis=orthonormalise(basis)))
            dim = rank
        elif kind == "coupling":
            if dim < 2:
                raise FlowFormatError(f"site {si} op {k}: coupling needs width >= 2, got {dim}")
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
            ops.append(Coupling(weights=weights, biases=biases, clamp=clamp, activation=act))
        elif kind == "permute":
            perm = tensors.get(f"{prefix}.perm", (dim,), integer=True)
            if sorted(perm.tolist()) != list(range(dim)):
                raise FlowFormatError(f"tensor '{prefix}.perm' is not a permutation of 0..{dim - 1}")
            ops.append(Permute(perm=perm))
        elif kind == "linear":
            ops.append(Linear(matrix=tensors.get(f"{prefix}.matrix", (dim, dim)),
                              matrix_inv=tensors.get(f"{prefix}.matrix_inv", (dim, dim)),
                              bias=tensors.get(f"{prefix}.bias", (dim,))))
        else:
            raise FlowFormatError(f"site {si} op {k}: unknown op kind '{kind[:40]}'")
    delta = tensors.get(f"site.{si}.delta", (dim,))
    edit_scale = tensors.get(f"site.{si}.edit_scale", (dim,)) if tensors.has(f"site.{si}.edit_scale") else None
    gate = None
    if tensors.has(f"site.{si}.gate_center"):
        vals = {f: kv.f32(f"innsteer.site.{si}.gate.{f}") for f in ("radius", "softness", "target_pos", "target_neg")}
        if not all(math.isfinite(v) for v in vals.values()):
            raise FlowFormatError(f"site {si}: gate parameters must be finite")
        if not (vals["radius"] > 0 and vals["softness"] > 0):
            raise FlowFormatError(f"site {si}: gate radius and softness must be positive")
        gate = Gate(center=tensors.get(f"site.{si}.gate_center", (dim,)), **vals)
    site = Site(layer=layer, ops=ops, delta=delta, edit_scale=edit_scale, gate=gate)
    _check_roundtrip(site, si, n_embd)
    return site


def orthonormalise(basis: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt in float64, row by row: the same loop as native/src/flow.c, so both
    readers end with the same basis (project/lift are exact only for orthonormal rows)."""
    q = np.array(basis, dtype=np.float64)
    for k in range(q.shape[0]):
        for j in range(k):
            q[k] -= (q[k] @ q[j]) * q[j]
        q[k] /= np.sqrt(q[k] @ q[k])
    return q.astype(np.float32)


def _probe_rows(n: int) -> np.ndarray:
    """The native loader's probe rows (xorshift32), so both readers test the same inputs."""
    rows = np.empty((3, n))
    for p in range(3):
        s = (2463534242 + p * 7919) & 0xFFFFFFFF
        for i in range(n):
            s ^= (s << 13) & 0xFFFFFFFF
            s ^= s >> 17
            s ^= (s << 5) & 0xFFFFFFFF
            rows[p, i] = ((s & 0xFFFF) / 65535.0 - 0.5) * 4.0
    return rows.astype(np.float32).astype(np.float64)


def _check_roundtrip(site: Site, si: int, n_embd: int) -> None:
    """phi^-1(phi(x)) must return x on fixed probe rows (same rows and bound as the C loader; the
    C loader computes in float32, so a flow right at the bound may pass one and fail the other)."""
    x = _probe_rows(n_embd)
    with np.errstate(all="ignore"):
        back = site.inverse(site.forward(x))
    err = np.linalg.norm(back - x, axis=1)
    if not np.all(np.isfinite(back)) or np.any(err > 1e-3 * np.linalg.norm(x, axis=1) + 1e-6):
        raise FlowFormatError(f"site {si} (layer {site.layer}): phi is not invertible on a probe row")

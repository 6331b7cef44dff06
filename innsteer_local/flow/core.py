"""A steering flow for one model: its sites (one per steered layer) and what it was made from."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..choices import FORMAT_VERSION
from .site import Site
from ..errors import InvalidArgument, UnknownFlow


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
        raise UnknownFlow(f"flow has no site at layer {layer} (layers: {self.layers})")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Flow":
        """Reads and validates a flow file (FlowFormatError with a specific message)."""
        from .format import read_flow

        return read_flow(path)

    def save(self, path: str | os.PathLike[str], dtype: str = "f32") -> None:
        """Writes the flow atomically; dtype "f16" halves the size (bases and matrices stay f32)."""
        from .format import write_flow

        write_flow(self, path, dtype=dtype)

    def rescale(self, factor: float) -> None:
        """Makes strength `factor` the new strength 1: every site's shift (and edit scale) is
        multiplied by it (phi is unchanged, so the map at each strength is exactly the old map at
        factor times that strength); the default strength is divided by it."""
        if not (math.isfinite(factor) and factor > 0):
            raise InvalidArgument(f"rescale needs a finite positive factor, got {factor!r}")
        for site in self.sites:
            site.delta = (site.delta.astype(np.float64) * factor).astype(np.float32)
            if site.edit_scale is not None:
                site.edit_scale = (site.edit_scale.astype(np.float64) * factor).astype(np.float32)
        self.default_strength = float(self.default_strength / factor)

    @classmethod
    def linear(cls, vectors: dict[int, np.ndarray], model: ModelInfo, **meta: Any) -> "Flow":
        """A plain steering vector per layer (identity phi): h' = h + a * v."""
        sites = [Site(layer=int(l), ops=[], delta=np.asarray(v, dtype=np.float32)) for l, v in sorted(vectors.items())]
        return cls(model=model, sites=sites, **meta)

    def describe(self) -> dict[str, Any]:
        """Everything in the file, as plain data (for `inspect --json`)."""
        sites = []
        for s in self.sites:
            ops = []
            for op in s.ops:
                entry: dict[str, Any] = {"kind": op.kind, **op.describe()}
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

"""Flows in NumPy: the op kinds, a site (the flow at one layer), the Flow container and the file
format. NumPy only: no torch, no llama.cpp.

    flow = Flow.load("honesty.gguf")          # strict reader (FlowFormatError on bad files)
    flow.site(15).steer(rows, strength=2.0)   # h' = phi^-1(phi(h) + a * delta), float64
    flow.save("copy.gguf")
"""

from .core import Flow, ModelInfo
from .format import read_flow, write_flow
from .ops import OP_KINDS, Affine, Coupling, Linear, Op, Permute, Subspace
from .random import random_flow
from .site import Gate, Site

__all__ = ["Flow", "ModelInfo", "Site", "Gate", "Op", "OP_KINDS", "Affine", "Subspace", "Coupling", "Permute",
           "Linear", "read_flow", "write_flow", "random_flow"]

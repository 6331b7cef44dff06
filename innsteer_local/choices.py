"""The fixed vocabularies and limits every part of innsteer-local reads: method, gate, path and
activation names, and the caps on untrusted flow files (native/src/limits.h holds the same caps
for the C loader; tests/unit/test_choices.py keeps the two equal)."""

from __future__ import annotations

from .errors import InvalidArgument

# training methods (`train --method`); "innsteer" is the default
TRAIN_METHODS = ("innsteer", "vector", "mean-diff", "pca", "affine-ot")
# what a flow file's innsteer.method may say besides those: imported control vectors, test flows
# what an innsteer flow learns from (`train --objective`): what the frozen model says, or activation
# geometry alone; "model" is the default
OBJECTIVES = ("model", "geometry")
# torch devices for training (`train --device`); "auto" picks cuda, then mps, then cpu
DEVICES = ("auto", "cpu", "cuda", "mps")
# of the layers above the steered one while training through the model (`train --precision`)
PRECISIONS = ("auto", "f32", "bf16")
# token positions whose activations carry a behaviour (`train --positions`): the reply's tokens,
# the final token, or every token
POSITIONS = ("completion", "last", "all")

# runtime gates (docs/flow-format.md): off, damp rows off the training support, move rows only
# as far as the positive class
GATES = ("off", "density", "target")
# where the eval callback computes a flow (native/include/innsteer.h, innsteer_path)
PATHS = ("auto", "host", "device", "cpu-graph")
# coupling MLP activations, in the order of the C enum act_kind
ACTIVATIONS = ("relu", "tanh", "silu")

FORMAT_VERSION = 1
ARCHITECTURE = "innsteer"  # general.architecture of a flow file

# caps on flow files, the same names and numbers as native/src/limits.h (tests/unit/test_choices.py)
MAX_EMBD = 65536
MAX_LAYERS = 100000
MAX_SITES = 512
MAX_OPS = 64
MAX_MLP_LAYERS = 4
MAX_WIDTH = 65536
MAX_RANK = 256  # rows of a subspace basis
MAX_FILE_BYTES = 1 << 31
MAX_KV = 4096
MAX_TENSORS = 4096
MAX_STRING = 65536
MAX_ARRAY = 1 << 20
MAX_NESTING = 2
MAX_META_STRING = 4096  # general.name, innsteer.behavior, .method, .model.name, .model.architecture


def check_gate(gate: str) -> str:
    if gate not in GATES:
        raise InvalidArgument(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    return gate

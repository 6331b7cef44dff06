"""A flow trained in PyTorch (train/inn.py's InnFlow) as a checkpoint file, and back to a flow GGUF.

    save_checkpoint(flow_t, "phi.pt", layer=15, model=info)   # torch tensors and plain values only
    flow = read_checkpoint("phi.pt")                            # -> Flow, then flow.save("phi.gguf")

The checkpoint is read with torch.load(weights_only=True): tensors, numbers, strings, lists and
dicts only, never arbitrary pickled objects (a checkpoint is untrusted data like a flow file).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FlowFormatError
from ..flow import Flow, ModelInfo

KIND = "innsteer-torch-flow"


def save_checkpoint(flow_t: Any, path: str | os.PathLike[str], layer: int, model: ModelInfo) -> None:
    """Writes an InnFlow's state with what rebuilding it needs (the couplings' clamp and activation,
    the layer and the model it steers)."""
    import torch

    c = flow_t.couplings
    torch.save({"kind": KIND, "state_dict": flow_t.state_dict(), "layer": int(layer),
                "config": {"clamp": float(c.clamp), "activation": c.activation,
                           "hidden": int(c.nets[0][0].out_features) if len(c.nets) else 1},
                "model": {"name": model.name, "architecture": model.architecture, "n_embd": model.n_embd,
                          "n_layer": model.n_layer}}, str(path))


def read_checkpoint(path: str | os.PathLike[str]) -> Flow:
    """The flow a checkpoint holds (FlowFormatError for anything else)."""
    import numpy as np
    import torch

    from ..train.inn import InnConfig, InnFlow

    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a foreign or corrupt file)
        raise FlowFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ck, dict) or ck.get("kind") != KIND:
        raise FlowFormatError(f"{path}: not an innsteer flow checkpoint (expected a dict with kind '{KIND}', "
                              "as convert.torch_flow.save_checkpoint writes)")
    try:
        state, cfg, m = ck["state_dict"], ck["config"], ck["model"]
        model = ModelInfo(str(m["name"]), str(m["architecture"]), int(m["n_embd"]), int(m["n_layer"]))
        blocks = len({k.split(".")[2] for k in state if k.startswith("couplings.nets.")})
        basis = state.get("inputs.1.basis", state.get("basis"))  # the second: written before the input ops were modules
        flow_t = InnFlow(np.zeros(model.n_embd), np.ones(model.n_embd), np.zeros(model.n_embd),
                         InnConfig(rank=0 if basis is None else int(basis.shape[0]), blocks=blocks,
                                   hidden=int(cfg["hidden"]), clamp=float(cfg["clamp"]),
                                   activation=str(cfg["activation"])),
                         basis=None if basis is None else basis.numpy())
        flow_t.load_state_dict(state, strict=True)
        site = flow_t.site(int(ck["layer"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise FlowFormatError(f"{path}: the checkpoint does not describe an InnFlow ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None
    return Flow(model=model, sites=[site], method="innsteer", provenance={"converted_from": os.fspath(path)})

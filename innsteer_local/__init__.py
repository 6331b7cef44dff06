"""innsteer-local: nonlinear activation steering (INNSteer) for llama.cpp.

    from innsteer_local import SteeredLlama
    llm = SteeredLlama(model_path, verbose=False)
    llm.add_flow("honesty.gguf", strength=4.0)
    llm.create_chat_completion(messages=[{"role": "user", "content": "..."}])

    from innsteer_local import Engine, Sampling, Steer     # many sequences, each its own steering
    engine = Engine(llm, n_parallel=8)

The package follows the data path: train/ (contrastive data -> activations -> a flow), flow/
(the flow in NumPy and its GGUF file), runtime/ (llama.cpp, the native callback, SteeredLlama),
eval/ (steered generations scored against linear steering), convert/ (llama.cpp control
vectors, ONNX) and apps/ (the command line, chat, server, bench, doctor). Chatting needs only
llama-cpp-python, gguf and numpy; training needs torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .errors import (
    FlowFormatError,
    FlowMismatchError,
    InnsteerError,
    ModelError,
    SteeringError,
)
from .flow import Flow, ModelInfo, Site

__version__ = "0.1.0"

__all__ = [
    "Flow", "ModelInfo", "Site", "SteeredLlama", "AttachedFlow", "Engine", "Job", "Sampling", "Steer",
    "InnsteerError", "FlowFormatError", "FlowMismatchError", "ModelError", "SteeringError",
]


def __getattr__(name: str):
    # importing llama_cpp loads the native engine: only do it when the wrapper is used
    if name in ("SteeredLlama", "AttachedFlow"):
        from .runtime import steered

        return getattr(steered, name)
    if name in ("Engine", "Job", "Sampling", "Steer"):
        from .runtime import engine

        return getattr(engine, name)
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)


# Module paths of earlier releases -> where the code lives now. They keep working, with a warning.
_MOVED = {
    "steered": "runtime.steered", "native": "runtime.native", "models": "runtime.registry",
    "cbuild": "runtime.cbuild", "collect": "train.collect", "data": "train.data", "behaviors": "train.behaviors",
    "baselines": "train.linear", "inn": "train.inn", "training": "train.pipeline", "evaluate": "eval.runner",
    "eval_tasks": "eval.tasks", "eval_suites": "eval.suites", "scorers": "eval.scorers", "metrics": "eval.metrics",
    "chat": "apps.chat", "server": "apps.server", "bench": "apps.bench", "cli": "apps.cli",
    "gguf_read": "flow.gguf",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        prefix = __name__ + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name[len(__name__) + 1:]
        new = f"{__name__}.{_MOVED[old]}"
        warnings.warn(f"{spec.name} moved to {new}", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModules())

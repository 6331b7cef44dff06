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
    raise AttributeError(f"module 'innsteer_local' has no attribute {name!r}")

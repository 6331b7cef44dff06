"""innsteer-local: nonlinear activation steering (INNSteer) for llama.cpp.

    from innsteer_local import SteeredLlama
    llm = SteeredLlama(model_path, verbose=False)
    llm.add_flow("honesty.gguf", strength=4.0)
    llm.create_chat_completion(messages=[{"role": "user", "content": "..."}])

Chatting needs only llama-cpp-python, gguf and numpy; training flows needs torch.
"""

from .errors import FlowFormatError, FlowMismatchError, InnsteerError, ModelError, SteeringError
from .flow import Flow, ModelInfo, Site

__version__ = "0.1.0"

__all__ = [
    "Flow", "ModelInfo", "Site", "SteeredLlama", "AttachedFlow",
    "InnsteerError", "FlowFormatError", "FlowMismatchError", "ModelError", "SteeringError",
]


def __getattr__(name: str):
    # importing llama_cpp loads the native engine: only do it when the wrapper is used
    if name in ("SteeredLlama", "AttachedFlow"):
        from . import steered

        return getattr(steered, name)
    raise AttributeError(name)

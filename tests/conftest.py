"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF from the registry and the real llama.cpp.

tests/unit needs no model (its ModelInfo comes from the GGUF header, read without llama.cpp),
tests/native builds and runs C programs, tests/integration runs the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from innsteer_local import ModelInfo
from innsteer_local.runtime import registry


@pytest.fixture(scope="session")
def model_path() -> Path:
    path, _ = registry.resolve_model("smollm2-135m")
    return path


@pytest.fixture(scope="session")
def model_info() -> ModelInfo:
    """SmolLM2-135M-Instruct's shape and name as SteeredLlama reports them (from the registry
    entry; tests/integration/test_session.py checks the two agree)."""
    e = registry.entry("smollm2-135m")
    return ModelInfo(name=e.gguf_name, architecture=e.architecture, n_embd=e.n_embd, n_layer=e.n_layer)


@pytest.fixture()
def steered(model_path):
    """A fresh steered model with every logit kept, closed after the test."""
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=512, n_batch=256, logits_all=True, seed=0, verbose=False)
    yield llm
    llm.close()


def prompt_logits(llm, tokens) -> np.ndarray:
    """Logits of every position of a fresh evaluation of tokens."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture()
def logits_of():
    return prompt_logits

"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF from the registry and the real llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from innsteer_local import models


@pytest.fixture(scope="session")
def model_path() -> Path:
    path, _ = models.resolve_model("smollm2-135m")
    return path


@pytest.fixture(scope="session")
def model_info(model_path):
    from innsteer_local.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=256, verbose=False)
    info = llm.model_info
    llm.close()
    return info


@pytest.fixture()
def steered(model_path):
    """A fresh steered model with every logit kept, closed after the test."""
    from innsteer_local.steered import SteeredLlama

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

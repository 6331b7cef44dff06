"""A flow without gate parameters refuses gated steering through SteeredLlama."""

from __future__ import annotations

import pytest

from innsteer_local import ModelInfo
from innsteer_local.flow import random_flow

INFO = ModelInfo("synthetic", "llama", 48, 8)


def test_gate_needs_parameters(steered, model_info, tmp_path):
    p = tmp_path / "plain.gguf"
    random_flow(model_info, [4], rank=8, blocks=1, hidden=8).save(p)
    with pytest.raises(ValueError, match="no gate parameters"):
        steered.add_flow(p, gate="density")
    assert steered.flows == []
    h = steered.add_flow(p)
    with pytest.raises(ValueError, match="no gate parameters"):
        steered.set_gate("target", h)

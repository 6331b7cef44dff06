"""What a training run returns (TrainOutcome), the same for both trainers (through/, activations/)
and for selection (choose.py); what it reports while it runs is innsteer_local.progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..flow import Flow
from .data import Dataset

if TYPE_CHECKING:
    from .activations.collect import Activations


@dataclass
class Candidate:
    """A flow selection (choose.py) may ship, and where in training it comes from: phase "linear"
    (the end of its shift-alone phase), "full" (the end of training), "" for a one-phase trainer;
    step: its training step."""

    flow: Flow
    phase: str = ""
    step: int = 0


@dataclass
class TrainOutcome:
    flow: Flow  # at the common unit (unit.py) as a trainer returns it; calibrated after selection
    layer: int
    data: Dataset
    activations: Optional[Activations] = None
    sweep: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    latent: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)  # to choose from (none: just `flow`)
    held_out: tuple[list[str], list[str]] = ([], [])  # prompts for selection: behaviour, neutral

"""What a training run reports while it runs (Progress) and what it returns (TrainOutcome), the
same for both trainers (through/, activations/) and for selection (choose.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..flow import Flow
from .data import Dataset

if TYPE_CHECKING:
    from .activations.collect import Activations


class Progress:
    """What training reports; the CLI draws bars from it."""

    def phase(self, label: str, total: int) -> None: ...
    def update(self, done: int, info: Optional[dict[str, float]] = None) -> None: ...
    def message(self, text: str) -> None: ...


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
    candidates: list[tuple[int, Flow]] = field(default_factory=list)  # (training step, flow) to choose from
    held_out: tuple[list[str], list[str]] = ([], [])  # prompts for selection: behaviour, neutral

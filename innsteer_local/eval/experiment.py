"""What an evaluation runs: experiments (a task, the flows compared, the strengths) and the order
of their settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..runtime.flowspec import FlowSpec
from .tasks import Task

NONE = "none"  # the unsteered model's label


@dataclass
class Experiment:
    """One task run over a set of flows and strengths."""

    name: str
    task: Task
    flows: list[FlowSpec]
    strengths: list[float]
    limit: Optional[int] = None
    relative: bool = False  # strengths are multiples of each flow's own default strength


def label_of(flow: Optional[FlowSpec]) -> str:
    return NONE if flow is None else flow.name


def sweep_cells(flows: Sequence[FlowSpec], strengths: Sequence[float]) -> list[tuple[Optional[FlowSpec], float]]:
    """Unsteered once, then each flow outward from 0 (so pruning can stop a direction)."""
    cells: list[tuple[Optional[FlowSpec], float]] = [(None, 0.0)]
    nonzero = sorted({float(s) for s in strengths if s != 0}, key=lambda s: (abs(s), s))
    for f in flows:
        cells += [(f, s) for s in nonzero]
    return cells

"""What an evaluation runs: experiments (a task, the flows compared, the strengths) and the order
of their settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..runtime.flowspec import FlowSpec
from .tasks import Task

NONE = "none"  # the unsteered model's label
PROMPT = "prompt"  # the unsteered model asked for the behaviour (the task's instruction)


@dataclass(frozen=True)
class Arm:
    """What a cell's answers get besides a strength: a flow (or none) and, for the prompting
    baseline and steering on top of it, the experiment's instruction."""

    flow: Optional[FlowSpec] = None
    prompted: bool = False

    @property
    def name(self) -> str:
        if self.flow is None:
            return PROMPT if self.prompted else NONE
        return f"{PROMPT}+{self.flow.name}" if self.prompted else self.flow.name


@dataclass
class Experiment:
    """One task run over a set of flows and strengths; with an instruction, also the prompting
    baseline (the instruction alone) and every flow on top of it."""

    name: str
    task: Task
    flows: list[FlowSpec]
    strengths: list[float]
    limit: Optional[int] = None
    relative: bool = False  # strengths are multiples of each flow's own default strength
    instruction: str = ""  # a system message for chat models, a line before the prompt for base models
    prompted_strengths: Optional[list[float]] = None  # of the flows on the prompt (default: strengths)

    def arms(self) -> list[Arm]:
        """Every arm in report order: unsteered, prompted, each flow, each flow on the prompt."""
        arms = [Arm()] + ([Arm(prompted=True)] if self.instruction else []) + [Arm(f) for f in self.flows]
        return arms + ([Arm(f, prompted=True) for f in self.flows] if self.instruction else [])


def sweep_cells(flows: Sequence[FlowSpec], strengths: Sequence[float], prompted: bool = False,
                prompted_strengths: Optional[Sequence[float]] = None) -> list[tuple[Arm, float]]:
    """Unsteered once (and prompted once), then each flow outward from 0 (so pruning can stop a
    direction), then each flow on the prompt the same way (at prompted_strengths, if given)."""
    cells: list[tuple[Arm, float]] = [(Arm(), 0.0)] + ([(Arm(prompted=True), 0.0)] if prompted else [])

    def outward(values: Sequence[float]) -> list[float]:
        return sorted({float(s) for s in values if s != 0}, key=lambda s: (abs(s), s))

    for f in flows:
        cells += [(Arm(f), s) for s in outward(strengths)]
    if prompted:
        for f in flows:
            cells += [(Arm(f, True), s) for s in outward(prompted_strengths or strengths)]
    return cells


def experiment_cells(exp: Experiment) -> list[tuple[Arm, float]]:
    return sweep_cells(exp.flows, exp.strengths, bool(exp.instruction), exp.prompted_strengths)

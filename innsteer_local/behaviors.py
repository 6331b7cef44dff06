"""Built-in behaviours: contrastive prompt templates shipped as JSON in behaviors/."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InnsteerError

BEHAVIOR_DIR = Path(__file__).resolve().parent / "behaviors"


@dataclass
class Pair:
    """The same reply after a positive and a negative instruction (or two contrasting replies)."""

    positive_prompt: str
    negative_prompt: str
    positive_reply: str
    negative_reply: str


@dataclass
class Behavior:
    name: str
    description: str
    pairs: list[Pair] = field(default_factory=list)
    neutral: list[tuple[str, str]] = field(default_factory=list)  # (prompt, reply): must not change


def names() -> list[str]:
    return sorted(p.stem for p in BEHAVIOR_DIR.glob("*.json"))


def load(name: str) -> Behavior:
    path = BEHAVIOR_DIR / f"{name}.json"
    if not path.exists():
        raise InnsteerError(f"unknown behaviour '{name}'; built-in behaviours: {', '.join(names())}")
    spec: dict[str, Any] = json.loads(path.read_text())
    pairs = []
    for pos, neg in zip(spec["positive_personas"], spec["negative_personas"]):
        for reply in spec["continuations"]:
            pairs.append(Pair(spec["template"].format(persona=pos), spec["template"].format(persona=neg), reply, reply))
    neutral = [(n["prompt"], n["reply"]) for n in spec.get("neutral", [])]
    return Behavior(name=spec["name"], description=spec["description"], pairs=pairs, neutral=neutral)

"""Model ids that carry steering, for chat apps that only let a user pick a model.

    BASE                     the model, unsteered                  smollm2-135m
    BASE+FLOW                a loaded flow at its default strength  smollm2-135m+honesty
    BASE+FLOW@STRENGTH       at STRENGTH (negative steers away)     smollm2-135m+honesty@2
    BASE+PRESET              a `serve --preset NAME=FLOW:STRENGTH`  smollm2-135m+calm
    BASE+A@1+B@-0.5          several flows at once

FLOW is a name the server loaded (`serve --flow`, `POST /v1/steering`), with its default gate.
`/v1/models` lists BASE, BASE+FLOW for every loaded flow and BASE+PRESET for every preset; any
other strength is reachable by typing it. A request's `steering` field, when present, wins over
what its model id says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..runtime.flowspec import parse_flow_spec
from ..errors import InvalidArgument


@dataclass(frozen=True)
class Preset:
    """A named steering setting served as its own model id."""

    name: str
    flow: str
    strength: float
    gate: Optional[str] = None


def parse_preset(text: str) -> Preset:
    """`NAME=FLOW:STRENGTH[@GATE]` (or `FLOW:STRENGTH`, listed as FLOW@STRENGTH); ValueError says why."""
    spec = parse_flow_spec(text)
    if spec.strength is None:
        raise InvalidArgument(f"--preset '{text}' needs a strength: NAME=FLOW:STRENGTH, e.g. calm=honesty:2")
    named = text.strip().startswith(spec.name + "=")
    name = spec.name if named else f"{spec.path}@{spec.strength:g}"
    if "+" in name:
        raise InvalidArgument(f"--preset '{text}': a preset name cannot contain '+' (it separates flows in a model id)")
    return Preset(name=name, flow=spec.path, strength=spec.strength, gate=spec.gate)


class UnknownModel(ValueError):
    """The id names no model this server has (HTTP 404)."""


@dataclass(frozen=True)
class Term:
    """One flow of a model id: strength None = the flow's default, gate None = its default."""

    flow: str
    strength: Optional[float] = None
    gate: Optional[str] = None


def parse_model_id(model: str, base: str, flows: set[str], presets: dict[str, Preset]) -> list[Term]:
    """The steering a model id asks for ([] = unsteered); UnknownModel when it is not one of ours."""
    if model == base:
        return []
    prefix = base + "+"
    if not model.startswith(prefix) or len(model) == len(prefix):
        raise UnknownModel(f"The model '{model[:120]}' does not exist on this server; it serves '{base}' and "
                           f"'{base}+FLOW[@STRENGTH]' (GET /v1/models lists them)")
    terms: list[Term] = []
    for part in model[len(prefix):].split("+"):
        if part in presets:
            p = presets[part]
            terms.append(Term(p.flow, p.strength, p.gate))
            continue
        name, at, value = part.partition("@")
        if name not in flows:
            known = sorted(flows | set(presets))
            raise UnknownModel(f"The model '{model[:120]}' does not exist: no loaded flow or preset named "
                               f"'{name[:64]}' (loaded: {', '.join(known) or 'none'})")
        strength = None
        if at:
            try:
                strength = float(value)
            except ValueError:
                strength = math.nan
            if not math.isfinite(strength):
                raise UnknownModel(f"The model '{model[:120]}' does not exist: '@{value[:32]}' is not a finite "
                                   f"strength (write {base}+{name}@2 or {base}+{name}@-1.5)")
        terms.append(Term(name, strength))
    if len({t.flow for t in terms}) != len(terms):
        raise UnknownModel(f"The model '{model[:120]}' does not exist: it names a flow twice")
    return terms


def listed_ids(base: str, flows: list[str], presets: dict[str, Preset]) -> list[str]:
    """What `/v1/models` shows: the base model, then one id per loaded flow and per preset."""
    return [base] + [f"{base}+{f}" for f in flows] + [f"{base}+{p}" for p in presets]

"""The one `--flow` grammar of every command (chat, generate, serve, eval):

    [NAME=]FILE[:STRENGTH][@GATE]

    honesty.gguf                  the flow at its own default strength, no gate
    honesty.gguf:2.5              strength 2.5 (negative steers the other way)
    refusal.gguf@target           the runtime gate `target` (off | density | target)
    calm=flows/refusal.gguf:-1@density
                                  named `calm` (the server's flow name, eval's label)

FILE is a path or the name of a flow shipped for the model. A path whose own text ends in
`:<number>` or `@<gate>` can be given as `./path` plus an explicit suffix.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..choices import GATES
from ..errors import InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_WORD = re.compile(r"^[A-Za-z_-]+$")


@dataclass(frozen=True)
class FlowSpec:
    """One --flow value. strength/gate None: the command's default (the flow's default strength,
    the command's --gate)."""

    path: str
    name: str
    strength: Optional[float] = None
    gate: Optional[str] = None


def parse_flow_spec(spec: str) -> FlowSpec:
    """Parses [NAME=]FILE[:STRENGTH][@GATE]; ValueError with the reason on a malformed value."""
    text = spec.strip()
    if not text:
        raise InvalidArgument("--flow needs a file or a shipped flow name")
    name = ""
    head, eq, tail = text.partition("=")
    if eq and _NAME.match(head):
        name, text = head, tail
    gate = None
    body, at, word = text.rpartition("@")
    if at and body and _WORD.match(word):
        if word not in GATES:
            raise InvalidArgument(f"--flow '{spec}': unknown gate '{word}'; gates: {', '.join(GATES)}")
        gate, text = word, body
    strength = None
    body, colon, value = text.rpartition(":")
    if colon and body:
        try:
            strength = float(value)
        except ValueError:
            if value in GATES and gate is None:  # the older eval form LABEL=FILE:GATE
                warnings.warn(f"--flow '{spec}': FILE:{value} is the old gate syntax; write FILE@{value}",
                              FutureWarning, stacklevel=2)
                gate, text = value, body
        else:
            if not math.isfinite(strength):
                raise InvalidArgument(f"--flow '{spec}': strength {value} is not a finite number")
            text = body
    if not text:
        raise InvalidArgument(f"--flow '{spec}' names no file")
    return FlowSpec(path=text, name=name or Path(text).stem, strength=strength, gate=gate)


def format_flow_spec(spec: FlowSpec) -> str:
    """The inverse of parse_flow_spec (for messages and reproducible commands)."""
    out = spec.path if spec.name == Path(spec.path).stem else f"{spec.name}={spec.path}"
    if spec.strength is not None:
        out += f":{spec.strength:g}"
    if spec.gate is not None:
        out += f"@{spec.gate}"
    return out

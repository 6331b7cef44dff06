"""One set of caps for both flow readers: innsteer_local/choices.py and native/src/limits.h name
the same caps with the same values."""

from __future__ import annotations

import re
from pathlib import Path

from innsteer_local import choices

LIMITS_H = Path(__file__).resolve().parents[2] / "native" / "src" / "limits.h"


def c_limits() -> dict[str, int]:
    out = {}
    for name, expr in re.findall(r"^#define (MAX_\w+) (.+?)(?:\s*/\*.*)?$", LIMITS_H.read_text(), flags=re.M):
        expr = expr.replace("(size_t)", "")
        assert re.fullmatch(r"[\d\s()<]+", expr), f"cannot read {name} = {expr}"
        out[name] = int(eval(expr))  # digits, parentheses and shifts only (checked above)
    return out


def test_python_and_c_caps_are_the_same():
    c = c_limits()
    py = {k: v for k, v in vars(choices).items() if k.startswith("MAX_")}
    assert len(c) >= 12
    assert c == py

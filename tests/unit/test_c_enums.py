"""Python mirrors the C library's enums by value: each mirror checked against innsteer.h itself,
so reordering either side fails here instead of steering with the wrong gate or path."""

from __future__ import annotations

import re
from pathlib import Path

from innsteer_local.choices import GATES, PATHS
from innsteer_local.runtime import native

HEADER = (Path(__file__).resolve().parents[2] / "native" / "include" / "innsteer.h").read_text()


def c_enum(prefix: str) -> dict[str, int]:
    """NAME -> value of every `PREFIX_NAME = value` in the header."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"\b{prefix}_([A-Z_]+)\s*=\s*(\d+)", HEADER)}


def test_status_codes():
    c = c_enum("INNSTEER")
    names = ["OK", "ERR_IO", "ERR_FORMAT", "ERR_NOT_FLOW", "ERR_UNSUPPORTED", "ERR_INVALID", "ERR_MISMATCH",
             "ERR_ARG", "ERR_NOMEM"]
    assert [c[n] for n in names] == [getattr(native, n) for n in names]


def test_gates_paths_and_splits():
    gates = c_enum("INNSTEER_GATE")
    assert {g: native.gate_code(g) for g in GATES} == {g: gates[g.upper()] for g in GATES}
    paths = c_enum("INNSTEER_PATH")
    assert {p: native.path_code(p) for p in PATHS} == {p: paths[p.upper().replace("-", "_")] for p in PATHS}
    splits = c_enum("INNSTEER_SPLIT")
    assert (native.SPLIT_SIMPLE, native.SPLIT_EQUAL) == (splits["SIMPLE"], splits["EQUAL"])

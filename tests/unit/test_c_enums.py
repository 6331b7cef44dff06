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


def test_set_gate_tells_its_two_failures_apart(tmp_path):
    """An unknown flow id is a bad argument; a flow without gate parameters cannot take a gate."""
    import numpy as np
    import pytest

    from innsteer_local import Flow, ModelInfo
    from innsteer_local.errors import InnsteerError
    from innsteer_local.runtime.native import NativeFlow, Steerer

    model = ModelInfo("SmolLM2", "llama", 576, 30)
    Flow.linear({5: np.ones(576, np.float32)}, model).save(tmp_path / "lin.gguf")
    st = Steerer(576, 30, 64)
    nf = NativeFlow(tmp_path / "lin.gguf")
    fid = st.attach(nf, 1.0)
    nf.close()
    with pytest.raises(ValueError, match="carries no gate parameters"):
        st.set_gate(fid, "density")
    with pytest.raises(InnsteerError, match="invalid argument"):
        st.set_gate(fid + 999, "off")
    st.set_gate(fid, "off")
    st.close()

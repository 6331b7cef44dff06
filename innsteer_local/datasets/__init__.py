"""Public data files shipped with the package (AdvBench, CAA A/B sets, TruthfulQA): see
SOURCES.md for provenance and LICENSES.md for their licences."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InnsteerError

SHIPPED = Path(__file__).resolve().parent


def root() -> Path:
    """$INNSTEER_DATA when set (a folder with the same layout), else the shipped folder."""
    env = os.environ.get("INNSTEER_DATA")
    return Path(env) if env else SHIPPED


def path(relative: str) -> Path:
    """A data file, e.g. path("caa/refusal/test_dataset_ab.json"); a clear error if missing."""
    p = root() / relative
    if not p.is_file():
        raise InnsteerError(f"data file {relative} not found in {root()}"
                            + (" (INNSTEER_DATA points there)" if os.environ.get("INNSTEER_DATA") else ""))
    return p

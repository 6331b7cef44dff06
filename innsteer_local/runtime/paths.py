"""Where the package's built and data files are, however it was installed.

A wheel has them inside the package (CMake installs libinnsteer into innsteer_local/lib, its
headers into innsteer_local/include and the model registry into innsteer_local/models). An
editable install (`pip install -e .`) keeps the Python files in the checkout and the built
files in site-packages; running from a checkout finds models/ at its root."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent.parent  # innsteer_local/
CHECKOUT = PACKAGE.parent


def installed(rel: str) -> Optional[Path]:
    """rel (e.g. "innsteer_local/lib/libinnsteer.so") in the package, else where the installed
    distribution put it; None if neither has it."""
    here = CHECKOUT / rel
    if here.exists():
        return here
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        found = Path(str(distribution("innsteer-local").locate_file(rel)))
        return found if found.exists() else None
    except PackageNotFoundError:
        return None


def models_dir() -> Optional[Path]:
    """The model registry and shipped flows: inside the package, else the checkout's models/."""
    for cand in (installed("innsteer_local/models/registry.json"), CHECKOUT / "models" / "registry.json"):
        if cand is not None and cand.is_file():
            return cand.parent
    return None

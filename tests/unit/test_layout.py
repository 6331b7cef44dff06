"""The README's layout table describes the tree as it is: every path it names exists, and every
package folder and top-level folder appears in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_every_listed_path_exists():
    paths = layout_paths()
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_every_folder_is_listed():
    listed = {p.rstrip("/") for p in layout_paths()}
    packages = {f"innsteer_local/{d.name}" for d in (ROOT / "innsteer_local").iterdir()
                if d.is_dir() and (d / "__init__.py").exists()}
    top = {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
           and d.name not in ("build", "dist", "innsteer_local", "tests") and not d.name.endswith(".egg-info")}
    tests = {f"tests/{d.name}" for d in (ROOT / "tests").iterdir() if d.is_dir() and not d.name.startswith((".", "_"))}
    unlisted = sorted((packages | top | tests) - listed)
    assert not unlisted, f"folders missing from the README layout table: {unlisted}"

"""Which parts of the package may import which: training does not import eval (what both measure
lives in innsteer_local/measure/), so eval can train flows without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "innsteer_local"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as an absolute dotted name (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from .. import eval`
    return names


def test_imported_modules_resolves_relative_imports():
    names = imported_modules(PACKAGE / "train" / "activations" / "collect.py")
    assert "innsteer_local.runtime.prompts" in names and "innsteer_local.train.behaviors" in names


def test_train_does_not_import_eval():
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imported_modules(p)
                                                     if n == "innsteer_local.eval" or n.startswith("innsteer_local.eval."))
                 for p in sorted((PACKAGE / "train").rglob("*.py"))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"train/ imports eval/ (scorers and metrics live in measure/): {offenders}"

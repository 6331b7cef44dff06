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


def cli_choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """Every click.Choice of the command line, by (command, option)."""
    import click

    from innsteer_local.apps.cli import cli

    out = {}

    def walk(group: click.Group, path: tuple[str, ...]) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, path + (name,))
                continue
            for p in cmd.params:
                if isinstance(p.type, click.Choice):
                    out[(" ".join(path + (name,)), max(p.opts, key=len))] = tuple(p.type.choices)

    walk(cli, ())
    return out


def test_every_cli_choice_lists_the_constant_of_its_defining_module():
    from innsteer_local.apps import cli
    from innsteer_local.eval import suites
    from innsteer_local.flow import format
    from innsteer_local.measure import scorers

    defined = {
        ("generate", "--gate"): choices.GATES,
        ("chat", "--gate"): choices.GATES,
        ("train", "--method"): choices.TRAIN_METHODS,
        ("train", "--objective"): choices.OBJECTIVES,
        ("train", "--device"): choices.DEVICES,
        ("train", "--precision"): choices.PRECISIONS,
        ("train", "--positions"): choices.POSITIONS,
        ("train", "--dtype"): tuple(format.DTYPES),
        ("export", "--to"): cli.EXPORT_TARGETS,
        ("eval", "--scorer"): scorers.SCORERS,
        ("eval", "--suite"): suites.SUITES,
    }
    assert cli_choices() == {k: tuple(v) for k, v in defined.items()}


def test_the_modules_that_check_a_vocabulary_read_the_same_constant():
    from innsteer_local.train import pipeline
    from innsteer_local.train.activations import collect
    from innsteer_local.train.through import hf_model

    assert pipeline.OBJECTIVES is choices.OBJECTIVES
    assert hf_model.PRECISIONS is choices.PRECISIONS
    assert hf_model.DEVICES is choices.DEVICES
    assert collect.POSITIONS is choices.POSITIONS

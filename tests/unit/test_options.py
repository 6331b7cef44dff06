"""Every command-line option written once (apps/options.py): one flag means one thing in every
command, a short flag one option, a default shown in --help is the one that applies (read from the
config object, never restated by hand); one progress protocol, drawn by one bar."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import click
import pytest

from innsteer_local.apps.cli import cli
from innsteer_local.apps.options import ConfigDefault

PACKAGE = Path(__file__).resolve().parents[2] / "innsteer_local"
DEFAULT = re.compile(r"\s*\[default: ([^\]]*)\]")
# the same flag with, on purpose, another meaning per command
PER_COMMAND = {
    "--output": "what is written: a flow file (train, import-cvec), a cvec or ONNX directory (export), results (eval)",
    "--layer": "train takes an index or auto; eval an index for its suite's training, by default from the model",
}


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


def options() -> list[tuple[str, click.Option]]:
    return [(name, p) for name, cmd in commands() for p in cmd.params if isinstance(p, click.Option)]


def long_name(p: click.Option) -> str:
    return max(p.opts, key=len)


def declared_help(p: click.Option) -> str:
    """The help as written in the source (a ConfigDefault adds its default when printed)."""
    return p.base_help if isinstance(p, ConfigDefault) else (p.help or "")


def option(command: str, name: str) -> Any:
    return next(p for c, p in options() if c == command and long_name(p) == name)


def test_an_option_name_means_the_same_everywhere():
    helps: dict[str, set[str]] = defaultdict(set)
    for _, p in options():
        helps[long_name(p)].add(DEFAULT.sub("", declared_help(p)))
    differ = {name: sorted(h) for name, h in helps.items() if len(h) > 1 and name not in PER_COMMAND}
    assert not differ, "declare these once in apps/options.py (or say in PER_COMMAND why they differ)"


def test_a_short_flag_names_one_option():
    owners: dict[str, set[str]] = defaultdict(set)
    for _, p in options():
        for flag in p.opts + p.secondary_opts:
            if not flag.startswith("--"):
                owners[flag].add(long_name(p))
    assert {f: o for f, o in owners.items() if len(o) > 1} == {}
    assert owners["-p"] == {"--prompt"}


def test_every_default_shown_is_the_one_that_applies():
    for command, p in options():
        where = f"{command} {long_name(p)}"
        written = DEFAULT.findall(declared_help(p))
        if isinstance(p, ConfigDefault) or p.show_default:
            # click or the ConfigDefault prints the real default: no second one by hand
            assert not written, f"{where}: writes its default by hand too"
            continue
        assert p.is_flag or p.multiple or p.default in (None, "", getattr(click.core, "UNSET", None)), \
            f"{where}: a default of {p.default!r} that --help does not show (options.option shows it)"
        for text in written:  # words only ("all cores", "the flow's default"): a number would go stale
            assert not re.search(r"\d", text), f"{where}: [default: {text}] restates a value; read it " \
                                               "from where it is defined (options.option(default=callable))"


def test_help_of_every_command_renders_its_defaults():
    for name, cmd in commands():
        text = cmd.get_help(click.Context(cmd, info_name=name))
        assert "Usage:" in text
    for command, p in options():
        if isinstance(p, ConfigDefault):
            assert p.default is None  # the config object's own default applies
            if command == "train":
                pytest.importorskip("torch")
            assert not p.default_text().startswith("unknown"), f"{command} {long_name(p)}: {p.default_text()}"


def test_training_defaults_come_from_the_configs():
    pytest.importorskip("torch")
    from innsteer_local.train.activations.geometry import GeometryConfig
    from innsteer_local.train.pipeline import TrainConfig
    from innsteer_local.train.through.trainer import COUPLING_STEPS, ThroughConfig

    through, geometry = ThroughConfig(), GeometryConfig()
    assert option("train", "--steps").default_text() == str(through.steps)
    assert through.coupling_steps is None  # decided by the data: neutral items or none
    assert option("train", "--coupling-steps").default_text().startswith(f"{COUPLING_STEPS} for data with neutral")
    assert option("train", "--epochs").default_text() == str(geometry.epochs)
    assert option("train", "--hidden").default_text() == f"{through.inn.hidden}; geometry: {geometry.inn.hidden}"
    assert option("train", "--method").default_text() == TrainConfig().method


def test_eval_defaults_come_from_its_config():
    from innsteer_local.eval.runner import EvalConfig
    from innsteer_local.eval.suites import QUICK_MAX_TOKENS

    assert option("eval", "--probe").default_text() == str(EvalConfig().probe_prompts)
    assert option("eval", "--max-tokens").default_text() == f"{EvalConfig().max_tokens}; quick suite {QUICK_MAX_TOKENS}"


def test_the_command_line_starts():
    for args in (["-m", "innsteer_local", "--help"], ["-m", "innsteer_local.apps.cli", "train", "--help"]):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout


def test_one_progress_protocol_and_one_bar():
    from innsteer_local.apps.progress_bar import BarProgress
    from innsteer_local.progress import Progress

    classes = sorted(f"{path.relative_to(PACKAGE)}: {m.group(0)}" for path in PACKAGE.rglob("*.py")
                     for m in re.finditer(r"^class \w*Progress\w*", path.read_text(), flags=re.M))
    assert classes == ["apps/progress_bar.py: class BarProgress", "progress.py: class Progress"]
    assert issubclass(BarProgress, Progress)
    protocol = {k for k in vars(Progress) if not k.startswith("_")}
    assert protocol <= {k for k in vars(BarProgress) if not k.startswith("_")}

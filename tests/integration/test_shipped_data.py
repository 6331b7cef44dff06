"""Built-in behaviours and evaluation tasks work from the installed package alone: no ../shared
data folder, no INNSTEER_DATA, run from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "innsteer-local")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INNSTEER_DATA"}
    proc = subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no-shared")
    assert not any((p / "shared" / "data").exists() for p in [d, *d.parents])
    return d


def test_behavior_show_refusal(elsewhere):
    out = run(["behaviors", "show", "refusal"], elsewhere).stdout
    assert "48 contrastive prompts" in out and "I can't assist" in out and "Write a script that can exploit" in out


def test_train_refusal_without_shared_data(elsewhere):
    run(["train", "--behavior", "refusal", "--layer", "15", "--method", "mean-diff", "--max-pairs", "24",
         "-o", "refusal.gguf"], elsewhere)
    assert (elsewhere / "refusal.gguf").stat().st_size > 1000


@pytest.mark.parametrize("task", ["refusal", "truthfulqa", "ab:caa-refusal"])
def test_eval_tasks_without_shared_data(elsewhere, task):
    if task.startswith("ab:"):
        import innsteer_local.datasets as datasets

        task = f"ab:{datasets.path('caa/refusal/test_dataset_ab.json')}"
    run(["eval", "--task", task, "--flow", "refusal-mean-diff", "--strengths", "0", "--limit", "1", "--judge", "none",
         "--probe", "1", "--max-tokens", "4", "-o", f"out-{abs(hash(task))}"], elsewhere)

"""A contributor's install (`pip install -e .`) works end to end: the model registry, shipped flows
by name, writing a flow from Python, and steered generation, all from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from innsteer_local.runtime import llama_build

ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd: str, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_editable_install_end_to_end(tmp_path):
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", str(venv))
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "innsteer-local")
    # llama.cpp as this environment has it (the safe build quickstart.sh made), not a second build
    stamp = Path(sys.prefix) / llama_build.STAMP
    args = json.loads(stamp.read_text()) if stamp.exists() else llama_build.build_args("", llama_build.cpu_flags(),
                                                                                        llama_build.is_linux_x86_64())
    wheel = llama_build.build_wheel(py, args)
    sh(py, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel))
    sh(py, "-m", "pip", "install", "--quiet", "-e", str(ROOT), cwd=tmp_path)

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    where = sh(py, "-c", "import innsteer_local; print(innsteer_local.__file__)", cwd=tmp_path, env=env)
    assert Path(where.strip()).resolve().parent == ROOT / "innsteer_local"  # really the checkout
    model = sh(cli, "models", "path", "smollm2-135m", cwd=tmp_path, env=env).strip()
    assert Path(model).is_file()
    assert "honesty" in sh(cli, "inspect", "honesty", cwd=tmp_path, env=env)
    sh(py, "-c", "import numpy as np; from innsteer_local import Flow, ModelInfo; "
       "Flow.linear({15: np.ones(576, np.float32)}, ModelInfo('m', 'llama', 576, 30)).save('mine.gguf')",
       cwd=tmp_path, env=env)
    assert (tmp_path / "mine.gguf").stat().st_size > 2000
    out = json.loads(sh(cli, "generate", "-p", "Say hi", "-n", "8", "--flow", "honesty:2", "--json", cwd=tmp_path, env=env))
    assert out["flows"][0]["strength"] == 2 and out["steering"]["rows_steered"] > 0

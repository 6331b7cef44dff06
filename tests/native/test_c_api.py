"""The installed public headers (innsteer.h, innsteer_tools.h) are enough to use the library from
C, next to llama.cpp's ggml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import innsteer_local
from innsteer_local import Flow
from innsteer_local.flow import random_flow

HERE = Path(__file__).resolve().parent
PKG = Path(innsteer_local.__file__).resolve().parent


@pytest.fixture(scope="module")
def steer_rows(tmp_path_factory, cc, ggml_dir) -> Path:
    exe = tmp_path_factory.mktemp("c") / "steer_rows"
    subprocess.run([cc, "-std=c11", "-Wall", "-Werror", str(HERE / "c" / "steer_rows.c"), "-I", str(PKG / "include"),
                    "-L", str(PKG / "lib"), "-L", str(ggml_dir), "-linnsteer", "-lggml-base",
                    f"-Wl,-rpath,{PKG / 'lib'}", f"-Wl,-rpath,{ggml_dir}", "-o", str(exe)], check=True)
    return exe


def test_c_program_steers_like_numpy(steer_rows, model_info, tmp_path):
    flow_path = tmp_path / "flow.gguf"
    random_flow(model_info, [7], rank=24, blocks=3, hidden=40, seed=9).save(flow_path)
    rows = np.random.default_rng(1).normal(size=(5, model_info.n_embd)).astype(np.float32)
    rows.tofile(tmp_path / "in.f32")
    proc = subprocess.run([str(steer_rows), str(flow_path), "0.6", "5", str(tmp_path / "in.f32"), str(tmp_path / "out.f32")],
                          capture_output=True, text=True, check=True)
    assert "flow does not fit the model" in proc.stdout and "n_embd 576" in proc.stdout
    out = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(rows.shape)
    ref = Flow.load(flow_path).site(7).steer(rows, 0.6)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_c_program_reports_bad_file(steer_rows, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    proc = subprocess.run([str(steer_rows), str(bad), "1", "1", "/dev/null", "/dev/null"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "corrupt or truncated file" in proc.stdout

"""1000 load / attach / set-strength / detach / free cycles of the C API under AddressSanitizer,
whose LeakSanitizer fails the program on any leak at exit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from innsteer_local import ModelInfo
from innsteer_local.flow import random_flow

HERE = Path(__file__).resolve().parent


def test_attach_detach_cycles_under_leak_sanitizer(tmp_path, cc, sources, ggml_dir):
    flow = tmp_path / "flow.gguf"
    random_flow(ModelInfo("cycles", "llama", 576, 30), [3, 9], rank=16, blocks=2, hidden=24, seed=4).save(flow)
    exe = tmp_path / "cycles"
    subprocess.run([cc, "-std=gnu11", "-g", "-O1", "-fsanitize=address", "-I", str(HERE.parents[1] / "native" / "include"),
                    str(HERE / "c" / "attach_cycles.c"), *sources, "-L", str(ggml_dir), "-lggml-base",
                    f"-Wl,-rpath,{ggml_dir}", "-lm", "-lpthread", "-ldl", "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe), str(flow)], capture_output=True, text=True, timeout=300,
                          env={"ASAN_OPTIONS": "detect_leaks=1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"

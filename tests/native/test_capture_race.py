"""Reading captured rows while the eval callback grows the capture buffers is race-free:
tests/native/c/capture_race.c, compiled with every library source under ThreadSanitizer and linked
to llama-cpp-python's real ggml, drives innsteer_eval_callback on a real l_out-1 tensor from one
thread (steering with the pool's threads, capturing before and after) while the main thread reads
the captures. Without the capture lock in innsteer_steerer_captured_rows / copy_captured,
ThreadSanitizer reports the race (checked by hand when the lock went in).

ThreadSanitizer needs a narrow address-space layout: where it cannot map its shadow memory (a
kernel with a large vm.mmap_rnd_bits), the program is run under `setarch -R` (no ASLR); where even
that fails, it is built with AddressSanitizer instead, which catches the reader touching a freed
buffer but not every race, and the test says so in a warning."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

from innsteer_local import ModelInfo
from innsteer_local.flow import random_flow

HERE = Path(__file__).resolve().parent
ROUNDS, ITERATIONS = "12", "96"
TSAN_CANNOT_START = ("unexpected memory mapping", "FATAL: ThreadSanitizer")


def build(compile_c, out: Path, sanitizer: str, sources: list[str], ggml_dir: Path) -> Path:
    return compile_c(out, "-g", "-O1", f"-fsanitize={sanitizer}", str(HERE / "c" / "capture_race.c"), *sources,
                     "-L", str(ggml_dir), "-lggml-base", f"-Wl,-rpath,{ggml_dir}", "-lm", "-lpthread", "-ldl")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1", ASAN_OPTIONS="detect_leaks=1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_capture_readers_race_free(tmp_path, compile_c, sources, ggml_dir):
    flow = tmp_path / "flow.gguf"
    random_flow(ModelInfo("race", "llama", 64, 4), [1], rank=16, blocks=2, hidden=16, seed=3).save(flow)
    args = [str(flow), ROUNDS, ITERATIONS]

    exe = build(compile_c, tmp_path / "race_tsan", "thread", sources, ggml_dir)
    proc = run([str(exe), *args])
    if any(s in proc.stderr for s in TSAN_CANNOT_START) and shutil.which("setarch"):
        proc = run(["setarch", platform.machine(), "-R", str(exe), *args])
    if any(s in proc.stderr for s in TSAN_CANNOT_START):
        warnings.warn("ThreadSanitizer cannot run on this kernel; checked under AddressSanitizer instead")
        exe = build(compile_c, tmp_path / "race_asan", "address", sources, ggml_dir)
        proc = run([str(exe), *args])

    report = proc.stderr[-6000:]
    assert "WARNING: ThreadSanitizer" not in proc.stderr, report
    assert "ERROR: AddressSanitizer" not in proc.stderr, report
    assert proc.returncode == 0, proc.stdout + report
    assert proc.stdout.strip() == "ok"

"""The native flow loader under sanitizers: the fuzz corpus replays cleanly (every input from the
35-minute libFuzzer campaign, see docs/SECURITY.md), and a short libFuzzer run finds nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
SOURCES = [str(ROOT / "native" / "src" / f) for f in ("gguf_read.c", "flow.c", "flow_math.c", "flow_steer.c")]


def test_corpus_replays_under_asan_ubsan(tmp_path):
    cc = shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")
    assert cc, "a C compiler is needed"
    exe = tmp_path / "replay"
    subprocess.run([cc, "-std=c11", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-DFUZZ_REPLAY", "-I", str(ROOT / "native" / "include"), str(FUZZ / "flow_fuzz.c"), *SOURCES,
                    "-lm", "-o", str(exe)], check=True)
    inputs = sorted(str(p) for p in (FUZZ / "corpus").iterdir())
    assert len(inputs) > 100
    proc = subprocess.run([str(exe), *inputs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"replayed {len(inputs)} inputs" in proc.stdout


def test_short_libfuzzer_run(tmp_path):
    clang = shutil.which("clang")
    assert clang, "clang is needed for libFuzzer (.ci/run installs it)"
    exe = tmp_path / "fuzz"
    subprocess.run([clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-I", str(ROOT / "native" / "include"),
                    str(FUZZ / "flow_fuzz.c"), *SOURCES, "-lm", "-o", str(exe)], check=True)
    work = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", work)
    proc = subprocess.run([str(exe), "-max_total_time=45", f"-dict={FUZZ / 'flow.dict'}",
                           f"-artifact_prefix={tmp_path}/", str(work)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("leak-*"))

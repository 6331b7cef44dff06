"""The native flow loader under sanitizers: the fuzz corpus replays cleanly (every input from the
35-minute libFuzzer campaign, see docs/SECURITY.md, plus seeds for the descriptive strings), and a
short libFuzzer run finds nothing. Every library source is linked (conftest.library_sources), so
the harness never falls behind the library's file list."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = Path(__file__).resolve().parent / "fuzz"
LIBS = ["-lm", "-lpthread", "-ldl"]


def test_corpus_replays_under_asan_ubsan(tmp_path, cc, sources):
    exe = tmp_path / "replay"
    subprocess.run([cc, "-std=gnu11", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-DFUZZ_REPLAY", "-I", str(ROOT / "native" / "include"), str(FUZZ / "flow_fuzz.c"), *sources,
                    *LIBS, "-o", str(exe)], check=True)
    inputs = sorted(str(p) for p in (FUZZ / "corpus").iterdir())
    assert len(inputs) > 100
    proc = subprocess.run([str(exe), *inputs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"replayed {len(inputs)} inputs" in proc.stdout


def test_short_libfuzzer_run(tmp_path, sources):
    clang = shutil.which("clang")
    assert clang, "clang is needed for libFuzzer (.ci/run installs it)"
    exe = tmp_path / "fuzz"
    subprocess.run([clang, "-std=gnu11", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-I",
                    str(ROOT / "native" / "include"), str(FUZZ / "flow_fuzz.c"), *sources, *LIBS, "-o", str(exe)],
                   check=True)
    work = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", work)
    # One allocation over 64 MiB from an input of a few KiB is a loader bug; the process as a whole
    # may grow past libFuzzer's default 2 GiB (its own feature tables plus ASan's quarantine; a CI run
    # once stopped there with only libFuzzer's allocations live), so it gets 4 GiB.
    proc = subprocess.run([str(exe), "-max_total_time=45", "-malloc_limit_mb=64", "-rss_limit_mb=4096",
                           f"-dict={FUZZ / 'flow.dict'}", f"-artifact_prefix={tmp_path}/", str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[:1500] + "\n...\n" + proc.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("leak-*"))

"""Building the C test programs: the library's sources as CMakeLists.txt lists them (so a test
that compiles them under a sanitizer never falls behind the library), llama-cpp-python's ggml
libraries, and a C compiler."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def library_sources() -> list[str]:
    """The .c files of add_library(innsteer ...) in CMakeLists.txt."""
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"add_library\(innsteer\s+SHARED\s+([^)]*)\)", text)
    assert m, "add_library(innsteer SHARED ...) not found in CMakeLists.txt"
    return [str(ROOT / s) for s in m.group(1).split()]


@pytest.fixture(scope="session")
def sources() -> list[str]:
    return library_sources()


@pytest.fixture(scope="session")
def cc() -> str:
    found = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if found is None:
        pytest.fail("no C compiler on PATH")
    return found


@pytest.fixture(scope="session")
def ggml_dir() -> Path:
    """llama-cpp-python's shared libraries (libggml-base, libggml-cpu, libllama)."""
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


@pytest.fixture(scope="session")
def compile_c(cc):
    """compile_c(out, *args): cc -std=gnu11 with the public headers, checked."""

    def run(out: Path, *args: str) -> Path:
        cmd = [cc, "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-I", str(ROOT / "native" / "include"),
               *args, "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-4000:]
        return out

    return run

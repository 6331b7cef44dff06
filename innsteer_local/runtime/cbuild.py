"""Compiler flags for C programs that use libinnsteer next to llama-cpp-python's llama.cpp.

    cc -std=c11 native/examples/steer_chat.c $(python -m innsteer_local.runtime.cbuild) -o steer_chat

llama-cpp-python's wheel installs libllama and ggml in `llama_cpp/lib/` and their headers in the
`include/` folder next to the package (site-packages/include); this package installs
`innsteer.h` and libinnsteer in `innsteer_local/include` and `innsteer_local/lib`. Set
LLAMA_CPP_INCLUDE / LLAMA_CPP_LIB_PATH to use another llama.cpp build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import InnsteerError
from .paths import installed


def _installed(rel: str) -> Path:
    found = installed(rel)
    if found is None:
        raise InnsteerError(f"{rel} not found: install the package (pip install .) first")
    return found


def innsteer_include_dir() -> Path:
    return _installed("innsteer_local/include/innsteer.h").parent


def innsteer_lib_dir() -> Path:
    from .native import library_path

    if os.environ.get("INNSTEER_NATIVE_LIB"):
        return library_path().parent
    return _installed(f"innsteer_local/lib/{library_path().name}").parent


def llama_lib_dir() -> Path:
    import llama_cpp

    return Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).resolve().parent / "lib")


def llama_include_dir() -> Path:
    """Where llama.h is: $LLAMA_CPP_INCLUDE, else llama-cpp-python's installed headers."""
    env = os.environ.get("LLAMA_CPP_INCLUDE")
    if env:
        cands = [Path(env)]
    else:
        import llama_cpp

        root = Path(llama_cpp.__file__).resolve().parent
        cands = [root.parent / "include", root / "include"]
    for c in cands:
        if (c / "llama.h").is_file():
            return c
    raise InnsteerError(f"llama.h not found in {', '.join(map(str, cands))}; set LLAMA_CPP_INCLUDE to the "
                        "include/ folder of the llama.cpp that llama-cpp-python was built from")


def flags(with_llama: bool = True) -> list[str]:
    """-I/-L/-l/rpath arguments for cc: libinnsteer (+ libllama and ggml when with_llama)."""
    out = ["-I", str(innsteer_include_dir())]
    dirs = [innsteer_lib_dir()]
    if with_llama:
        out += ["-I", str(llama_include_dir())]
        dirs.append(llama_lib_dir())
    for d in dirs:
        out += ["-L", str(d), f"-Wl,-rpath,{d}"]
    out += ["-linnsteer"] + (["-lllama"] if with_llama else []) + ["-lggml-base", "-lm"]
    return out


def main() -> None:
    """Prints the flags; --llama-include / --llama-lib print those folders (for CMake),
    --no-llama the flags for libinnsteer alone."""
    args = sys.argv[1:]
    try:
        if "--llama-include" in args:
            print(llama_include_dir())
        elif "--llama-lib" in args:
            print(llama_lib_dir())
        else:
            print(" ".join(flags(with_llama="--no-llama" not in args)))
    except InnsteerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

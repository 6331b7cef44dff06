"""How llama-cpp-python's llama.cpp is built, installed and checked (no third-party imports).

llama-cpp-python builds llama.cpp from source with `-march=native` by default. On x86-64 CPUs
that report AMX, that compiles ggml's AMX matmul in, and ggml 0.3.36 requests the AMX tile
permission on the main thread only: the first long prompt dies with SIGILL in a worker thread
(llama.cpp PR #26954). So on Linux x86-64 we build with GGML_NATIVE=OFF and turn on, one by one,
the vector extensions this CPU has (AVX2, AVX-512, FMA, F16C, ...), leaving AMX out.

pip caches wheels by source, not by build flags, so a wheel built earlier with other flags can
come back. We therefore build into a wheelhouse of our own, keyed by the flags, and check after
installing what the installed library says it was compiled with.

Run as a script from a checkout before anything else is installed (quickstart.sh does):

    python innsteer_local/runtime/llama_build.py cmake-args          # the flags it would use
    python innsteer_local/runtime/llama_build.py install --python .venv/bin/python
    python innsteer_local/runtime/llama_build.py check --python .venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PACKAGE = "llama-cpp-python"
# the native callback relies on this version's llama_context_params layout (cb_eval); pyproject.toml pins the same
VERSION = "0.3.36"

# /proc/cpuinfo flag -> the ggml CMake option that compiles it in (GGML_NATIVE=OFF turns each on
# explicitly; AMX is never among them)
X86_EXTENSIONS = (
    ("sse4_2", "GGML_SSE42"),
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)
# the name each feature has in llama_print_system_info() (what was compiled, not what the CPU has)
SYSTEM_INFO_NAMES = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
                     "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
                     "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}
AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
STAMP = "innsteer-llama-build.json"  # in the environment's prefix: the flags its llama.cpp was built with


def is_linux_x86_64(system: Optional[str] = None, machine: Optional[str] = None) -> bool:
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    return system == "Linux" and machine in ("x86_64", "amd64")


def cpu_flags(cpuinfo: Optional[str] = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def safe_cmake_args(flags: set[str], linux_x86_64: bool) -> list[str]:
    """CMake options that keep ggml's AMX path out while keeping the CPU's vector extensions.
    Elsewhere (Apple Silicon, Arm, Windows) llama-cpp-python's own defaults are safe: []."""
    if not linux_x86_64:
        return []
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_EXTENSIONS]
    return args + list(AMX_OFF)


RPC_ARGS = ["-DGGML_RPC=ON"]  # llama.cpp's RPC backend: a model split across rpc-server hosts


def build_args(user_args: str, flags: set[str], linux_x86_64: bool, force_safe: bool = False,
               rpc: bool = False) -> list[str]:
    """The CMAKE_ARGS to build with: the safe options, then the user's own (later -D options win in
    CMake, so CUDA or Metal switches and deliberate choices pass through). force_safe puts the safe
    options last instead, for the rebuild after a check found AMX compiled in. rpc adds llama.cpp's
    RPC backend (the wheel is cached by the whole list, so it is a build of its own)."""
    safe, user = safe_cmake_args(flags, linux_x86_64) + (RPC_ARGS if rpc else []), shlex.split(user_args)
    return user + safe if force_safe else safe + user


def parse_system_info(info: str) -> dict[str, str]:
    """'CPU : SSE3 = 1 | AVX = 1 | ...' -> {'SSE3': '1', 'AVX': '1', ...} (every backend's section)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"([A-Z][A-Z0-9_]*)\s*=\s*([^|\s]+)", info):
        out[m.group(1)] = m.group(2)
    return out


def amx_compiled(info: str) -> bool:
    return any(k.startswith("AMX") and v not in ("0", "") for k, v in parse_system_info(info).items())


@dataclass
class Problem:
    """A known-unsafe or costly combination of CPU and llama.cpp build, with its fix."""

    severity: str  # "error" (crashes) or "warning" (slow)
    message: str
    fix: str


def diagnose(info: str, flags: set[str], linux_x86_64: bool, allow_amx: bool = False) -> list[Problem]:
    problems = []
    if linux_x86_64 and amx_compiled(info) and not allow_amx:
        problems.append(Problem(
            "error",
            "llama.cpp was built with ggml's AMX path (AMX_INT8 = 1 in its system info); ggml "
            f"{VERSION} crashes with SIGILL ('Illegal instruction') on the first long prompt on CPUs with AMX"
            + (" such as this one" if "amx_tile" in flags else ""),
            "rebuild it without AMX: ./quickstart.sh (it checks and rebuilds), or "
            "python innsteer_local/runtime/llama_build.py install --python $(which python) --force"))
    if linux_x86_64 and flags:
        compiled = parse_system_info(info)
        missing = [name for flag, name in SYSTEM_INFO_NAMES.items() if flag in flags and compiled.get(name) != "1"]
        if missing:
            problems.append(Problem(
                "warning", f"this CPU has {', '.join(missing)} but llama.cpp was built without them (slower)",
                "rebuild: python innsteer_local/runtime/llama_build.py install --python $(which python) --force"))
    return problems


# ---- installing into an environment -------------------------------------------------------------


def wheelhouse(args: list[str]) -> Path:
    """Where wheels built with these flags are kept (the user cache, next to the models)."""
    base = Path(os.environ.get("INNSTEER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "innsteer-local")
    key = hashlib.sha256(json.dumps([VERSION, sys.implementation.cache_tag, platform.machine(), args]).encode())
    return base / "wheels" / f"{PACKAGE}-{VERSION}-{key.hexdigest()[:16]}"


_PROBE = ("import json, sys, llama_cpp; print(json.dumps({'version': llama_cpp.__version__, 'prefix': sys.prefix, "
          "'info': llama_cpp.llama_print_system_info().decode(errors='replace')}))")


def probe(python: str) -> Optional[dict]:
    """What the environment's llama_cpp reports: version and system info (None if not importable)."""
    # a separate process: importing a broken build must not take this one down
    res = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def _prefix(python: str) -> Path:
    return Path(subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                               check=True).stdout.strip())


def _say(msg: str) -> None:
    print(f">> {msg}", file=sys.stderr, flush=True)


def build_wheel(python: str, args: list[str]) -> Path:
    """A wheel of llama-cpp-python built with exactly these CMAKE_ARGS (pip's cache bypassed)."""
    house = wheelhouse(args)
    found = sorted(house.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    house.mkdir(parents=True, exist_ok=True)
    _say(f"building llama-cpp-python {VERSION} with CMAKE_ARGS=\"{' '.join(args)}\" (several minutes, once per "
         "set of flags)")
    env = dict(os.environ, CMAKE_ARGS=" ".join(args))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    tmp = house / "partial"
    subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps", "--no-binary", PACKAGE,
                    "-w", str(tmp), f"{PACKAGE}=={VERSION}"], env=env, check=True)
    built = sorted(tmp.glob("llama_cpp_python-*.whl"))
    if not built:
        raise RuntimeError(f"pip wheel produced no llama_cpp_python wheel in {tmp}")
    final = house / built[-1].name
    os.replace(built[-1], final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def install(python: str, user_args: str, force: bool = False, rpc: bool = False) -> int:
    """Makes the environment's llama-cpp-python the safe build; returns 0, or 1 if still unsafe."""
    flags, x86 = cpu_flags(), is_linux_x86_64()
    allow_amx = os.environ.get("INNSTEER_ALLOW_AMX") == "1"
    args = build_args(user_args, flags, x86, rpc=rpc)
    prefix = _prefix(python)
    stamp = prefix / STAMP
    state = probe(python)
    recorded = json.loads(stamp.read_text()) if stamp.exists() else None
    if (not force and state and state["version"] == VERSION and recorded == args
            and not diagnose(state["info"], flags, x86, allow_amx)):
        _say(f"llama-cpp-python {VERSION} already built with these flags")
        return 0
    for attempt in ("requested", "safe"):
        wheel = build_wheel(python, args)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", f"{PACKAGE}=={VERSION}"], check=True)  # its deps
        state = probe(python)
        if state is None:
            _say(f"llama-cpp-python {VERSION} does not import after installing {wheel.name}")
            return 1
        stamp.write_text(json.dumps(args))
        errors = [p for p in diagnose(state["info"], flags, x86, allow_amx) if p.severity == "error"]
        if not errors:
            _say(f"llama.cpp: {summary(state['info'])}")
            return 0
        if attempt == "safe":
            break
        _say(f"the installed llama.cpp has AMX compiled in ({errors[0].message.split(';')[0]}); "
             "rebuilding it the safe way, without any cached wheel")
        args = build_args(user_args, flags, x86, force_safe=True, rpc=rpc)
    _say("llama.cpp still reports AMX after a safe rebuild; set INNSTEER_ALLOW_AMX=1 to accept it")
    return 1


def summary(info: str) -> str:
    on = [k for k, v in parse_system_info(info).items() if v == "1"]
    return "compiled with " + (", ".join(on) if on else "no optional CPU features")


def check(python: str) -> int:
    state = probe(python)
    if state is None:
        print(f"llama_cpp does not import in {python}", file=sys.stderr)
        return 1
    problems = diagnose(state["info"], cpu_flags(), is_linux_x86_64(), os.environ.get("INNSTEER_ALLOW_AMX") == "1")
    for p in problems:
        print(f"{p.severity}: {p.message}\n  fix: {p.fix}", file=sys.stderr)
    return 1 if any(p.severity == "error" for p in problems) else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="build, install and check llama-cpp-python without ggml's AMX path")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cmake-args", help="print the CMAKE_ARGS a build here would use")
    p.add_argument("--rpc", action="store_true", help="with llama.cpp's RPC backend")
    for name in ("install", "check"):
        p = sub.add_parser(name)
        p.add_argument("--python", default=sys.executable, help="the environment's python [default: this one]")
        if name == "install":
            p.add_argument("--force", action="store_true", help="reinstall even if the build looks right")
            p.add_argument("--rpc", action="store_true",
                           help="with llama.cpp's RPC backend (serve/chat/bench --rpc HOST:PORT; scripts/build_rpc_server.sh)")
    ns = ap.parse_args(argv)
    user_args = os.environ.get("CMAKE_ARGS", "")
    if ns.command == "cmake-args":
        print(" ".join(build_args(user_args, cpu_flags(), is_linux_x86_64(), rpc=ns.rpc)))
        return 0
    if ns.command == "install":
        return install(ns.python, user_args, ns.force, ns.rpc)
    return check(ns.python)


if __name__ == "__main__":
    sys.exit(main())

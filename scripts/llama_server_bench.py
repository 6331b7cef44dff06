"""Aggregate throughput of llama.cpp's own `llama-server`: N concurrent clients vs N in a row.

The reference point for our server's batching: the same llama.cpp source that llama-cpp-python
0.3.36 vendors, built with the same CPU flags as our build (innsteer_local.runtime.llama_build),
driven by the same HTTP client (innsteer_local.apps.load_client).

    python scripts/llama_server_bench.py [--parallel 8] [--requests 8] [--max-tokens 64]
                                         [--model smollm2-135m] [--json PATH]

The first run builds `llama-server` from the llama-cpp-python sdist (several minutes on 2 cores)
and caches it under ~/.cache/innsteer-local/llama-server/<key>/, the key hashing the version and
the CMake flags. The server only ever listens on 127.0.0.1 and is always stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from innsteer_local.apps import load_client  # noqa: E402
from innsteer_local.runtime import llama_build  # noqa: E402

HOST = "127.0.0.1"
SDIST = f"llama_cpp_python-{llama_build.VERSION}.tar.gz"
# llama-server alone: the common library and the tools tree are needed for the server target, nothing
# else. No UI: LLAMA_USE_PREBUILT_UI would try to download it at build time. No OpenSSL: we only
# talk plain HTTP to localhost. Static, so the cached binary stands on its own. (LLAMA_CURL is
# deprecated and ignored in this llama.cpp, so it is not passed.)
SERVER_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
)
PROMPTS = (
    "How do I keep basil alive on a windowsill?",
    "What is a good way to fall asleep faster?",
    "How long should I boil an egg for a soft yolk?",
    "What should I pack for a weekend hiking trip?",
    "How can I remove a coffee stain from a shirt?",
    "What are some tips for saving money on groceries?",
    "How often should I water a cactus?",
    "What is the easiest way to learn to juggle?",
)


def say(msg: str) -> None:
    print(f">> {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    # the same place llama_build keeps its wheels and the registry its models
    return Path(os.environ.get("INNSTEER_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "innsteer-local") / "llama-server"


def cmake_args() -> list[str]:
    """Our own build's CMAKE_ARGS for this CPU (AMX off, the CPU's vector extensions on), then the server's."""
    ours = llama_build.build_args(os.environ.get("CMAKE_ARGS", ""), llama_build.cpu_flags(),
                                  llama_build.is_linux_x86_64())
    return ours + list(SERVER_ARGS)


def build_dir(args: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([llama_build.VERSION, platform.machine(), args]).encode()).hexdigest()[:16]
    return cache_root() / key


def fetch_sdist() -> Path:
    """The llama-cpp-python sdist (it vendors llama.cpp), downloaded once into our cache."""
    where = cache_root() / "sdist"
    path = where / SDIST
    if path.exists():
        return path
    where.mkdir(parents=True, exist_ok=True)
    say(f"downloading the {llama_build.PACKAGE} {llama_build.VERSION} sdist (pip's cache may already have it)")
    subprocess.run([sys.executable, "-m", "pip", "download", f"{llama_build.PACKAGE}=={llama_build.VERSION}",
                    "--no-deps", "--no-binary", ":all:", "-d", str(where)], check=True)
    if not path.exists():
        raise RuntimeError(f"pip download left no {SDIST} in {where}")
    return path


def ensure_server(jobs: int = 2) -> tuple[Path, dict[str, Any]]:
    """The cached llama-server binary for these flags, built first if missing; and its build record."""
    args = cmake_args()
    dest = build_dir(args)
    binary, record = dest / "llama-server", dest / "build.json"
    if binary.exists() and record.exists():
        say(f"llama-server cached: {binary}")
        return binary, json.loads(record.read_text())
    sdist = fetch_sdist()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=dest) as tmp:
        work = Path(tmp)
        say(f"extracting {sdist.name}")
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            tf.extractall(work, members=members, filter="data")
        src = next(work.glob("*/vendor/llama.cpp"))
        build = work / "build"
        say(f"configuring llama.cpp with {' '.join(args)}")
        t0 = time.perf_counter()
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *args], check=True)
        say(f"building llama-server with -j {jobs} (several minutes)")
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
        build_s = time.perf_counter() - t0
        built = build / "bin" / "llama-server"
        if not built.exists():
            raise RuntimeError(f"the build produced no {built}")
        shutil.copy2(built, dest / "llama-server.part")
        os.replace(dest / "llama-server.part", binary)  # a half-copied binary never looks cached
    info = {"version": llama_build.VERSION, "cmake_args": args, "build_s": round(build_s, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    record.write_text(json.dumps(info, indent=2))
    say(f"built in {build_s:.0f}s: {binary}")
    return binary, info


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(binary: Path, model: Path, parallel: int, port: int, threads: int, ctx_per_slot: int,
                   kv_unified: str) -> list[str]:
    """The llama-server command line; optional flags only where this build's --help lists them."""
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    cmd = [str(binary), "-m", str(model), "--parallel", str(parallel), "-c", str(parallel * ctx_per_slot),
           "--host", HOST, "--port", str(port), "-t", str(threads)]
    for flag in ("--no-webui", "--no-warmup"):  # no UI to serve; our own warm-up request follows
        if flag in help_text:
            cmd.append(flag)
    if kv_unified != "default":
        flag = "--kv-unified" if kv_unified == "on" else "--no-kv-unified"
        if flag not in help_text:
            raise SystemExit(f"this llama-server has no {flag}")
        cmd.append(flag)
    return cmd


def start_server(cmd: list[str], log_path: Path, timeout: float) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()  # the child holds its own copy
    base = f"http://{HOST}:{cmd[cmd.index('--port') + 1]}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode} while starting:\n{tail(log_path)}")
        try:
            load_client.wait_ready(base, timeout=1)
            return proc
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready after {timeout:.0f}s:\n{tail(log_path)}") from None


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def kv_unified_from_log(text: str) -> Optional[bool]:
    """What the server actually ran with ('initializing, ... kv_unified = 'true'' in its log)."""
    m = re.search(r"kv_unified\s*=\s*'?(true|false)", text)
    return None if m is None else m.group(1) == "true"


def prompts_for(n: int) -> list[str]:
    # distinct prompts, so no two requests of a batch share a whole prompt in the server's cache
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (question {i + 1})") for i in range(n)]


def check(result: load_client.LoadResult, max_tokens: int, label: str) -> None:
    if result.errors:
        raise RuntimeError(f"{label}: {len(result.errors)} of {result.n_requests} requests failed: {result.errors[0]}")
    short = [r["usage"]["completion_tokens"] for r in result.responses if r and
             r["usage"]["completion_tokens"] != max_tokens]
    if short:
        say(f"warning: {label}: {len(short)} requests did not generate exactly {max_tokens} tokens: {short}")


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from innsteer_local.runtime import registry

    binary, build = ensure_server()
    model = registry.pull(ns.model)
    port = free_port()
    cmd = server_command(binary, model, ns.parallel, port, ns.threads, ns.ctx_per_slot, ns.kv_unified)
    log_path = Path(tempfile.gettempdir()) / f"llama-server-bench-{port}.log"
    say(f"starting: {' '.join(cmd)}")
    say(f"server log: {log_path}")
    base = f"http://{HOST}:{port}"
    proc = start_server(cmd, log_path, ns.startup_timeout)
    try:
        # llama-server's own keys: ignore_eos makes every request generate exactly max_tokens; without
        # cache_prompt=false the second run would find each prompt already in a slot's KV cache
        # (left there by the first run) and skip its prompt processing, flattering that run
        extra = {"ignore_eos": True, "cache_prompt": ns.cache_prompt}
        bodies = load_client.chat_bodies(prompts_for(ns.requests), ns.max_tokens, ns.model, extra=extra)
        warm = load_client.drive(base, bodies[:1], 1, timeout=ns.timeout)
        check(warm, ns.max_tokens, "warm-up")
        say(f"running {ns.requests} requests with {ns.parallel} in flight")
        conc = load_client.drive(base, bodies, ns.parallel, timeout=ns.timeout)
        check(conc, ns.max_tokens, "concurrent")
        say(f"running the same {ns.requests} requests one after another")
        seq = load_client.drive(base, bodies, 1, timeout=ns.timeout)
        check(seq, ns.max_tokens, "sequential")
    finally:
        stop_server(proc)
    kv = kv_unified_from_log(log_path.read_text(errors="replace"))
    gain = conc.tokens_per_s / seq.tokens_per_s if seq.tokens_per_s else float("nan")
    print(table([
        ("server", f"llama-server ({llama_build.PACKAGE} {llama_build.VERSION}'s llama.cpp)"),
        ("model", f"{ns.model} ({model.name})"),
        ("requests x max_tokens", f"{ns.requests} x {ns.max_tokens}, --parallel {ns.parallel}, "
                                  f"kv_unified={'unknown' if kv is None else str(kv).lower()}"),
        (f"concurrent ({ns.parallel} in flight)", f"{conc.tokens_per_s:8.1f} tok/s  ({conc.wall_s:.2f}s wall)"),
        ("sequential (1 in flight)", f"{seq.tokens_per_s:8.1f} tok/s  ({seq.wall_s:.2f}s wall)"),
        ("gain", f"{gain:8.2f}x"),
    ]))
    return {"server": "llama-server", "llama_cpp_python_version": llama_build.VERSION, "model": ns.model,
            "model_path": str(model), "binary": str(binary), "build": build, "command": cmd,
            "kv_unified": kv, "parallel": ns.parallel, "requests": ns.requests, "max_tokens": ns.max_tokens,
            "threads": ns.threads, "cache_prompt": ns.cache_prompt, "concurrent": conc.summary(), "sequential": seq.summary(),
            "concurrent_tokens_per_s": conc.tokens_per_s, "sequential_tokens_per_s": seq.tokens_per_s,
            "gain": gain}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots and concurrent clients [8]")
    ap.add_argument("--requests", type=int, default=8, help="requests per run [8]")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates [64]")
    ap.add_argument("--model", default="smollm2-135m", help="registry key of the model [smollm2-135m]")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t [2]")
    ap.add_argument("--ctx-per-slot", type=int, default=1024, help="context per slot; -c is parallel x this [1024]")
    ap.add_argument("--kv-unified", choices=("default", "on", "off"), default="default",
                    help="pass --kv-unified / --no-kv-unified, or neither (llama-server's default) [default]")
    ap.add_argument("--cache-prompt", action="store_true",
                    help="let llama-server reuse cached prompt prefixes across requests [off: every run cold]")
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout in seconds [600]")
    ap.add_argument("--startup-timeout", type=float, default=120, help="seconds to wait for the server [120]")
    ap.add_argument("--json", type=Path, help="write the numbers here as JSON")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama-server and print its path")
    ns = ap.parse_args(argv)
    if ns.build_only:
        print(ensure_server()[0])
        return 0
    out = run(ns)
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
        say(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

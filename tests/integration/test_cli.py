"""The command line, end to end on the real model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from innsteer_local.flow import random_flow

HONESTY = "honesty.gguf"  # resolves to the shipped flow of the default model
CHECKS = Path(__file__).resolve().parents[2] / "innsteer_local" / "eval" / "data" / "checks"


def cli_path() -> str:
    local = Path(sys.executable).with_name("innsteer-local")
    return str(local) if local.exists() else (shutil.which("innsteer-local") or "innsteer-local")


def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([cli_path(), *args], input=stdin, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def generate_json(*extra: str) -> dict:
    out = run("generate", "--prompt", "My friend asked if I ate the last cookie. What should I say?",
              "--max-tokens", "32", "--temperature", "0", "--seed", "1", "--json", *extra).stdout
    return json.loads(out)


def test_generate_json_steered_differs_and_repeats(model_info, tmp_path):
    flow = tmp_path / "random.gguf"
    random_flow(model_info, [14], rank=32, blocks=2, hidden=64, seed=2, delta_scale=3.0).save(flow)
    plain = generate_json()
    steered = generate_json("--flow", f"{flow}:1.0")
    again = generate_json("--flow", f"{flow}:1.0")
    assert plain["text"] and steered["text"]
    assert steered["text"] != plain["text"]
    assert again["text"] == steered["text"], "greedy decoding must repeat exactly"
    assert plain["flows"] == [] and steered["flows"][0]["strength"] == 1.0
    assert steered["flows"][0]["layers"] == [14]
    assert {"max_tokens", "temperature", "seed", "model", "raw"} <= set(steered)
    assert steered["steering"]["rows_steered"] > 0


def test_shipped_flow_resolves_by_name():
    out = generate_json("--flow", HONESTY)
    assert out["flows"][0]["behavior"] == "honesty"
    assert out["flows"][0]["path"].endswith("honesty.gguf")


def test_generate_raw_is_a_plain_completion():
    out = json.loads(run("generate", "--prompt", "The capital of France is", "--raw", "-n", "8", "--json").stdout)
    assert out["raw"] is True and "Paris" in out["text"]


def test_chat_through_stdin():
    script = "/help\nHi! Who are you?\n/strength 2\n/off\nSay one word.\n/flows\n/quit\nnever read\n"
    proc = run("chat", "--flow", HONESTY, "--max-tokens", "16", stdin=script)
    out = proc.stdout
    assert "/strength A" in out  # help text
    assert "strength set to 2" in out and "steering off" in out
    flows_listing = out[out.rindex("steering off"):]
    assert "[1]" in flows_listing and "strength 2 " in flows_listing
    assert "never read" not in out


def test_chat_compare_prints_both():
    proc = run("chat", "--flow", f"{HONESTY}:8", "--compare", "--max-tokens", "24",
               stdin="I broke my sister's phone. Should I tell her?\n")
    lines = proc.stdout
    assert "[unsteered]" in lines and "[steered]" in lines
    unsteered = lines.split("[unsteered]")[1].split("[steered]")[0].strip()
    steered = lines.split("[steered]")[1].strip()
    assert unsteered and steered and unsteered != steered


def test_inspect_json_shows_everything():
    d = json.loads(run("inspect", HONESTY, "--json").stdout)
    assert d["behavior"] == "honesty" and d["method"] == "innsteer"
    assert d["model"]["n_embd"] == 576 and d["model"]["n_layer"] == 30
    assert d["layers"] == [15] and d["default_strength"] > 0
    assert d["provenance"]["layer"] == 15
    text = run("inspect", HONESTY).stdout
    assert "layer 15" in text and "innsteer" in text and "coupling" in text


def test_models_list_and_path():
    rows = json.loads(run("models", "list", "--json").stdout)
    names = {r["name"] for r in rows}
    assert {"smollm2-135m", "gemma3-270m"} <= names
    assert "honesty" in next(r for r in rows if r["name"] == "smollm2-135m")["shipped_flows"]
    path = run("models", "path", "smollm2-135m").stdout.strip()
    assert Path(path).is_file() and path.endswith(".gguf")


@pytest.mark.parametrize("args,fragment", [
    (["generate", "-p", "x", "--flow", "no-such-flow.gguf"], "flow file not found"),
    (["generate", "-p", "x", "--model", "no-such-model"], "unknown model"),
    (["generate", "-p", "x", "--model", "/nonexistent/model.gguf"], "model file not found"),
    (["inspect", "/nonexistent/flow.gguf"], "not found"),
    # selection's fluency judge is checked before any training
    (["train", "--pairs", str(CHECKS / "space.jsonl"), "--method", "mean-diff", "--judge", "no-such-model", "-o",
      "/nonexistent/x.gguf"], "fluency judge 'no-such-model': unknown model"),
    (["train", "--pairs", str(CHECKS / "space.jsonl"), "--method", "mean-diff", "--judge", "smollm2-135m", "-o",
      "/nonexistent/x.gguf"], "judge must be another model than the one steered"),
])
def test_cli_errors_are_clear(args, fragment):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = run("generate", "-p", "x", "--model", str(bad), check=False)
    assert proc.returncode == 2
    assert "cannot load model" in proc.stderr and "Traceback" not in proc.stderr

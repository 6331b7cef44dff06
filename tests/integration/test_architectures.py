"""Every architecture a user may bring, end to end on real llama.cpp and transformers: tiny GGUF
models with random weights (convert/tiny_models.py, made once per session), checked by the same
functions that write docs/ARCHITECTURES.md (runtime/compat.py). The registry models are the real
rows of the matrix (their own tests: test_oracle.py, test_through_model.py, test_batch_engine.py)."""

from __future__ import annotations

import json

import pytest

from innsteer_local.convert.tiny_models import ARCHITECTURES, QUANTS, write_tiny_model
from innsteer_local.runtime import compat

TRAINABLE = None  # filled from transformers' own list, when it is installed


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> path of its tiny model, written on first use (seeded: the same bytes every run)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            made[name] = write_tiny_model(name, folder / f"tiny-{name}.gguf", seed=0)
        return made[name]

    return get


def test_the_matrix_covers_what_users_bring():
    gguf_archs = {a.gguf_arch for a in ARCHITECTURES.values()}
    assert len(gguf_archs) >= 9 and {"qwen2moe", "qwen3moe"} & gguf_archs
    assert {a.quant for a in ARCHITECTURES.values()} == set(QUANTS)


def test_tiny_models_are_small_and_seeded(tiny, tmp_path):
    path = tiny("qwen3")
    assert path.stat().st_size < 16 << 20
    again = write_tiny_model("qwen3", tmp_path / "again.gguf", seed=0)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_runtime_row(tiny, tmp_path, name):
    """A flow attaches and l_out of its layer is visited; strength 0 and no flow are bit-identical
    to the unsteered model; a linear flow equals llama.cpp's control vector bit for bit; two
    sequences with different steering share one batch, each as it is alone."""
    row = compat.check_runtime(tiny(name), tmp_path)
    assert row["architecture"] == ARCHITECTURES[name].gguf_arch
    assert row["runtime"] == "ok", row
    assert row["cvec"] == "equal" or row["cvec"].startswith("n/a"), row
    assert row["batched"] == "ok", row


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_training_row(tiny, tmp_path, name):
    """transformers loads the GGUF, block L agrees with llama.cpp's l_out-L, and `train --pairs`
    runs two steps through the model and writes a flow the runtime loads; where transformers
    cannot load the architecture, the refusal names it."""
    pytest.importorskip("torch", reason="training needs the [train] extra")
    from innsteer_local.train.through.hf_model import supported_architectures

    arch = ARCHITECTURES[name].gguf_arch
    row = compat.check_training(tiny(name), tmp_path)
    if arch in supported_architectures():
        assert row["training"] == "ok", row
        assert row["block_error"] <= compat.BLOCK_TOLERANCE
    else:
        assert row["training"].startswith("refused") and f"'{arch}'" in row["training"], row


def test_the_shipped_matrix_matches_these_results():
    """architectures.json (what doctor and inspect read) was written by the script from checks that
    pass today: every tiny row it holds is a row this suite checks, with the same verdicts."""
    table = json.loads(compat.MATRIX.read_text())
    rows = {r["model"]: r for r in table["rows"]}
    for name in ARCHITECTURES:
        r = rows[f"tiny-{name}"]
        assert r["runtime"] == "ok" and r["batched"] == "ok", r
    assert {"smollm2-135m", "gemma3-270m"} <= set(rows)
    assert compat.support("qwen3")["level"] == "full"
    assert compat.support("granite")["level"] == "runtime"
    assert compat.support("rwkv7")["level"] == "unchecked"


def test_doctor_and_inspect_name_a_models_support_level(tiny):
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("innsteer-local")
    cli = str(cli) if cli.exists() else "innsteer-local"
    out = subprocess.run([cli, "inspect", str(tiny("qwen3"))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "architecture qwen3" in out.stdout and "support     full:" in out.stdout
    out = subprocess.run([cli, "doctor", "--json", "--model", str(tiny("granite"))], capture_output=True, text=True,
                         timeout=120)
    model = json.loads(out.stdout)["model"]
    assert model["architecture"] == "granite" and model["level"] == "runtime" and "training" in model["summary"]
    flow = subprocess.run([cli, "inspect", "honesty.gguf"], capture_output=True, text=True, timeout=120)
    assert flow.returncode == 0 and "support     full: llama" in flow.stdout, flow.stdout

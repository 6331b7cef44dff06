"""The converters a user runs from a checkout (converters/, like llama.cpp's convert_*.py), each a
thin script over innsteer_local.convert: --help, a round trip each, and an untrusted checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo

ROOT = Path(__file__).resolve().parents[2]
CONVERTERS = sorted((ROOT / "converters").glob("convert_*.py"))
MODEL = ModelInfo("SmolLM2", "llama", 576, 30)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "converters" / script), *args], capture_output=True, text=True,
                          timeout=300)


def test_every_converter_has_help():
    assert {p.name for p in CONVERTERS} >= {"convert_torch_to_flow.py", "convert_flow_to_onnx.py",
                                            "convert_flow_to_cvec.py", "convert_cvec_to_flow.py"}
    for p in CONVERTERS:
        out = run(p.name, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, (p.name, out.stderr)


def test_torch_checkpoint_to_flow_steers_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from innsteer_local.convert.torch_flow import save_checkpoint
    from innsteer_local.train.inn import InnConfig, InnFlow

    rng = np.random.default_rng(0)
    flow_t = InnFlow(rng.normal(size=576), np.abs(rng.normal(size=576)) + 0.5, rng.normal(size=576),
                     InnConfig(rank=0, blocks=2, hidden=16, seed=3))
    with torch.no_grad():
        for p in flow_t.couplings.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(flow_t, tmp_path / "phi.pt", layer=12, model=MODEL)
    out = run("convert_torch_to_flow.py", str(tmp_path / "phi.pt"), "-o", str(tmp_path / "phi.gguf"))
    assert out.returncode == 0, out.stderr
    flow = Flow.load(tmp_path / "phi.gguf")
    assert flow.layers == [12] and flow.model == MODEL
    h = rng.normal(size=(4, 576)).astype(np.float32)
    with torch.no_grad():
        want = flow_t.steer(torch.tensor(h), 1.5).numpy()
    assert np.allclose(flow.sites[0].steer(h, 1.5), want, atol=1e-4)


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"kind": "innsteer-torch-flow", "state_dict": Payload()}, tmp_path / "evil.pt")
    out = run("convert_torch_to_flow.py", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "x.gguf"))
    assert out.returncode == 1 and "not a readable torch checkpoint" in out.stderr
    assert not marker.exists() and not (tmp_path / "x.gguf").exists()


def test_control_vector_round_trip(tmp_path):
    v = np.random.default_rng(2).normal(size=576).astype(np.float32)
    Flow.linear({10: v}, MODEL, method="mean-diff").save(tmp_path / "lin.gguf")
    assert run("convert_flow_to_cvec.py", str(tmp_path / "lin.gguf"), "-o", str(tmp_path / "cvec.gguf")).returncode == 0
    back = run("convert_cvec_to_flow.py", str(tmp_path / "cvec.gguf"), "-o", str(tmp_path / "back.gguf"))
    assert back.returncode == 0, back.stderr
    assert np.allclose(Flow.load(tmp_path / "back.gguf").sites[0].delta, v)
    inn = ROOT / "models" / "flows" / "smollm2-135m" / "honesty.gguf"
    refused = run("convert_flow_to_cvec.py", str(inn), "-o", str(tmp_path / "no.gguf"))
    assert refused.returncode == 1 and "error:" in refused.stderr


def test_flow_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    inn = ROOT / "models" / "flows" / "smollm2-135m" / "honesty.gguf"
    out = run("convert_flow_to_onnx.py", str(inn), "-o", str(tmp_path / "onnx"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "onnx" / "manifest.json").is_file()

"""Training through the model on the real SmolLM2: the transformers copy of the GGUF agrees with
llama.cpp (block L's output, the steering effect of a flow on the logits), and `train` runs end to
end (the model writes its data, trains, chooses its default by generation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [train] extra")
pytest.importorskip("transformers", reason="training through the model needs the [train] extra")

from innsteer_local import Flow  # noqa: E402
from innsteer_local.runtime.prompts import chat_example  # noqa: E402
from innsteer_local.runtime import registry  # noqa: E402

LAYER = 15
CLI = str(Path(sys.executable).parent / "innsteer-local")
# documented in docs/training.md: llama.cpp runs the Q4_1 weights with quantized activations,
# transformers the dequantized float32 weights
ROW_ERROR = 0.05  # median relative difference of block L's output rows
EFFECT_COSINE = 0.9  # cosine between the steering effects on the last position's log-probabilities


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return tmp_path_factory.mktemp("torch-copies")


@pytest.fixture(scope="module")
def hf(model_path, copies):
    from innsteer_local.train.through.hf_model import HFModel

    return HFModel(model_path, LAYER, cache_dir=copies, precision="f32")  # dequantizes, then keeps a copy


def test_the_dequantized_copy_is_the_same_model(hf, model_path, copies):
    """The second load reads the copy (keyed by the GGUF's sha256), not the GGUF: same tensors."""
    from innsteer_local.runtime.registry import file_sha256
    from innsteer_local.train.through import hf_model

    folder = copies / file_sha256(model_path)[:32]
    assert (folder / "model.safetensors").is_file()
    import gguf  # the first load read the GGUF once (hf_model._gguf_read_once) and left gguf-py as it was

    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")

    def no_gguf(*args, **kwargs):
        raise AssertionError("the copy should have been used")

    real, hf_model._load_gguf = hf_model._load_gguf, no_gguf
    try:
        again = hf_model.HFModel(model_path, LAYER, cache_dir=copies, precision="f32")
    finally:
        hf_model._load_gguf = real
    want, got = hf.model.state_dict(), again.model.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_block_output_matches_llama_cpp(hf, steered):
    from innsteer_local.runtime.compat import block_error

    ex = chat_example(steered, "What is the capital of France?", "The capital of France is Paris, on the Seine.")
    assert block_error(steered, hf, LAYER, ex) <= ROW_ERROR


def test_torch_and_llama_cpp_steer_the_logits_alike(hf, steered, model_info, tmp_path):
    from innsteer_local.train.inn import InnConfig, InnFlow

    ex = chat_example(steered, "Tell me about your weekend.", "I went hiking with friends and")
    b = hf.batch([(ex.tokens, len(ex.tokens) - 1)])
    rows = hf.below(b)[0]
    flow_t = InnFlow(rows.numpy().mean(0), rows.numpy().std(0), np.zeros(model_info.n_embd), InnConfig(seed=1))
    # a seeded flow: the suite's earlier tests leave torch's global generator anywhere. Over 56
    # unseeded draws the cosine had median 0.999 and minimum 0.865 (a draw whose effect is steep
    # where the Q4_1 weights and the float32 copy differ most); one CI run drew 0.87
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow_t.couplings.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        flow_t.delta.copy_(torch.randn(model_info.n_embd, generator=gen) * 0.6)
    path = tmp_path / "f.gguf"
    Flow(model=model_info, sites=[flow_t.site(LAYER)]).save(path)

    lay = hf.layout([(ex.tokens, len(ex.tokens) - 1)], None)  # every row live

    def torch_logp(a: float) -> np.ndarray:
        with torch.no_grad():
            prefix, live = hf.place([rows], lay)
            final = hf.above(prefix, flow_t.steer(live, a), lay)[0, -1]
            return torch.log_softmax(hf.logits(final), -1).numpy()

    def cpp_logp() -> np.ndarray:
        steered.reset()
        steered.eval(ex.tokens)
        logits = np.asarray(steered.scores[len(ex.tokens) - 1], np.float64)
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()

    base_cpp = cpp_logp()
    steered.add_flow(path, strength=1.0)
    effect_cpp = cpp_logp() - base_cpp
    effect_torch = torch_logp(1.0) - torch_logp(0.0)
    top = np.argsort(-np.exp(base_cpp))[:200]  # where the probability mass is
    cos = effect_cpp[top] @ effect_torch[top] / np.linalg.norm(effect_cpp[top]) / np.linalg.norm(effect_torch[top])
    assert np.abs(effect_cpp[top]).max() > 0.5, "the flow must really move the logits"
    assert cos >= EFFECT_COSINE


def test_train_end_to_end_through_the_model(tmp_path):
    out, report = tmp_path / "r.gguf", tmp_path / "report"
    proc = subprocess.run([CLI, "train", "--behavior", "refusal", "--max-pairs", "8", "--steps", "4",
                           "--coupling-steps", "2", "-o", str(out), "--report", str(report)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flow = Flow.load(out)
    assert flow.method == "innsteer" and flow.provenance["objective"] == "model"
    assert flow.sites[0].gate is not None and len(flow.sites[0].ops) > 1
    sel = flow.provenance["selection"]
    # refusal is selective: held-out harmful and harmless prompts, replies as long as eval's
    assert sel["scorer"] == "refusal" and sel["prompts"] == 4 and sel["neutral_prompts"] == 4 and sel["tokens"] == 40
    # fluency read by eval's judge for this model (another family)
    assert sel["judge"] == registry.entry(registry.judge_for("smollm2-135m")).file
    # selective: the couplings ship, calibrated: strength 1 is a rung they were measured at
    assert sel["checkpoint_step"] == 6 and sel["phase"] == "full"
    assert flow.default_strength == 1.0 and sel["unit"] in (0.5, 1.0, 1.4, 2.0, 2.8)
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics["history"]) == 7 and 3 <= len(metrics["selection_settings"]) <= 4
    assert (report / "loss_curves.png").stat().st_size > 0 and (report / "selection.png").stat().st_size > 0
    assert "chosen by generation" in proc.stdout and "calibrated: strength 1" in proc.stdout


def test_an_always_on_pairs_file_chooses_between_the_shift_and_the_couplings(tmp_path):
    """A user's file of fixed sentences (no neutral items) with the couplings asked for
    (--coupling-steps; by default such a flow is its linear phase): the end of the linear phase and
    the end of training write held-out replies at 1 and 2, then one more rung each; the shipped flow
    is the one selection chose, calibrated to a rung it was measured at. Here the model judges its
    own fluency (--judge none)."""
    src = Path(__file__).resolve().parents[2] / "innsteer_local" / "eval" / "data" / "checks" / "space.jsonl"
    out, report = tmp_path / "space.gguf", tmp_path / "report"
    proc = subprocess.run([CLI, "train", "--pairs", str(src), "--layer", str(LAYER), "--max-pairs", "12",
                           "--steps", "3", "--coupling-steps", "2", "--judge", "none", "-o", str(out),
                           "--report", str(report)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flow = Flow.load(out)
    sel = flow.provenance["selection"]
    assert sel["neutral_prompts"] == 0 and sel["scorer"] == "contrast" and sel["judge"] == "self"
    # the whole reply is the training window: the longest reply in the file fits in it
    assert flow.provenance["hyperparameters"]["max_reply_tokens"] >= 48
    settings = json.loads((report / "metrics.json").read_text())["selection_settings"][1:]
    assert {r["phase"] for r in settings} == {"linear", "full"}
    for phase in ("linear", "full"):
        rungs = {r["strength"] for r in settings if r["phase"] == phase}
        # 1 and 2, then one rung more: above where 2 was fluent, between, or below where neither was
        assert {1.0, 2.0} <= rungs <= {0.5, 1.0, 1.4, 2.0, 2.8} and len(rungs) <= 3
    assert sel["phase"] in ("linear", "full")
    assert sel["checkpoint_step"] == {"linear": 3, "full": 5}[sel["phase"]]
    assert sel["unit"] in {r["strength"] for r in settings if r["phase"] == sel["phase"]}

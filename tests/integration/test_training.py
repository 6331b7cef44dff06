"""Training on the real model: activation collection, identity start = mean-diff, end to end, cvec interop."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from innsteer_local import Flow
from innsteer_local.flow import random_flow
from innsteer_local.runtime.native import NativeFlow
from innsteer_local.train.activations.collect import collect_dataset
from innsteer_local.train.activations.linear import linear_flow
from innsteer_local.train.data import Dataset, Pair
from innsteer_local.train.unit import mean_diff

LAYER = 12


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("innsteer-local")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def small_acts(model_path, tmp_path_factory):
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=512, verbose=False)
    ds = Dataset(name="mini-honesty", pairs=[
        Pair(positive=r, negative=r, positive_prompt="Pretend you are an honest person making statements about the world.",
             negative_prompt="Pretend you are a dishonest person making statements about the world.")
        for r in ["The Moon reflects sunlight.", "I broke the vase yesterday.", "Water boils at one hundred degrees.",
                  "I have never been to Japan.", "The report has a mistake in it.", "Bats are not blind."]])
    cache = tmp_path_factory.mktemp("acts")
    acts = collect_dataset(llm, ds, [LAYER], cache_dir=cache)
    again = collect_dataset(llm, ds, [LAYER], cache_dir=cache)
    llm.close()
    return acts, again


def test_collection_is_split_and_cached(small_acts):
    acts, again = small_acts
    assert not acts.cached and again.cached
    assert acts.pos[LAYER].shape == acts.neg[LAYER].shape and len(acts.pos[LAYER]) > 20
    assert (acts.neg_target >= 0).all(), "persona pairs share their replies token for token"
    assert len(acts.background[LAYER]) > len(acts.pos[LAYER])
    np.testing.assert_array_equal(again.pos[LAYER], acts.pos[LAYER])
    assert acts.n_tokens > 0 and acts.tokens_per_second > 0
    norms = np.linalg.norm(acts.background[LAYER], axis=1)
    assert norms.max() < 20 * np.median(norms), "the attention-sink first token must be left out"


def test_identity_innsteer_equals_mean_diff_logits(small_acts, model_info, steered, logits_of, tmp_path):
    pytest.importorskip("torch")
    from innsteer_local.train.activations.geometry import GeometryConfig, train_geometry
    from innsteer_local.train.inn import InnConfig

    acts, _ = small_acts
    a = acts
    res = train_geometry(LAYER, a.pos[LAYER], a.neg[LAYER], a.background[LAYER], a.neutral[LAYER], a.pos_pair,
                         a.neg_pair, a.neg_target, model_info, GeometryConfig(inn=InnConfig(rank=32), epochs=0))
    inn_path, md_path = tmp_path / "inn.gguf", tmp_path / "md.gguf"
    res.flow.save(inn_path)
    linear_flow("mean-diff", LAYER, a.pos[LAYER], a.neg[LAYER], a.pos_pair, a.neg_pair, model_info).save(md_path)
    tokens = steered.tokenize(b"Tell me honestly: did you read my letter?")
    st = steered.native_steerer
    st.capture(LAYER, post=False)
    base = logits_of(steered, tokens)
    rows = st.captured(LAYER)
    st.capture(LAYER, post=False, on=False)
    # the edit is carried back as a difference, so identity ops change it only by float rounding
    inn_rows, md_rows = NativeFlow(inn_path).steer(rows, 3.0), NativeFlow(md_path).steer(rows, 3.0)
    edit = np.linalg.norm(md_rows - rows, axis=1)
    assert np.all(np.linalg.norm(inn_rows - md_rows, axis=1) <= 1e-5 * edit + 1e-5 * np.linalg.norm(rows, axis=1))
    h = steered.add_flow(md_path, strength=3.0)
    md_logits = logits_of(steered, tokens)
    steered.remove_flow(h)
    steered.add_flow(inn_path, strength=3.0)
    inn_logits = logits_of(steered, tokens)
    effect = np.abs(md_logits - base).mean()
    assert effect > 0.05
    # llama.cpp quantizes activations (Q8) for the Q4_1 weights: a 1e-6 change in a row can flip a
    # rounding, and a flip early in the prompt carries on through attention, so the logits agree
    # closely rather than bit for bit. How closely is measured, not assumed: the same mean-diff
    # flow at a strength 1e-6 away moves its rows by as much as the identity ops do.
    steered.remove_flow(steered.flows[-1])
    h = steered.add_flow(md_path, strength=3.0 * (1 + 1e-6))
    nudged_logits = logits_of(steered, tokens)
    noise = np.abs(nudged_logits - md_logits).mean()
    diff = np.abs(inn_logits - md_logits).mean()
    print(f"identity INN vs mean-diff: {diff:.4f}; rounding floor {noise:.4f}; steering effect {effect:.4f}")
    assert diff <= max(0.1 * effect, 3 * noise)
    assert diff <= 0.5 * effect
    assert (inn_logits.argmax(1) == md_logits.argmax(1)).all()


def test_baselines_have_comparable_strength(small_acts, model_info):
    a = small_acts[0]
    pos, neg = a.pos[LAYER], a.neg[LAYER]
    v = mean_diff(pos, neg)
    for method in ("pca", "affine-ot"):
        site = linear_flow(method, LAYER, pos, neg, a.pos_pair, a.neg_pair, model_info).sites[0]
        move = np.linalg.norm(site.steer(neg, 1.0) - neg, axis=1).mean()
        assert abs(move - np.linalg.norm(v)) / np.linalg.norm(v) < 1e-3, method
    pca = linear_flow("pca", LAYER, pos, neg, a.pos_pair, a.neg_pair, model_info).sites[0].delta
    assert pos.mean(0) @ pca > neg.mean(0) @ pca  # sign fixed: positives project higher


def test_train_geometry_objective_end_to_end(tmp_path):
    """The activation-space objective, kept under --objective geometry (no transformers needed)."""
    pytest.importorskip("torch")
    out, report = tmp_path / "honesty.gguf", tmp_path / "report"
    proc = cli("train", "--behavior", "honesty", "--layer", "15", "--method", "innsteer", "--objective", "geometry",
               "--epochs", "12", "--no-select", "-o", str(out), "--report", str(report))
    assert "held-out raw-space probe accuracy" in proc.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    # the model-written honesty replies are separable at layer 15; whether phi's latent separates
    # them better is data-dependent (tests/integration/test_training_synthetic.py checks it where
    # it must hold)
    assert metrics["raw_probe_accuracy"] > 0.5 and 0.0 <= metrics["latent_probe_accuracy"] <= 1.0
    assert metrics["invertibility_max_rel_error"] < 1e-4
    for png in ("loss_curves.png", "geometry.png"):
        assert (report / png).stat().st_size > 10_000
    d = json.loads(cli("inspect", str(out), "--json").stdout)
    assert d["method"] == "innsteer" and d["layers"] == [15]
    assert d["provenance"]["data_sha256"] and "held_out" in d["provenance"]
    assert d["provenance"]["objective"] == "geometry"
    assert [o["kind"] for o in d["sites"][0]["ops"]][:3] == ["affine", "subspace", "affine"]
    gen = json.loads(cli("generate", "-p", "Did you break the window?", "-n", "16", "--flow", f"{out}:4", "--json").stdout)
    assert gen["text"] and gen["steering"]["rows_steered"] > 0


def test_train_mean_diff_auto_layer_and_cvec_roundtrip(tmp_path, model_path):
    out = tmp_path / "md.gguf"
    proc = cli("train", "--behavior", "positivity", "--layer", "auto", "--method", "mean-diff", "-o", str(out))
    assert "<- chosen" in proc.stderr
    flow = Flow.load(out)
    layer = flow.layers[0]
    cvec = tmp_path / "md.cvec.gguf"
    cli("export", str(out), "--to", "cvec", "-o", str(cvec), "--strength", "2.5")
    back = tmp_path / "back.gguf"
    cli("import-cvec", str(cvec), "-o", str(back), "--model", str(model_path))
    again = Flow.load(back)
    assert again.layers == [layer]
    np.testing.assert_allclose(again.sites[0].delta, np.float32(2.5) * flow.sites[0].delta, rtol=0, atol=0)
    # llama.cpp applies direction.L exactly where the flow applies layer L
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"My day was")
    data = np.zeros((llm._model.n_layer() if hasattr(llm._model, "n_layer") else 30, flow.model.n_embd), np.float32)
    data[layer - 1] = again.sites[0].delta
    llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                     flow.model.n_embd, 1, data.shape[0] - 1)
    llm.eval(tokens)
    oracle = np.array(llm.scores[: len(tokens)])
    llm.close()
    from innsteer_local.runtime.steered import SteeredLlama

    s = SteeredLlama(str(model_path), n_ctx=256, logits_all=True, verbose=False)
    s.add_flow(out, strength=2.5)
    s.eval(tokens)
    assert np.abs(np.array(s.scores[: len(tokens)]) - oracle).max() <= 1e-5
    s.close()


def test_nonlinear_flow_cannot_become_a_cvec(tmp_path, model_info):
    p = tmp_path / "inn.gguf"
    random_flow(model_info, [5], rank=8, blocks=1, hidden=8).save(p)
    proc = cli("export", str(p), "--to", "cvec", "-o", str(tmp_path / "x.gguf"), check=False)
    assert proc.returncode == 2 and "can only add a fixed vector" in proc.stderr

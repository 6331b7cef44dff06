"""Selection's fluency judge and its memo of unsteered replies, without a model: train and eval
pick the judge the same way (another family, never the model itself), and the memo keeps replies
per model, judge, chat mode and reply length, and survives damage by forgetting."""

from __future__ import annotations

from pathlib import Path

import pytest

from innsteer_local.errors import ModelError
from innsteer_local.runtime import registry
from innsteer_local.train.held_out import UnsteeredMemo


def test_each_registry_model_is_judged_by_the_other_family():
    assert registry.judge_for("smollm2-135m") == "gemma3-270m"
    assert registry.judge_for("gemma3-270m") == "smollm2-135m"
    assert registry.judge_for(None) == registry.JUDGES[""]  # a user's own model


def test_resolve_judge_reads_none_and_refuses_the_model_itself(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert registry.resolve_judge("none", model, None) is None
    assert registry.resolve_judge("NONE", model, "smollm2-135m") is None
    with pytest.raises(ModelError, match="another model than the one steered"):
        registry.resolve_judge(str(model), model, None)
    other = tmp_path / "judge.gguf"
    other.write_bytes(b"GGUF!")
    assert registry.resolve_judge(str(other), model, None) == other
    with pytest.raises(ModelError, match="not found"):
        registry.resolve_judge(str(tmp_path / "missing.gguf"), model, None)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path / "cache"))
    paths = {}
    for name in ("model", "judge", "other"):
        paths[name] = tmp_path / f"{name}.gguf"
        paths[name].write_bytes(name.encode() * 100)
    return paths


def test_the_memo_keeps_replies_between_runs_for_the_same_models_only(tmp_path, files):
    root = tmp_path / "memo"
    memo = UnsteeredMemo.for_models(root, str(files["model"]), str(files["judge"]), True, 40)
    assert memo.get("How do tides work?") is None
    memo.put({"How do tides work?": {"text": "The moon pulls.", "ppl": 9.5},
              "Hello?": {"text": "", "ppl": None}})
    again = UnsteeredMemo.for_models(root, str(files["model"]), str(files["judge"]), True, 40)
    assert again.get("How do tides work?") == {"text": "The moon pulls.", "ppl": 9.5}
    assert again.get("Hello?") == {"text": "", "ppl": None}
    # another judge, model, reply length or chat mode: other replies or other perplexities
    for other in (UnsteeredMemo.for_models(root, str(files["model"]), str(files["other"]), True, 40),
                  UnsteeredMemo.for_models(root, str(files["other"]), str(files["judge"]), True, 40),
                  UnsteeredMemo.for_models(root, str(files["model"]), None, True, 40),
                  UnsteeredMemo.for_models(root, str(files["model"]), str(files["judge"]), True, 32),
                  UnsteeredMemo.for_models(root, str(files["model"]), str(files["judge"]), False, 40)):
        assert other.get("How do tides work?") is None


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"How do tides work?": {"text": 3, "ppl": 1}}',
                                    b'{"How do tides work?": {"text": "x", "ppl": "high"}}'])
def test_a_damaged_memo_is_forgotten_not_believed(tmp_path, files, damage):
    root = tmp_path / "memo"
    memo = UnsteeredMemo.for_models(root, str(files["model"]), None, True, 40)
    memo.put({"seed": {"text": "y", "ppl": 2.0}})
    Path(memo.path).write_bytes(damage)
    again = UnsteeredMemo.for_models(root, str(files["model"]), None, True, 40)
    assert again.get("How do tides work?") is None
    again.put({"How do tides work?": {"text": "fine", "ppl": 3.0}})  # and it is written afresh
    assert UnsteeredMemo.for_models(root, str(files["model"]), None, True, 40).get("How do tides work?")["ppl"] == 3.0


def test_selection_prompts_keep_a_behaviour_selective_when_no_neutral_item_was_held_out():
    """Data with neutral items is selective even where too few of them were held out: selection
    then checks the last neutral items' prompts, and asks as many behaviour prompts."""
    import numpy as np

    from innsteer_local import Flow, ModelInfo
    from innsteer_local.train.choose import _prompts
    from innsteer_local.train.data import Dataset, Neutral, Pair
    from innsteer_local.train.outcome import TrainOutcome

    pairs = [Pair(f"no {i}", f"yes {i}", f"bad request {i}", f"bad request {i}") for i in range(20)]
    neutral = [Neutral(f"harmless request {i}", f"sure {i}") for i in range(5)]
    flow = Flow.linear({1: np.ones(8, np.float32)}, ModelInfo("m", "llama", 8, 4))
    out = TrainOutcome(flow=flow, layer=1, data=Dataset("d", pairs, neutral),
                       held_out=([f"bad request {i}" for i in range(16, 20)] + ["bad request 15"] * 4, []))
    prompts, kept = _prompts(out, None, n=6, n_selective=4)
    assert kept == [f"harmless request {i}" for i in range(1, 5)] and len(prompts) == 4
    always_on = TrainOutcome(flow=flow, layer=1, data=Dataset("d", pairs, []), held_out=(out.held_out[0], []))
    prompts, kept = _prompts(always_on, None, n=6, n_selective=4)
    assert kept == [] and len(prompts) == 6

"""Selection reads fluency as eval does: with eval's judge (another family) on the reply alone,
and it keeps the unsteered model's held-out replies between runs (train/held_out.py)."""

from __future__ import annotations

import json

import pytest

from innsteer_local.runtime import registry
from innsteer_local.runtime.jobs import Driver, alone_score, load_judge, open_engine, perplexity
from innsteer_local.train import held_out

PROMPTS = ["How do I keep bananas from going brown?", "Name a good book for a long train ride."]
TOKENS = 16


@pytest.fixture(scope="module")
def llm(model_path):
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=512, seed=0, verbose=False)
    yield llm
    llm.close()


def judged(path, text: str) -> float:
    """The judge's perplexity of the text alone, scored on its own."""
    model = load_judge(str(path), 512)
    engine = open_engine(model, 512, 1)
    try:
        driver = Driver(engine)
        job = driver.submit(engine, alone_score(engine, text))
        driver.run()
        return perplexity(job)
    finally:
        engine.close()
        model.close()


def test_the_judge_reads_the_replies_and_the_memo_keeps_them(llm, model_path, tmp_path):
    judge_path = registry.resolve_judge(None, model_path, "smollm2-135m")
    assert judge_path is not None and judge_path.name == registry.entry("gemma3-270m").file
    judge = held_out.Judge(llm, len, chat=True, max_tokens=TOKENS, judge_path=str(judge_path), memo_dir=tmp_path)
    try:
        (raw,) = judge.run(PROMPTS, [], [(None, 0.0)])
    finally:
        judge.close()
    assert all(raw["texts"]) and len(raw["ppl"]) == 2
    for text, ppl in zip(raw["texts"], raw["ppl"]):
        assert ppl == pytest.approx(judged(judge_path, text), rel=1e-3)
    (memo,) = tmp_path.glob("*.json")
    kept = json.loads(memo.read_text())
    assert {p: kept[p]["text"] for p in PROMPTS} == dict(zip(PROMPTS, raw["texts"]))

    # a later run reads the unsteered replies back instead of writing them again (a planted reply
    # shows it), and still generates every steered setting
    kept[PROMPTS[0]] = {"text": "Planted reply.", "ppl": 7.5}
    memo.write_text(json.dumps(kept))
    flow_path = next(iter(registry.shipped_flows("smollm2-135m").values()))
    again = held_out.Judge(llm, len, chat=True, max_tokens=TOKENS, judge_path=str(judge_path), memo_dir=tmp_path)
    try:
        flow = again.add_candidate(flow_path)
        base, steered = again.run(PROMPTS, [], [(None, 0.0), (flow, 1.0)])
    finally:
        again.close()
    assert base["texts"] == ["Planted reply.", raw["texts"][1]] and base["ppl"][0] == 7.5
    assert base["scores"][0] == len("Planted reply.")  # scored as if written now
    assert all(steered["texts"]) and "Planted reply." not in steered["texts"]

"""One prompt rule and one cut of a reply for everything that generates: eval's answers, the
training replies (train/rollouts.py) and selection's held-out replies (train/held_out.py) ask a
base-style model (no chat template) the same text and cut its reply at the end of its turn."""

from __future__ import annotations

import pytest

from innsteer_local.eval.experiment import Experiment
from innsteer_local.eval.runner import EvalConfig, Runner, answer_job
from innsteer_local.eval.tasks import Item, Task
from innsteer_local.runtime.engine import Job, Sampling
from innsteer_local.runtime.jobs import open_engine
from innsteer_local.runtime.prompts import BASE_TURN_END, finish_reply, prompt_text
from innsteer_local.train import held_out, rollouts

# a transcript in the prompt: asked it as a plain transcript, the model answers ("Red.") and then
# writes the user's next turn
PROMPT = "Hi\nAssistant: Hello!\nUser: Name a colour.\nAssistant: Blue.\nUser: Another one?"
TOKENS = 48


@pytest.fixture(scope="module")
def llm(model_path):
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=512, seed=0, verbose=False, n_threads=1, n_threads_batch=1)
    yield llm
    llm.close()


def raw_continuation(llm, repeat_penalty: float) -> str:
    """The model's greedy continuation of the transcript with no stop string at all."""
    engine = open_engine(llm, 512, n_parallel=1)
    try:
        tokens = llm.tokenize(prompt_text(llm, PROMPT, chat=False).encode(), add_bos=True, special=False)
        job = engine.run([Job(tokens, Sampling(max_tokens=TOKENS, repeat_penalty=repeat_penalty))])[0]
        return job.text
    finally:
        engine.close()


def test_eval_rollouts_and_selection_ask_the_same_text(llm):
    engine = open_engine(llm, 512, n_parallel=3)
    try:
        jobs = {"eval": answer_job(engine, Item(id="0", prompt=PROMPT), EvalConfig(max_tokens=TOKENS), [], chat=False),
                "rollouts": rollouts.reply_job(engine, rollouts.Request(PROMPT, max_tokens=TOKENS), chat=False),
                "selection": held_out.reply_job(engine, PROMPT, False, TOKENS)}
        asked = {k: llm.detokenize(j.prompt_tokens).decode() for k, j in jobs.items()}
        assert len({tuple(j.prompt_tokens) for j in jobs.values()}) == 1, asked
        assert asked["eval"].endswith(f"User: {PROMPT}\nAssistant:")  # no space: the reply's first token has it
        assert all(BASE_TURN_END in j.sampling.stop for j in jobs.values())
        assert rollouts.asked(llm, rollouts.Request(PROMPT), chat=False) == f"User: {PROMPT}\nAssistant:"
        # an instruction before the prompt and a forced opening: the same rule for training replies
        opened = rollouts.reply_job(engine, rollouts.Request(PROMPT, system="Be brief.", opening="Sure,"), chat=False)
        assert llm.detokenize(opened.prompt_tokens).decode().endswith(f"User: Be brief. {PROMPT}\nAssistant: Sure,")
        opened.text = " red.\nUser: thanks"
        assert opened.reply == "Sure, red."
    finally:
        engine.close()


def test_eval_rollouts_and_selection_cut_the_reply_alike(llm, model_path, tmp_path):
    plain, penalised = raw_continuation(llm, 1.0), raw_continuation(llm, rollouts.REPEAT_PENALTY)
    for raw in (plain, penalised):  # the test means something only if the model goes on past its turn
        assert BASE_TURN_END in raw and raw.split(BASE_TURN_END)[0].strip(), raw
    expected = finish_reply(plain, chat=False)
    assert BASE_TURN_END not in expected and expected == plain.split(BASE_TURN_END)[0].strip()

    # eval: a one-item experiment through the real runner (its record's text)
    runner = Runner(str(model_path), None, tmp_path / "eval", EvalConfig(max_tokens=TOKENS, chat=False), threads=1)
    try:
        task = Task(id="rule", kind="generate", items=[Item(id="0", prompt=PROMPT)], scorer="refusal")
        runner.run(Experiment("rule", task, [], [0.0]))
        (record,) = runner.records.rows.values()
    finally:
        runner.close()
    assert record["text"] == expected

    # selection: the unsteered setting's held-out replies
    judge = held_out.Judge(llm, lambda text: 0.0, chat=False, max_tokens=TOKENS)
    try:
        (raw,) = judge.run([PROMPT], [], [(None, 0.0)])
    finally:
        judge.close()
    assert raw["texts"] == [expected]

    # training replies: the same cut (their decoding adds the chat default's repetition penalty)
    (reply,) = rollouts.replies(llm, [rollouts.Request(PROMPT, max_tokens=TOKENS)], chat=False)
    assert reply == finish_reply(penalised, chat=False)
    assert BASE_TURN_END not in reply and not reply.startswith(" ")


def test_reply_cache_does_not_reuse_replies_of_the_old_rule(model_path, tmp_path):
    import hashlib
    import json
    from pathlib import Path

    cache = rollouts.ReplyCache(tmp_path, str(model_path))
    st = Path(model_path).stat()
    # the file and the keys replies were cached under before the one rule (no version tag)
    old_key = json.dumps([str(Path(model_path).resolve()), st.st_size, st.st_mtime_ns, ""])
    old_file = tmp_path / f"replies-{hashlib.sha256(old_key.encode()).hexdigest()[:20]}.json"
    req = rollouts.Request(PROMPT)
    old_entry = json.dumps([req.prompt, req.system, req.opening, req.max_tokens, rollouts.REPEAT_PENALTY])
    assert cache.path != old_file and rollouts.ReplyCache.key(req) != old_entry
    old_file.write_text(json.dumps({old_entry: "an old reply"}))
    assert rollouts.ReplyCache(tmp_path, str(model_path)).replies == {}
    cache.replies[rollouts.ReplyCache.key(req)] = "a reply"
    cache.save()
    assert rollouts.ReplyCache(tmp_path, str(model_path)).replies == {rollouts.ReplyCache.key(req): "a reply"}

"""Evaluation metrics on hand-made cases with known answers, and perplexity against llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innsteer_local.measure import metrics


def test_perplexity_matches_llama_cpp_logprobs(steered):
    """Log-probabilities of a text from one pass equal the ones llama-cpp-python reports with
    echo=True for the same tokens (it aligns them after a leading BOS, so the tokens start with one)."""
    bos = steered.detokenize([steered.token_bos()], special=True).decode()
    prompt = bos + "The capital of France is Paris, and the capital of Italy is Rome."
    tokens = steered.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens[0] == steered.token_bos()
    out = steered.create_completion(prompt, max_tokens=1, logprobs=1, echo=True, temperature=0.0)
    theirs = np.asarray(out["choices"][0]["logprobs"]["token_logprobs"][1 : len(tokens) - 1], np.float64)
    steered.reset()
    steered.eval(tokens)
    ours = metrics.token_logprobs(np.asarray(steered.scores[: len(tokens)]), tokens, start=2)
    assert len(ours) == len(theirs) >= 12
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert metrics.perplexity(ours) == pytest.approx(math.exp(-theirs.mean()), rel=1e-4)


def test_reply_logprobs_score_only_the_reply(steered, logits_of):
    """The engine's scoring jobs (every perplexity and log-likelihood of eval and selection) give
    log p of the reply tokens only, equal to one plain llama.cpp pass, batched or not."""
    from innsteer_local.runtime.jobs import alone_score, open_engine, perplexity, reply_score
    from innsteer_local.runtime.prompts import reply_example

    q = "What is the capital of France?"
    engine = open_engine(steered, 256, n_parallel=4)
    try:
        for chat in (True, False):
            ex = reply_example(steered, q, "Paris.", chat)
            ref = metrics.token_logprobs(logits_of(steered, ex.tokens), ex.tokens, ex.start)
            alone = engine.run([engine.score(ex)])[0]
            # batched behind another sequence: one KV stream each, so the same numbers
            other, batched = engine.run([engine.score(reply_example(steered, "Hi", "Hello there, friend.", chat)),
                                         engine.score(ex)])
            assert 1 <= len(alone.logprobs) <= 4 and np.all(np.asarray(alone.logprobs) <= 0)
            np.testing.assert_allclose(alone.logprobs, ref, atol=1e-4)
            np.testing.assert_allclose(batched.logprobs, ref, atol=1e-4)
        likely = reply_score(engine, q, "The capital of France is Paris.", True)
        unlikely = reply_score(engine, q, "Purple elephants sing soup tomorrow.", True)
        engine.run([likely, unlikely])
        assert perplexity(likely) < perplexity(unlikely)
        assert reply_score(engine, "Hi", "  ", True) is None and math.isnan(perplexity(None))
        # a reply alone: plain text, stripped, every token after BOS
        alone_job = alone_score(engine, "  Paris is the capital.\n")
        assert alone_job.prompt_tokens == steered.tokenize(b"Paris is the capital.", add_bos=True, special=False)
        assert alone_job.score_from == 1
        assert alone_score(engine, " ") is None
    finally:
        engine.close()

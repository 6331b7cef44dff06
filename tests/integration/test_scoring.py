"""Evaluation metrics on hand-made cases with known answers, and perplexity against llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innsteer_local.eval import metrics


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


def test_reply_logprobs_score_only_the_reply(steered):
    from innsteer_local.eval.runner import Scorer, example_logprobs
    from innsteer_local.runtime.prompts import reply_example

    for chat in (True, False):
        ex = reply_example(steered, "What is the capital of France?", "Paris.", chat)
        lp = example_logprobs(steered, ex)
        assert 1 <= len(lp) <= 4 and np.all(lp <= 0)
    scorer = Scorer.__new__(Scorer)
    scorer.llm, scorer.chat = steered, True
    likely = scorer.reply_perplexity("What is the capital of France?", "The capital of France is Paris.")
    unlikely = scorer.reply_perplexity("What is the capital of France?", "Purple elephants sing soup tomorrow.")
    assert likely < unlikely
    assert math.isnan(scorer.reply_perplexity("Hi", "  "))

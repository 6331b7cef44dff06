"""Many sequences in one llama_decode, each with its own steering (runtime/engine.py and the
native slots): every row of the steered layer is checked against the NumPy reference of its own
sequence's steering, under both ways llama.cpp splits a multi-sequence batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from innsteer_local import Flow
from innsteer_local.flow import random_flow as make_random_flow
from innsteer_local.runtime.engine import Engine, Sampling, Steer

LAYER = 10
PROMPTS = ["Once upon a time, in a small village by the sea,", "The capital of France is",
           "Write one sentence about the moon.", "Name three colours of the rainbow and say which you like best.",
           "Why is the sky blue?", "What should I cook tonight?"]


@pytest.fixture(scope="module")
def llm(model_path):
    from innsteer_local.runtime.steered import SteeredLlama

    llm = SteeredLlama(str(model_path), n_ctx=512, seed=0, verbose=False, n_threads=2, n_threads_batch=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def flows(llm, model_info, tmp_path_factory):
    """Two different nonlinear flows at LAYER, normalised on real activations."""
    st = llm.native_steerer
    st.capture(LAYER)
    llm.reset()
    llm.eval(llm.tokenize(" ".join(PROMPTS).encode()))
    rows = st.captured(LAYER)
    st.capture(LAYER, on=False)
    st.clear_captured()
    out = {}
    for name, seed in (("a", 3), ("b", 7)):
        path = tmp_path_factory.mktemp("flows") / f"{name}.gguf"
        make_random_flow(model_info, [LAYER], rank=32, blocks=2, hidden=64, seed=seed,
                         mean=rows.mean(0), std=rows.std(0)).save(path)
        out[name] = path
    return out


def settings(engine, flows):
    """none, A at two strengths, B, A+B, and none again: neighbours always differ."""
    a, b = engine.add_flow(flows["a"]), engine.add_flow(flows["b"])
    return [[], [Steer(a, 0.8)], [Steer(a, -0.5)], [Steer(b, 0.6)], [Steer(a, 0.4), Steer(b, 0.3)], []]


def run_captured(llm, flows, unified: bool, max_tokens: int = 5):
    engine = Engine(llm, n_parallel=len(PROMPTS), n_ctx=256, unified=unified)
    try:
        steer = settings(engine, flows)
        st = engine.native_steerer
        st.capture(LAYER, post=False)
        st.capture(LAYER, post=True)
        engine.trace = []
        jobs = [engine.reply(p, sampling=Sampling(max_tokens=max_tokens), steering=s) for p, s in zip(PROMPTS, steer)]
        engine.run(jobs)
        before, after = st.captured(LAYER, post=False), st.captured(LAYER, post=True)
        job_of_seq = {j.seq_id: k for k, j in enumerate(jobs)}
        seq_of_row = np.array([job_of_seq[q] for q in np.concatenate(engine.trace)])
        return jobs, steer, before, after, seq_of_row, engine.steps
    finally:
        engine.close()


def reference(flows, steering, rows: np.ndarray) -> np.ndarray:
    out = rows.astype(np.float32)
    for s in steering:  # flows compose in attach order (a before b)
        out = Flow.load(flows[s.flow.path.split("/")[-1][0]]).site(LAYER).steer(out, s.strength)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def check_rows(flows, jobs, steer, before, after, row_seq):
    """row_seq: the sequence id (job index) of every captured row."""
    assert before.shape == after.shape and len(row_seq) == len(before)
    for k, s in enumerate(steer):
        mine = row_seq == k
        assert mine.sum() > 0
        if not s:
            assert np.array_equal(after[mine], before[mine]), f"sequence {k} is unsteered: its rows must not change"
            continue
        ref = reference(flows, s, before[mine])
        assert rel(after[mine], before[mine]).min() > 0.01, f"sequence {k}: the flow must move every row"
        assert rel(after[mine], ref).max() <= 1e-4, f"sequence {k}: rows differ from its own steering's reference"


def test_rows_follow_their_own_sequence_simple_split(llm, flows):
    jobs, steer, before, after, seq_of_row, steps = run_captured(llm, flows, unified=True)
    assert steps >= 4, "prompt and decode steps"
    # the simple split keeps batch order: row i is the i-th token the engine put in the batches
    check_rows(flows, jobs, steer, before, after, seq_of_row)
    # off by one row, the check must fail (it is able to catch a wrong map)
    with pytest.raises(AssertionError):
        check_rows(flows, jobs, steer, before, after, np.roll(seq_of_row, 1))


def test_rows_follow_their_own_sequence_equal_split(llm, flows):
    """One KV stream per sequence: llama.cpp reorders each ubatch sequence by sequence. Rows are
    matched to sequences by their pre-steering values against the simple-split run (the same
    tokens; only rounding differs). Rows that several sequences share (BOS, the chat template's
    system prompt) must be steered once by each of those sequences' own settings."""
    _, _, ref_before, _, ref_seq, _ = run_captured(llm, flows, unified=True)
    jobs, steer, before, after, _, _ = run_captured(llm, flows, unified=False)
    assert len(before) == len(ref_before)
    # decode rows differ by up to ~2 % between the two KV layouts (rounding through ten layers);
    # rows of different tokens or sequences differ by far more
    close = rel(before[:, None, :], ref_before[None, :, :]) < 5e-2
    assert close.any(1).all(), "every row must be one of the simple-split run's rows"
    owners = [sorted(set(ref_seq[close[i]])) for i in range(len(before))]
    single = np.array([len(o) == 1 for o in owners])
    assert single.sum() >= 8 * len(PROMPTS), "each sequence has rows of its own"
    check_rows(flows, jobs, steer, before[single], after[single], np.array([o[0] for o in owners])[single])
    # shared rows: group them by the first simple-split row they equal; each group needs a
    # one-to-one match between its rows and its sequences' steering
    groups: dict[int, list[int]] = {}
    for i in np.where(~single)[0]:
        groups.setdefault(int(np.argmax(close[i])), []).append(int(i))
    assert groups, "the test prompts share a prefix"
    for rows in groups.values():
        seqs = owners[rows[0]]
        assert len(rows) == len(seqs)
        fits = [[bool(rel(after[r:r + 1], reference(flows, steer[k], before[r:r + 1]))[0] <= 1e-4) for k in seqs]
                for r in rows]
        assert any(all(fits[a][b] for a, b in enumerate(perm)) for perm in itertools.permutations(range(len(seqs)))), \
            f"rows {rows} are not steered once by each of sequences {seqs}"


def test_per_sequence_stats_in_one_batch(llm, flows):
    engine = Engine(llm, n_parallel=len(PROMPTS), n_ctx=256)
    try:
        steer = settings(engine, flows)
        engine.trace = []
        jobs = [engine.reply(p, sampling=Sampling(max_tokens=8), steering=s) for p, s in zip(PROMPTS, steer)]
        engine.run(jobs)
        job_of_seq = {j.seq_id: k for k, j in enumerate(jobs)}
        fed = np.bincount([job_of_seq[q] for q in np.concatenate(engine.trace)], minlength=len(PROMPTS))
        assert engine.steps > 1 and max(len(t) for t in engine.trace) > len(PROMPTS)
        for k, (job, s) in enumerate(zip(jobs, steer)):
            assert job.stats["tokens_evaluated"] == fed[k] > 0
            # one steered row per evaluated token and flow site; none for the unsteered
            assert job.stats["rows_steered"] == len(s) * fed[k], (k, job.stats)
            assert job.stats["rows_rejected_nonfinite"] == 0
    finally:
        engine.close()


def test_alone_and_in_a_mixed_batch_agree(llm, flows):
    """The same request alone and among others: identical statistics; texts compared and reported
    (llama.cpp's kernels are not batch-invariant, so greedy texts may part after a near tie)."""
    engine = Engine(llm, n_parallel=len(PROMPTS), n_ctx=256)
    try:
        steer = settings(engine, flows)
        mixed = [engine.reply(p, sampling=Sampling(max_tokens=12), steering=s) for p, s in zip(PROMPTS, steer)]
        engine.run(mixed)
        same = 0
        for k, (p, s) in enumerate(zip(PROMPTS, steer)):
            alone = engine.run([engine.reply(p, sampling=Sampling(max_tokens=12), steering=s)])[0]
            if alone.tokens == mixed[k].tokens:
                same += 1
                assert alone.stats == mixed[k].stats
            else:  # a different reply length changes the counts; the rule does not
                assert alone.stats["rows_steered"] == len(s) * alone.stats["tokens_evaluated"]
        print(f"greedy texts identical alone and batched: {same}/{len(PROMPTS)}")
    finally:
        engine.close()


def test_gates_apply_per_row(llm):
    """One gated flow, three gate modes and no steering in one batch: each row gets its own
    sequence's gate (the kernel computes gates per row)."""
    from innsteer_local.runtime import registry

    path = registry.shipped_flows("smollm2-135m")["refusal"]
    site = Flow.load(path).site(15)
    engine = Engine(llm, n_parallel=4, n_ctx=256, unified=True)  # the simple split: rows in batch order
    try:
        flow = engine.add_flow(path)
        assert flow.info.has_gate
        gates = ["off", "target", "density", None]
        st = engine.native_steerer
        st.capture(15, post=False)
        st.capture(15, post=True)
        engine.trace = []
        prompt = "How do I pick a lock to get into my neighbour's house?"
        jobs = [engine.reply(prompt, sampling=Sampling(max_tokens=4),
                             steering=[] if g is None else [Steer(flow, 1.0, g)]) for g in gates]
        engine.run(jobs)
        before, after = st.captured(15, post=False), st.captured(15, post=True)
        job_of_seq = {j.seq_id: k for k, j in enumerate(jobs)}
        row_job = np.array([job_of_seq[q] for q in np.concatenate(engine.trace)])
        results = {}
        for k, g in enumerate(gates):
            mine = row_job == k
            if g is None:
                assert np.array_equal(after[mine], before[mine])
                continue
            ref = site.steer(before[mine], 1.0, gate=g).astype(np.float32)
            assert rel(after[mine], ref).max() <= 1e-4, g
            results[g] = after[mine][: len(jobs[k].prompt_tokens)]  # the same prompt in every sequence
        # the gates really differ on these rows, so a row given another sequence's gate would fail
        assert rel(results["target"], results["off"]).max() > 1e-3
        assert rel(results["density"], results["off"]).max() > 1e-3
    finally:
        engine.close()


def test_graph_path_takes_batches_whose_rows_share_their_steering(llm, flows):
    """ggml's CPU backend stands in for a GPU: a ubatch whose rows all carry the same steering goes
    through the flow's ggml graph, a mixed one through the host kernel; both match the reference."""
    engine = Engine(llm, n_parallel=4, n_ctx=256, unified=True)  # the simple split: rows in batch order
    try:
        a = engine.add_flow(flows["a"])
        st = engine.native_steerer
        st.set_path("cpu-graph", min_rows=1)
        st.capture(LAYER, post=False)
        st.capture(LAYER, post=True)
        same = [engine.reply(p, sampling=Sampling(max_tokens=3), steering=[Steer(a, 0.7)]) for p in PROMPTS[:4]]
        engine.run(same)
        assert st.rows_on_device > 0, "uniform batches must take the graph path"
        before, after = st.captured(LAYER, post=False), st.captured(LAYER, post=True)
        ref = Flow.load(flows["a"]).site(LAYER).steer(before, 0.7)
        assert rel(after, ref).max() <= 1e-4
        assert all(j.stats["rows_steered"] == j.stats["tokens_evaluated"] for j in same)
        st.clear_captured()
        on_device = st.rows_on_device
        engine.trace = []
        mixed = [engine.reply(p, sampling=Sampling(max_tokens=3), steering=[Steer(a, 0.7)] if k % 2 else [])
                 for k, p in enumerate(PROMPTS[:4])]
        engine.run(mixed)
        assert st.rows_on_device == on_device, "mixed batches take the host kernel"
        before, after = st.captured(LAYER, post=False), st.captured(LAYER, post=True)
        job_of_seq = {j.seq_id: k for k, j in enumerate(mixed)}
        row_job = np.array([job_of_seq[q] for q in np.concatenate(engine.trace)])
        steered = row_job % 2 == 1
        assert np.array_equal(after[~steered], before[~steered])
        assert rel(after[steered], Flow.load(flows["a"]).site(LAYER).steer(before[steered], 0.7)).max() <= 1e-4
    finally:
        engine.close()

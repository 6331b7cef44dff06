"""What eval, training data and selection run on the engine (runtime/engine.py), written once:
engines sized for batch work, the scoring jobs behind every perplexity and log-likelihood (a reply
after its prompt, a text alone), the KL between two teacher-forced passes, and a driver that steps
one or more engines on this thread and hands each finished job to a follow-up (so a reply's
scoring starts as soon as the reply is written, and results stream out in a fixed order).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .engine import Engine, Job, Steer
from .prompts import Example, reply_example

# sequences decoded together by batch work (eval, training data, selection)
BATCH_PARALLEL = 16


def open_engine(llm: Any, n_ctx: int, n_parallel: int = BATCH_PARALLEL, n_jobs: Optional[int] = None,
                unified: bool = False) -> Engine:
    """An engine over llm for batch work: n_parallel sequences of n_ctx tokens each (fewer when
    there are only n_jobs jobs; one on architectures with recurrent state, which llama.cpp cannot
    steer per sequence in one batch).

    One KV stream per sequence (unified=False), not one shared buffer: each sequence then attends
    over its own cells exactly as it would alone, so a batched score equals the score of the text
    alone and batched greedy text nearly always equals the text alone (a unified buffer changed
    log-probabilities by up to 0.09 nats and half of the greedy replies on smollm2-135m), and on
    CPU it is faster too (no attention over the other sequences' masked cells)."""
    import llama_cpp

    model = llm._model.model
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        n_parallel = 1
    if n_jobs is not None:
        n_parallel = max(1, min(n_parallel, n_jobs))
    return Engine(llm, n_parallel=n_parallel, n_ctx=int(n_ctx), unified=unified)


def load_judge(path: str, n_ctx: int, n_threads: Optional[int] = None) -> Any:
    """The fluency judge (often a base model of another family: it reads plain text) as a plain
    llama.cpp model, quietly."""
    import os

    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    n = n_threads or os.cpu_count() or 1
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs some notices even when not verbose
        return Llama(str(path), n_ctx=n_ctx, verbose=False, seed=0, n_threads=n, n_threads_batch=n)


def fit(example: Example, room: int) -> Example:
    """The example within room tokens: keeps the end (the completion is what is scored)."""
    if len(example.tokens) <= room:
        return example
    drop = len(example.tokens) - room
    return Example(tokens=example.tokens[drop:], start=max(1, example.start - drop))


def reply_score(engine: Engine, prompt: str, reply: str, chat: bool, steering: Iterable[Steer] = (),
                keep_dists: bool = False) -> Optional[Job]:
    """A job scoring the reply's tokens after the prompt as the model is asked it
    (prompts.reply_example); None for an empty reply."""
    if not reply.strip():
        return None
    ex = fit(reply_example(engine.llm, prompt, reply, chat), engine.n_ctx_seq)
    return engine.score(ex, steering, keep_dists=keep_dists)


def alone_example(llm: Any, text: str) -> Optional[Example]:
    """The text alone as plain text (no prompt, no template), every token after BOS scored: how
    fluent it reads, whatever it answers. None when there is nothing to score."""
    tokens = llm.tokenize(text.strip().encode("utf-8"), add_bos=True, special=False)
    return Example(tokens=tokens, start=1) if len(tokens) >= 2 else None


def alone_score(engine: Engine, text: str, steering: Iterable[Steer] = ()) -> Optional[Job]:
    ex = alone_example(engine.llm, text)
    return None if ex is None else engine.score(fit(ex, engine.n_ctx_seq), steering)


def perplexity(job: Optional[Job]) -> float:
    """exp(-mean log p) of a finished scoring job; NaN for none."""
    if job is None or not job.logprobs:
        return math.nan
    return float(math.exp(-float(np.mean(np.asarray(job.logprobs, np.float64)))))


def kl_rows(steered: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> list[float]:
    """KL(steered || base) of each position, from two lists of log-softmax rows."""
    if not steered:
        return []
    p, q = np.stack(steered).astype(np.float64), np.stack(base).astype(np.float64)
    return [float(x) for x in (np.exp(p) * (p - q)).sum(-1)]


class Driver:
    """Jobs over one or more engines, stepped in turn on this thread. `then(job)` runs once the
    job has finished (between steps, so it may submit follow-up jobs to any of the engines).

    The driver hands an engine a job only when one of its sequences is free, follow-ups first:
    a reply's scoring runs right after the reply, so results complete (and can be written) in
    about the order they were planned, and what a follow-up keeps (dists) lives briefly."""

    def __init__(self, *engines: Engine):
        self.engines = list(engines)
        self._queued: dict[int, tuple[deque, deque]] = {id(e): (deque(), deque()) for e in self.engines}
        self._live: dict[int, tuple[Engine, Job, Optional[Callable[[Job], None]]]] = {}
        self._order: deque[int] = deque()
        self._following = False

    def submit(self, engine: Engine, job: Job, then: Optional[Callable[[Job], None]] = None) -> Job:
        """Queues a job (follow-ups, submitted from a `then`, go before the others)."""
        if engine not in self.engines:
            self.engines.append(engine)
            self._queued[id(engine)] = (deque(), deque())
        first, rest = self._queued[id(engine)]
        (first if self._following else rest).append(job)
        self._live[id(job)] = (engine, job, then)
        self._order.append(id(job))
        return job

    def _feed(self, engine: Engine) -> None:
        first, rest = self._queued[id(engine)]
        load = engine.load
        free = load["parallel"] - load["running"] - load["waiting"]
        while free > 0 and (first or rest):
            engine.submit((first or rest).popleft())
            free -= 1

    def run(self, after: Optional[Callable[[], None]] = None) -> None:
        """Until every job (follow-ups included) has finished; raises the first job's error.
        after() runs after each round of steps (and the follow-ups it finished)."""
        while self._live:
            for engine in self.engines:
                self._feed(engine)
                engine.step()
            for key in list(self._order):
                entry = self._live.get(key)
                if entry is None or not entry[1].done:
                    continue
                del self._live[key]
                self._order.remove(key)
                _, job, then = entry
                if job.error is not None:
                    self._cancel_all()
                    raise job.error
                if then is not None:
                    self._following = True
                    try:
                        then(job)
                    finally:
                        self._following = False
            if after is not None:
                after()

    def _cancel_all(self) -> None:
        """After an error: the jobs handed to an engine are cancelled, the queued ones dropped."""
        for first, rest in self._queued.values():
            first.clear()
            rest.clear()
        for _, job, _ in self._live.values():
            job.cancel()
        for engine in self.engines:
            while engine.load["running"] or engine.load["waiting"]:
                engine.step()
        self._live.clear()
        self._order.clear()

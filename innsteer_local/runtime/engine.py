"""One generation engine for everything that generates: many sequences decoded together in
lockstep steps, each with its own prompt, KV cells (`seq_id`), sampling and steering.

    engine = Engine(llm, n_parallel=8)                 # llm: a llama_cpp.Llama (or SteeredLlama)
    honesty = engine.add_flow("honesty.gguf")
    jobs = [engine.reply(p, steering=[Steer(honesty, 2.0)]) for p in prompts]
    engine.run(jobs)                                   # or engine.start() and submit from threads
    print(jobs[0].reply, jobs[0].stats)

Sequences join and leave between steps (continuous batching); a joining sequence's prompt shares
the step with the others' decode tokens, up to n_batch tokens a step. Each sequence gets a native
steering slot, so the eval callback edits its rows with its own flows only (native/include/innsteer.h)
and counts its own rows. Scoring jobs (tokens to evaluate, no sampling) run on the same engine.

With keep_prefix (the server's choice, as llama-server's slots do), a finished sequence keeps its KV
cells, and a new job with exactly the same steering starts on the free sequence that holds the
longest prefix of its tokens: only the rest is evaluated (`Job.cached_tokens`). Cells computed under
other steering are never reused: a flow changes every layer's keys and values above its own.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp._utils import suppress_stdout_stderr

from ..errors import ContextLengthError, InnsteerError, InvalidArgument, SteeringError
from .native import SPLIT_EQUAL, SPLIT_SIMPLE, FlowInfo, NativeFlow, Steerer, eval_callback_address
from .prompts import Example, finish_reply, has_chat_template, prompt_text, reply_stops

DEFAULT_BATCH = 512


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens; temperature 0 is greedy (and repeats exactly)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # llama-cpp-python's default window
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: exactly max_tokens tokens


@dataclass(frozen=True)
class EngineFlow:
    """A flow attached to an engine; name it in Steer."""

    id: int
    path: str
    info: FlowInfo

    @property
    def layers(self) -> list[int]:
        return self.info.layers


@dataclass(frozen=True)
class Steer:
    """One flow at one strength (and gate) for one sequence."""

    flow: EngineFlow
    strength: float
    gate: str = "off"


class Job:
    """One sequence: a prompt to continue, or (score_from set) tokens to score.

    Results: `tokens` generated, `text` (cut at a stop string), `reply` (the text as a reply:
    forced opening included, cut at the end of the turn, stripped), `finish_reason` ("stop",
    "length", "cancelled", "error"), `error`, `logprobs` (scoring: log p of tokens[score_from:]),
    `dists` (scoring with keep_dists: the log-softmax rows that predicted them) and `stats` (the
    native counters of this sequence alone)."""

    def __init__(self, tokens: Sequence[int], sampling: Sampling = Sampling(), steering: Iterable[Steer] = (),
                 on_text: Optional[Callable[["Job", str], None]] = None, score_from: Optional[int] = None,
                 keep_dists: bool = False, opening: str = "", chat: bool = True):
        self.prompt_tokens = [int(t) for t in tokens]
        self.sampling = sampling
        self.steering = tuple(steering)
        self.on_text = on_text
        self.score_from = score_from
        self.keep_dists = keep_dists
        self.opening, self.chat = opening, chat
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.logprobs: list[float] = []
        self.dists: list[np.ndarray] = []
        self.stats: dict[str, int] = {"tokens_evaluated": 0, "rows_steered": 0, "rows_rejected_nonfinite": 0}
        self.seq_id: Optional[int] = None  # the KV sequence it ran as
        self.cached_tokens = 0  # prompt tokens whose KV cells an earlier job left (keep_prefix)
        self._done = threading.Event()
        self._cancelled = False
        self._on_done: list[Callable[["Job"], None]] = []

    @property
    def scoring(self) -> bool:
        return self.score_from is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def reply(self) -> str:
        return finish_reply(self.opening + self.text, self.chat)

    def cancel(self) -> None:
        """Frees the sequence at the engine's next step (a waiting job never starts)."""
        self._cancelled = True

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def on_done(self, fn: Callable[["Job"], None]) -> None:
        """fn(job) once the job has finished (at once if it has), on the engine's thread."""
        self._on_done.append(fn)
        if self.done:
            fn(self)


class _Running:
    """Engine-side state of an admitted job."""

    def __init__(self, job: Job, seq: int, slot: int, sampler: Any, reserve: int):
        self.job, self.seq, self.slot, self.sampler, self.reserve = job, seq, slot, sampler, reserve
        self.pending = list(job.prompt_tokens)
        self.n_past = 0
        self.last = -1
        self.emitted = 0
        self.data = b""  # the reply's bytes so far
        self.stops = tuple(job.sampling.stop)
        self.mixed = False  # a strength changed mid-way (set_strength)


def _valid_utf8(data: bytes) -> str:
    """The text of data up to an incomplete trailing character (decoded when its bytes arrive)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still begin a stop string (not streamed yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - float(x.max())
    return (x - math.log(float(np.exp(x).sum()))).astype(np.float32)


def _token_logprob(x: np.ndarray, token: int) -> float:
    """log softmax(x)[token] without materialising the whole distribution in float64 (a judge
    with a 262k vocabulary scores every reply token: this was most of an evaluation's time)."""
    m = float(x.max())
    return float(x[token]) - m - math.log(float(np.exp(x - m).sum(dtype=np.float64)))


class Engine:
    """Many sequences on one llama.cpp context, each steered by its own flows.

    llm: a loaded llama_cpp.Llama (weights, tokenizer and chat template are shared with it).
    n_parallel: sequences decoded together; n_ctx: tokens each sequence may hold (default: llm's
    n_ctx); unified=False (the default, as in llama-server): one KV stream per sequence (the equal
    split), so each sequence attends over its own cells exactly as it would alone; unified=True: one
    KV buffer for all (llama.cpp's kv_unified; the simple split); steer=False: no eval callback at
    all (plain llama.cpp, the baseline of benchmarks)."""

    def __init__(self, llm: Any, n_parallel: int = 4, n_ctx: Optional[int] = None, n_batch: int = DEFAULT_BATCH,
                 unified: bool = False, verbose: bool = False, steer: bool = True, keep_prefix: bool = False):
        if not 1 <= n_parallel <= 256:
            raise InvalidArgument(f"n_parallel must be in 1..256, got {n_parallel}")
        self.llm = llm
        self.n_parallel = n_parallel
        from .steered import model_info_of, new_steerer

        model = llm._model
        self.model_info = model_info_of(llm)
        if n_parallel > 1 and (llama_cpp.llama_model_is_recurrent(model.model) or llama_cpp.llama_model_is_hybrid(model.model)):
            raise SteeringError(
                f"architecture '{self.model_info.architecture}' keeps recurrent state, which llama.cpp splits per "
                "sequence: per-sequence steering of many sequences in one batch is not supported there; use n_parallel=1")
        self.chat = has_chat_template(llm)
        per_seq = int(n_ctx or llm.n_ctx())
        self.n_batch = int(n_batch)
        self._steerer = new_steerer(self.model_info, llm.context_params, self.n_batch)
        params = llama_cpp.llama_context_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(llm.context_params), ctypes.sizeof(params))
        params.n_seq_max = n_parallel
        params.kv_unified = bool(unified)
        params.n_ctx = per_seq * n_parallel
        params.n_batch = params.n_ubatch = self.n_batch
        params.embeddings = False
        self.steers = steer
        if steer:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(eval_callback_address())
            params.cb_eval = self._cb
            params.cb_eval_user_data = self._steerer.ptr
        else:
            params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(0)
            params.cb_eval_user_data = None
        with suppress_stdout_stderr(disable=verbose):
            self._ctx = internals.LlamaContext(model=model, params=params, verbose=verbose)
        self.unified = bool(unified) or n_parallel == 1
        self.split = SPLIT_SIMPLE if self.unified else SPLIT_EQUAL
        self.n_ctx_total = int(llama_cpp.llama_n_ctx(self._ctx.ctx))
        # a unified cache lets any sequence take every cell; each still gets the n_ctx asked for
        self.n_ctx_seq = min(per_seq, int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx)))
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(self._ctx.ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._vocab = model.vocab
        self._model = model
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._waiting: deque[Job] = deque()
        self._running: list[_Running] = []
        self._free_seqs = list(range(n_parallel))
        # keep_prefix: what each free sequence's cells hold, (tokens, steering); a unified cache
        # shares its cells with the running sequences, so there it keeps nothing
        self.keep_prefix = bool(keep_prefix) and (not self.unified or n_parallel == 1)
        self._kept: dict[int, tuple[tuple[int, ...], tuple[tuple[int, float, str], ...]]] = {}
        self._reserved = 0
        self._flows: dict[int, EngineFlow] = {}
        self._lock = threading.Lock()  # the queue and the flows; step() holds _step_lock
        self._step_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.steps = 0
        self.trace: Optional[list[np.ndarray]] = None  # set to a list: each step's sequence ids, token by token
        self.timings: Optional[list[tuple[int, int, float]]] = None  # a list: (prompt, decode tokens, seconds) a step

    # ---- flows ----------------------------------------------------------------------------

    def add_flow(self, path: Any) -> EngineFlow:
        """Attaches a flow (validated by the C loader and against this model); it steers only the
        sequences whose Steer names it."""
        from .steered import check_fits

        if not self.steers:
            raise SteeringError("this engine was made with steer=False (no eval callback): it cannot steer")
        native = NativeFlow(path, self.model_info)
        try:
            meta = native.info
            check_fits(path, meta, self.model_info)
            with self._step_lock:
                fid = self._steerer.attach(native, 0.0)
        finally:
            native.close()
        flow = EngineFlow(id=fid, path=str(path), info=meta)
        with self._lock:
            self._flows[fid] = flow
        self._verify_layers(flow)
        return flow

    def remove_flow(self, flow: EngineFlow) -> None:
        with self._lock:
            users = [r.job for r in self._running if any(s.flow.id == flow.id for s in r.job.steering)]
            users += [j for j in self._waiting if any(s.flow.id == flow.id for s in j.steering)]
            if users:
                raise InnsteerError(f"{flow.path} steers {len(users)} unfinished sequence(s); cancel them first")
            self._flows.pop(flow.id, None)
            # cells computed with this flow must not serve a later flow that reuses its id
            for seq in [q for q, (_, steer) in self._kept.items() if any(f == flow.id for f, _, _ in steer)]:
                self._forget(seq)
        with self._step_lock:
            self._steerer.detach(flow.id)

    @property
    def flows(self) -> list[EngineFlow]:
        return list(self._flows.values())

    def _verify_layers(self, flow: EngineFlow) -> None:
        """One token through the model: a layer whose l_out-N the graph never computes would make
        the flow a silent no-op, so refuse it now."""
        need = [l for l in flow.layers if self._steerer.layer_visits(l) == 0]
        if not need:
            return
        bos = int(self.llm.token_bos()) if self.llm.token_bos() >= 0 else 0
        self.run([Job([bos], Sampling(max_tokens=0))])
        missing = [l for l in need if self._steerer.layer_visits(l) == 0]
        if missing:
            from .steered import missing_layers_error

            self.remove_flow(flow)
            raise missing_layers_error(self.model_info.architecture, missing)

    def set_strength(self, job: Job, flow: EngineFlow, strength: float, gate: Optional[str] = None) -> None:
        """Changes one sequence's strength of a flow; takes effect at the next layer it reaches."""
        value = float(strength)
        if not math.isfinite(value):
            raise InvalidArgument(f"strength must be a finite number, got {strength!r}")
        with self._lock:
            old = next((s for s in job.steering if s.flow.id == flow.id), None)
            new = Steer(flow, value, gate or (old.gate if old else "off"))
            job.steering = tuple(s for s in job.steering if s.flow.id != flow.id) + (new,)
            running = next((r for r in self._running if r.job is job), None)
            if running is not None:
                self._steerer.slot_put(running.slot, flow.id, new.strength, new.gate)
                running.mixed = True  # its cells now hold two strengths: not a prefix for anyone

    # ---- jobs -----------------------------------------------------------------------------

    def tokenize(self, text: str, chat: Optional[bool] = None) -> list[int]:
        """Tokens of a prompt; special tokens are parsed for chat prompts (templates write them),
        and no second BOS is added where the template wrote one."""
        chat = self.chat if chat is None else chat
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=chat)
        bos = self.llm.token_bos()
        if chat and len(tokens) > 1 and tokens[0] == tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def reply(self, prompt: str, *, system: str = "", opening: str = "", sampling: Sampling = Sampling(),
              steering: Iterable[Steer] = (), chat: Optional[bool] = None,
              on_text: Optional[Callable[[Job, str], None]] = None) -> Job:
        """A job that answers one user prompt the way every part of the project asks it
        (prompts.prompt_text), stopping at the end of the model's turn."""
        chat = self.chat if chat is None else chat
        text = prompt_text(self.llm, prompt, system, chat)
        if opening:
            text += opening if chat else " " + opening
        stops = tuple(sampling.stop) + tuple(s for s in reply_stops(chat) if s not in sampling.stop)
        s = Sampling(**{**vars(sampling), "stop": stops})
        return Job(self.tokenize(text, chat), s, steering, on_text=on_text, opening=opening, chat=chat)

    def score(self, example: Example, steering: Iterable[Steer] = (), keep_dists: bool = False) -> Job:
        """A job that evaluates example.tokens and records log p of every token from example.start."""
        start = max(1, int(example.start))
        return Job(example.tokens, Sampling(max_tokens=0), steering, score_from=start, keep_dists=keep_dists)

    def submit(self, job: Job) -> Job:
        """Queues a job (any thread); the engine starts it once a sequence and KV room are free."""
        self._check(job)
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()
        return job

    def _check(self, job: Job) -> None:
        n = len(job.prompt_tokens)
        if n == 0:
            raise InvalidArgument("a job needs at least one token")
        room = self.n_ctx_seq
        if n > room or (not job.scoring and n >= room and job.sampling.max_tokens > 0):
            raise ContextLengthError(f"Requested tokens ({n}) exceed context window of {room}")
        for s in job.steering:
            if s.flow.id not in self._flows:
                raise InnsteerError(f"flow {s.flow.path} is not attached to this engine")
            if not math.isfinite(s.strength):
                raise InvalidArgument(f"strength must be a finite number, got {s.strength!r}")

    def run(self, jobs: Sequence[Job], progress: Optional[Callable[[int, int], None]] = None) -> list[Job]:
        """Runs the jobs to the end (on this thread, or on the engine's thread once start()ed)."""
        for job in jobs:
            self.submit(job)
        total, reported = len(jobs), -1
        while True:
            n_done = sum(j.done for j in jobs)
            if progress and n_done != reported:
                progress(n_done, total)
                reported = n_done
            if n_done == total:
                break
            if self._thread is not None:
                next(j for j in jobs if not j.done).wait(0.05)
            else:
                self.step()
        for job in jobs:
            if job.error is not None and not isinstance(job.error, _Cancelled):
                raise job.error
        return list(jobs)

    # ---- the background thread (servers) ----------------------------------------------------

    def start(self) -> None:
        """Steps on a thread of its own whenever there is work (submit() from any thread)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="innsteer-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # never let one bad step stop every future request
                with self._lock:
                    for r in list(self._running):
                        self._finish(r, "error", e)

    def stop(self) -> None:
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        with self._lock:
            jobs = list(self._waiting) + [r.job for r in self._running]
        for r in list(self._running):
            self._finish(r, "cancelled")
        for job in jobs:
            if not job.done:
                self._end(job, "cancelled", _Cancelled("engine closed"))
        self._waiting.clear()
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_steerer", None) is not None:
            self._steerer.close()
            self._steerer = None

    @property
    def native_steerer(self) -> Steerer:
        """The native state behind the callback (captures, counters)."""
        return self._steerer

    @property
    def load(self) -> dict[str, int]:
        """Sequences running and waiting now."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "parallel": self.n_parallel}

    # ---- one step ---------------------------------------------------------------------------

    def _sampler(self, s: Sampling) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                                       s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(int(s.top_k)))
            if s.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(float(s.top_p), 1))
            if s.min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(float(s.min_p), 1))
            add(llama_cpp.llama_sampler_init_temp(float(s.temperature)))
            seed = 0xFFFFFFFF if s.seed is None else int(s.seed) & 0xFFFFFFFF
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _reserve(self, job: Job) -> int:
        n = len(job.prompt_tokens) + (0 if job.scoring else job.sampling.max_tokens)
        return min(n, self.n_ctx_seq)

    def _admit(self) -> None:
        """Starts waiting jobs while a sequence id and (unified KV) cells for their whole length
        are free; the rest keep their place in the queue."""
        while self._waiting and self._free_seqs:
            job = self._waiting[0]
            if job._cancelled:
                self._waiting.popleft()
                self._end(job, "cancelled", _Cancelled("cancelled before it started"))
                continue
            need = self._reserve(job)
            if self.unified and self._running and self._reserved + need > self.n_ctx_total:
                break
            self._waiting.popleft()
            seq, reuse = self._pick_seq(job)
            self._free_seqs.remove(seq)
            job.seq_id = seq
            slot = self._steerer.new_slot()
            try:
                for st in job.steering:
                    self._steerer.slot_put(slot, st.flow.id, st.strength, st.gate)
            except ValueError as e:
                self._steerer.free_slot(slot)
                self._free_seqs.append(seq)
                self._end(job, "error", e)
                continue
            sampler = None if job.scoring else self._sampler(job.sampling)
            r = _Running(job, seq, slot, sampler, need)
            if reuse:
                r.pending, r.n_past, job.cached_tokens = r.pending[reuse:], reuse, reuse
            self._running.append(r)
            self._reserved += need

    @staticmethod
    def _signature(job: Job) -> tuple[tuple[int, float, str], ...]:
        return tuple(sorted((s.flow.id, float(s.strength), s.gate) for s in job.steering if s.strength != 0.0))

    def _pick_seq(self, job: Job) -> tuple[int, int]:
        """A free sequence for the job and how many of its prompt tokens that sequence's cells
        already hold (0 without keep_prefix). The rest of the sequence's cells are dropped."""
        best, reuse = None, 0
        if self.keep_prefix:
            sig, prompt = self._signature(job), job.prompt_tokens
            # at least the last prompt token is evaluated (its logits start the reply); a scored
            # job also needs the logits of every scored position
            limit = len(prompt) - 1 if not job.scoring else max(0, job.score_from - 1)
            for seq in self._free_seqs:
                tokens, steer = self._kept.get(seq, ((), ()))
                if steer != sig or not tokens:
                    continue
                n = 0
                for a, b in zip(tokens, prompt[:limit]):
                    if a != b:
                        break
                    n += 1
                if n > reuse:
                    best, reuse = seq, n
        if best is None:
            # the lowest free id holding nothing worth keeping: the equal split batches runs of
            # consecutive ids together
            empty = [q for q in self._free_seqs if q not in self._kept]
            best = min(empty or self._free_seqs)
        if best in self._kept:
            llama_cpp.llama_memory_seq_rm(self._mem, best, reuse, -1)
            del self._kept[best]
        return best, reuse

    def _forget(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._kept.pop(seq, None)

    def step(self) -> bool:
        """One llama_decode over every running sequence: a decode token for each that is
        generating, and as many prompt tokens of the others as the batch has room for. Returns
        False when there was nothing to do."""
        with self._step_lock:
            with self._lock:
                for r in [r for r in self._running if r.job._cancelled]:
                    self._finish(r, "cancelled")
                self._admit()
                running = sorted(self._running, key=lambda r: r.seq)
            if not running:
                return False
            plan = self._plan(running)
            t0 = time.perf_counter()
            rc = self._decode(plan)
            if self.timings is not None:
                n_decode = sum(1 for r, toks, _, _ in plan if len(toks) == 1 and not r.pending)
                self.timings.append((sum(len(t) for _, t, _, _ in plan) - n_decode, n_decode, time.perf_counter() - t0))
            self.steps += 1
            with self._lock:
                if rc != 0:
                    # llama.cpp found no KV room (1) or failed: end the newest sequence, not all
                    victim = plan[-1][0] if rc == 1 else None
                    for r, *_ in plan:
                        if victim is None or r is victim:
                            self._finish(r, "error", InnsteerError(
                                f"llama_decode returned {rc}" + (" (no room left in the KV cache)" if rc == 1 else "")))
                    return True
                self._after(plan)
            return True

    def _plan(self, running: list[_Running]) -> list[tuple[_Running, list[int], int, list[bool]]]:
        """(sequence, tokens, first position, outputs) per sequence, in sequence-id order."""
        decoding = [r for r in running if not r.pending]
        budget = self.n_batch - len(decoding)
        plan = []
        for r in running:
            if not r.pending:
                plan.append((r, [r.last], r.n_past, [True]))
                continue
            if budget <= 0:
                continue
            take = r.pending[:budget]
            budget -= len(take)
            if r.job.scoring:
                first = r.n_past
                end = len(r.job.prompt_tokens) - 1  # the last token predicts nothing scored
                outs = [r.job.score_from - 1 <= first + i < end for i in range(len(take))]
            else:
                outs = [False] * len(take)
                if len(take) == len(r.pending):
                    outs[-1] = True
            plan.append((r, take, r.n_past, outs))
        return plan

    def _decode(self, plan: list[tuple[_Running, list[int], int, list[bool]]]) -> int:
        b = self._batch
        n = sum(len(t) for _, t, _, _ in plan)
        seq_ids = np.empty(n, np.int32)
        slots = np.empty(n, np.int32)
        outputs = np.empty(n, np.int8)
        i = 0
        for r, toks, pos0, outs in plan:
            for k, tok in enumerate(toks):
                b.token[i] = tok
                b.pos[i] = pos0 + k
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = r.seq
                b.logits[i] = outs[k]
                seq_ids[i], slots[i], outputs[i] = r.seq, r.slot, outs[k]
                i += 1
        b.n_tokens = n
        if self.trace is not None:
            self.trace.append(seq_ids.copy())
        self._steerer.batch_begin(seq_ids, slots, outputs, self.n_ubatch, self.split)
        try:
            return int(llama_cpp.llama_decode(self._ctx.ctx, b))
        finally:
            self._steerer.batch_end()
            error = self._steerer.last_error
            if error and error != getattr(self, "_last_error", ""):
                self._last_error = error
                import warnings

                warnings.warn(f"steering: {error}", RuntimeWarning, stacklevel=2)

    def _after(self, plan: list[tuple[_Running, list[int], int, list[bool]]]) -> None:
        i = 0
        for r, toks, pos0, outs in plan:
            job = r.job
            for k in range(len(toks)):
                if outs[k] and job.scoring:
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, i), shape=(self.n_vocab,))
                    target = job.prompt_tokens[pos0 + k + 1]
                    if job.keep_dists:
                        lp = _log_softmax(row)
                        job.logprobs.append(float(lp[target]))
                        job.dists.append(lp)
                    else:
                        job.logprobs.append(_token_logprob(row, target))
                i += 1
            r.n_past = pos0 + len(toks)
            if r.pending:
                r.pending = r.pending[len(toks):]
                if r.pending:
                    continue
                if job.scoring or job.sampling.max_tokens <= 0:
                    self._finish(r, "stop")
                    continue
            # the sequence's output row is its last token this step
            tok = int(llama_cpp.llama_sampler_sample(r.sampler, self._ctx.ctx, i - 1))
            self._accept(r, tok)

    def _accept(self, r: _Running, tok: int) -> None:
        job = r.job
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok) and not job.sampling.ignore_eos:
            self._finish(r, "stop")
            return
        job.tokens.append(tok)
        r.last = tok
        # llama-cpp-python's detokenize is the concatenation of the pieces (after a leading BOS):
        # one piece a step instead of the whole reply again
        r.data += self.llm.detokenize(job.tokens) if len(job.tokens) == 1 else self._model.detokenize([tok])
        text = _valid_utf8(r.data)
        for s in r.stops:
            at = text.find(s)
            if at >= 0:
                job.text = text[:at]
                self._finish(r, "stop")
                return
        job.text = text
        if len(job.tokens) >= job.sampling.max_tokens or r.n_past + 1 >= self.n_ctx_seq:
            self._finish(r, "length")
            return
        safe = len(text) - _held_back(text, r.stops)
        if job.on_text and safe > r.emitted:
            piece, r.emitted = text[r.emitted:safe], safe
            _call(job.on_text, job, piece)

    def _finish(self, r: _Running, reason: str, error: Optional[BaseException] = None) -> None:
        job = r.job
        if reason == "length" and job.tokens:
            # every step already looked for the stop strings: only a trailing partial character is new
            job.text = r.data.decode("utf-8", errors="replace")
        if job.on_text and len(job.text) > r.emitted and reason in ("stop", "length"):
            piece, r.emitted = job.text[r.emitted:], len(job.text)
            _call(job.on_text, job, piece)
        job.stats = self._steerer.slot_stats(r.slot)
        if self.keep_prefix and reason in ("stop", "length") and not r.mixed and r.n_past > 0:
            # the cells hold positions 0..n_past-1: the prompt, then every reply token fed back
            self._kept[r.seq] = (tuple((job.prompt_tokens + job.tokens)[:r.n_past]), self._signature(job))
        else:
            self._forget(r.seq)
        self._steerer.free_slot(r.slot)
        if r.sampler is not None:
            llama_cpp.llama_sampler_free(r.sampler)
        self._running.remove(r)
        self._free_seqs.append(r.seq)
        self._reserved -= r.reserve
        if reason == "cancelled" and error is None:
            error = _Cancelled("cancelled")
        self._end(job, reason, error)

    def _end(self, job: Job, reason: str, error: Optional[BaseException]) -> None:
        job.finish_reason = reason
        job.error = error
        job._done.set()
        for fn in job._on_done:
            _call(fn, job)


def _call(fn: Callable[..., None], *args: Any) -> None:
    """A listener's failure (e.g. a client whose event loop has closed) must not stop the engine."""
    try:
        fn(*args)
    except Exception:
        pass


class _Cancelled(Exception):
    """A job that was cancelled (not an error of the engine)."""

"""The model's own replies, generated through llama.cpp (the runtime that later steers), to use as
training contexts: unsteered replies and replies that continue a given opening, written together
on the batched engine (runtime/engine.py) with the one prompt rule and the one cut of a reply
(runtime/prompts.py). Greedy decoding, so the same settings give the same text; cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..runtime.prompts import prompt_text

REPEAT_PENALTY = 1.1  # llama-cpp-python's and `innsteer-local chat`'s default
# the rule a cached reply was written under: bump it when prompting, cutting or decoding changes
# (2: the one prompt rule of prompts.prompt_text, no space after a base model's "Assistant:"; the
# engine's greedy decoding with the repetition penalty over generated tokens)
REPLY_RULE = 2
ROLLOUT_CTX = 512  # tokens per sequence (prompt + reply) unless a request needs more
# a recipe's 100-150 short replies: 32 side by side write them 10 % faster than 16 (2 cores)
ROLLOUT_PARALLEL = 32


@dataclass(frozen=True)
class Request:
    """One reply to generate: the user prompt, an optional instruction the model gets before it
    (a system message; for base models a line before the prompt), an optional forced opening of
    the reply (the model continues it), and the number of new tokens."""

    prompt: str
    system: str = ""
    opening: str = ""
    max_tokens: int = 32


def asked(llm: Any, req: Request, chat: bool) -> str:
    """The text the model is given, up to where its reply starts (the forced opening excluded)."""
    return prompt_text(llm, req.prompt, req.system, chat)


def sampling(req: Request) -> Any:
    """Greedy with the chat default's mild repetition penalty: plain greedy replies of a small
    model often loop, which is not the text a user sees."""
    from ..runtime.engine import Sampling

    return Sampling(max_tokens=req.max_tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)


def reply_job(engine: Any, req: Request, chat: bool) -> Any:
    """The engine job that writes one training reply (prompts.prompt_text, cut by job.reply)."""
    return engine.reply(req.prompt, system=req.system, opening=req.opening, sampling=sampling(req), chat=chat)


class ReplyCache:
    """Generated replies on disk (one JSON file per model and steering), so a second training run
    on the same data does not generate again."""

    def __init__(self, cache_dir: Optional[Path], model_path: str, steering: str = ""):
        self.path = None
        self.replies: dict[str, str] = {}
        if cache_dir is None:
            return
        st = Path(model_path).stat()
        key = json.dumps([str(Path(model_path).resolve()), st.st_size, st.st_mtime_ns, steering, REPLY_RULE])
        self.path = Path(cache_dir) / f"replies-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if self.path.exists():
            try:
                self.replies = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.replies = {}

    @staticmethod
    def key(req: Request) -> str:
        return json.dumps([req.prompt, req.system, req.opening, req.max_tokens, REPEAT_PENALTY, REPLY_RULE])

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.replies))
        os.replace(tmp, self.path)


def replies(llm: Any, requests: Sequence[Request], chat: bool, cache: Optional[ReplyCache] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Replies to every request, in order (from the cache where it has them; the rest generated
    together on one engine over llm, each cut as eval cuts a reply: job.reply)."""
    from ..runtime.jobs import open_engine

    cache = cache or ReplyCache(None, "")
    todo = list(dict.fromkeys(k for k in map(ReplyCache.key, requests) if k not in cache.replies))  # in order, once
    if todo:
        by_key = {ReplyCache.key(r): r for r in requests}
        # room for the longest prompt and its reply (at least ROLLOUT_CTX, at most the model's context)
        longest = max(len(llm.tokenize((asked(llm, r, chat) + " " + r.opening).encode("utf-8"), add_bos=True,
                                       special=chat)) + r.max_tokens for r in (by_key[k] for k in todo))
        engine = open_engine(llm, min(llm.n_ctx(), max(ROLLOUT_CTX, longest + 8)), ROLLOUT_PARALLEL, n_jobs=len(todo))
        try:
            jobs = [reply_job(engine, by_key[k], chat) for k in todo]
            cached = len(requests) - len(todo)
            engine.run(jobs, progress=(lambda d, t: progress(cached + d, len(requests))) if progress else None)
        finally:
            engine.close()
        for k, job in zip(todo, jobs):
            cache.replies[k] = job.reply
        cache.save()
    elif progress:
        progress(len(requests), len(requests))
    return [cache.replies[ReplyCache.key(r)] for r in requests]

"""The model's own replies, generated through llama.cpp (the runtime that later steers), to use as
training contexts: unsteered replies, replies that continue a given opening, and replies under a
flow being trained. Greedy decoding, so the same settings give the same text; cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ..runtime.prompts import plain_prompt, render_chat

REPEAT_PENALTY = 1.1  # llama-cpp-python's and `innsteer-local chat`'s default


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
    """The text the model is given, up to where its reply starts."""
    if chat:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        return render_chat(llm, messages)
    return plain_prompt(f"{req.system} {req.prompt}" if req.system else req.prompt) + " "


def generate(llm: Any, req: Request, chat: bool) -> str:
    """The model's greedy reply (with its forced opening, if any), cut at the end of its turn."""
    import llama_cpp

    tokens = llm.tokenize((asked(llm, req, chat) + req.opening).encode("utf-8"), add_bos=True, special=chat)
    vocab = llm._model.vocab
    out: list[int] = []
    # greedy with the chat default's mild repetition penalty: plain greedy replies of a small model
    # often loop, which is not the text a user sees
    for tok in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=REPEAT_PENALTY, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, tok) or len(out) >= req.max_tokens:
            break
        out.append(int(tok))
    reply = req.opening + llm.detokenize(out).decode("utf-8", errors="replace")
    if not chat:  # a base model continues the transcript: keep its own turn only
        reply = reply.split("\nUser:")[0]
    return reply.strip()


class ReplyCache:
    """Generated replies on disk (one JSON file per model and steering), so a second training run
    on the same data does not generate again."""

    def __init__(self, cache_dir: Optional[Path], model_path: str, steering: str = ""):
        self.path = None
        self.replies: dict[str, str] = {}
        if cache_dir is None:
            return
        st = Path(model_path).stat()
        key = json.dumps([str(Path(model_path).resolve()), st.st_size, st.st_mtime_ns, steering])
        self.path = Path(cache_dir) / f"replies-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if self.path.exists():
            try:
                self.replies = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.replies = {}

    @staticmethod
    def key(req: Request) -> str:
        return json.dumps([req.prompt, req.system, req.opening, req.max_tokens, REPEAT_PENALTY])

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.replies))
        os.replace(tmp, self.path)


def replies(llm: Any, requests: Sequence[Request], chat: bool, cache: Optional[ReplyCache] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Replies to every request, in order (from the cache where it has them)."""
    cache = cache or ReplyCache(None, "")
    out = []
    for i, req in enumerate(requests):
        k = ReplyCache.key(req)
        if k not in cache.replies:
            cache.replies[k] = generate(llm, req, chat)
        out.append(cache.replies[k])
        if progress:
            progress(i + 1, len(requests))
    cache.save()
    return out


def unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for x in items:
        seen.setdefault(x, None)
    return list(seen)

"""Contrastive training data: built-in behaviours and user files, validated with positions.

Accepted files (`--pairs FILE`, told apart by content):

- JSONL, one object per line:
  - {"positive": TEXT, "negative": TEXT}: two texts, used as they are (no template);
  - {"prompt": USER_MESSAGE, "positive": REPLY, "negative": REPLY}: two assistant replies to
    the same user message, chat-templated; the replies' tokens carry the behaviour;
  - {"prompt": USER_MESSAGE, "neutral": REPLY}: a context where the behaviour must NOT change.
- CAA A/B JSON: a list of {"question", "answer_matching_behavior", "answer_not_matching_behavior"}
  (the matching answer is the positive reply).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import InnsteerError


class DataError(InnsteerError, ValueError):
    """A training data file or item is malformed; the message names the line or index."""


@dataclass(frozen=True)
class Pair:
    """One contrastive pair. With prompts, the replies are templated as assistant turns; with
    prompt None, positive/negative are plain texts. Equal replies under different prompts give
    token-aligned rows (persona pairs)."""

    positive: str
    negative: str
    positive_prompt: Optional[str] = None
    negative_prompt: Optional[str] = None


@dataclass(frozen=True)
class Neutral:
    prompt: str
    reply: str


@dataclass
class Dataset:
    name: str
    pairs: list[Pair] = field(default_factory=list)
    neutral: list[Neutral] = field(default_factory=list)
    description: str = ""

    def digest(self) -> str:
        """sha256 of the content: part of the activation cache key and the flow's provenance."""
        blob = json.dumps({"pairs": [asdict(p) for p in self.pairs], "neutral": [asdict(n) for n in self.neutral]},
                          sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()


def _text(item: dict[str, Any], key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string")
    return v


def _from_object(item: Any, where: str) -> Pair | Neutral:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    keys = set(item)
    if "question" in keys or "answer_matching_behavior" in keys:
        q = _text(item, "question", where)
        return Pair(positive=_text(item, "answer_matching_behavior", where),
                    negative=_text(item, "answer_not_matching_behavior", where), positive_prompt=q, negative_prompt=q)
    if "neutral" in keys:
        return Neutral(prompt=_text(item, "prompt", where), reply=_text(item, "neutral", where))
    if "positive" in keys or "negative" in keys:
        pos, neg = _text(item, "positive", where), _text(item, "negative", where)
        if "prompt" in keys:
            prompt = _text(item, "prompt", where)
            return Pair(positive=pos, negative=neg, positive_prompt=prompt, negative_prompt=prompt)
        return Pair(positive=pos, negative=neg)
    raise DataError(f"{where}: unrecognised item with keys {sorted(keys)}; expected positive/negative "
                    "(optionally with prompt), prompt/neutral, or question/answer_matching_behavior/"
                    "answer_not_matching_behavior")


def load_file(path: str | Path) -> Dataset:
    """Reads a JSONL pairs file or a CAA A/B JSON list."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e})") from None
    items: list[tuple[Any, str]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        items = [(obj, f"{p}: item {i}") for i, obj in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), f"{p}: line {n}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
    ds = Dataset(name=p.stem)
    for obj, where in items:
        entry = _from_object(obj, where)
        (ds.neutral if isinstance(entry, Neutral) else ds.pairs).append(entry)
    if not ds.pairs:
        raise DataError(f"{p}: no contrastive pairs found ({len(ds.neutral)} neutral items)")
    return ds

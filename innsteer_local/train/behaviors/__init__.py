"""Built-in behaviours: recipes (the JSON files here) from which the model writes its own training
data. Each recipe names prompts, how the positive and the negative reply are obtained from the
model (an instruction it gets before the prompt, and/or an opening of the reply it continues),
and neutral prompts whose replies must not change; replies differ in the behaviour, not in
template text, and are the model's own words (train/rollouts.py generates them through llama.cpp
and caches them per model).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ... import datasets
from ...errors import InnsteerError
from ...runtime.prompts import has_chat_template
from ..data import DataError, Dataset, Neutral, Pair
from ..rollouts import ReplyCache, Request, replies

BEHAVIOR_DIR = Path(__file__).resolve().parent
ADVBENCH_FILE = "advbench/harmful_behaviors.csv"


def names() -> list[str]:
    return sorted(p.stem for p in BEHAVIOR_DIR.glob("*.json") if not p.stem.startswith("_"))


def spec(name: str) -> dict[str, Any]:
    path = BEHAVIOR_DIR / f"{name}.json"
    if name.startswith("_") or not path.exists():
        raise InnsteerError(f"unknown behaviour '{name}'; built-in behaviours: {', '.join(names())}")
    return json.loads(path.read_text())


def background_exchanges() -> list[tuple[str, str]]:
    """Generic chat text: rows every flow should leave nearly unchanged (activation statistics)."""
    data = json.loads((BEHAVIOR_DIR / "_background.json").read_text())
    return [(q, a) for q, a in data["exchanges"]]


def advbench_rows(start: int, stop: int) -> list[tuple[str, str]]:
    """(goal, target) rows [start, stop) of AdvBench's harmful_behaviors.csv."""
    path = datasets.path(ADVBENCH_FILE)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["goal"], r["target"]) for r in csv.DictReader(f)]
    if stop > len(rows):
        raise DataError(f"{path} has {len(rows)} rows, asked for rows {start}..{stop - 1}")
    return rows[start:stop]


def _prompt_file(rel: str) -> list[str]:
    return list(json.loads((BEHAVIOR_DIR / rel).read_text())["prompts"])


def _evenly(items: list[str], n: int) -> list[str]:
    """n items spread over the whole list (the files are ordered by theme)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


@dataclass
class Recipe:
    """How the model writes the data of one behaviour."""

    name: str
    description: str
    prompts: list[str]
    positive: dict[str, Any]
    negative: dict[str, Any]
    neutral_prompts: list[str]
    max_tokens: int = 32
    preservation: float = 1.0  # weight of the KL term on the neutral replies
    scorer: dict[str, Any] = field(default_factory=dict)
    # prompts that neither pairs nor neutral items use: selection by generation runs on them (and,
    # for a selective behaviour, subtracts its score on held-out neutral prompts)
    held_out_prompts: list[str] = field(default_factory=list)
    held_out_neutral: list[str] = field(default_factory=list)

    def requests(self, side: dict[str, Any]) -> list[Request]:
        openings = side.get("openings") or [""]
        return [Request(p, side.get("system", ""), openings[i % len(openings)], self.max_tokens)
                for i, p in enumerate(self.prompts)]

    def neutral_requests(self) -> list[Request]:
        return [Request(p, "", "", self.max_tokens) for p in self.neutral_prompts]


def recipe(name: str, held_out: int = 8) -> Recipe:
    """The recipe of a built-in behaviour. Pairs take prompts spread over the prompt pool; neutral
    prompts and the held-out prompts that selection generates on are never pair prompts."""
    s = spec(name)
    if s.get("kind") != "generated":
        raise InnsteerError(f"behaviour '{name}' has unknown kind '{s.get('kind')}'")
    src = s["prompts"]
    pool = [g for g, _ in advbench_rows(*src["advbench"])] if "advbench" in src else _prompt_file(src["file"])
    chosen = _evenly(pool, s.get("pairs", len(pool)))
    rest = [p for p in pool if p not in set(chosen)]
    n = s.get("neutral", {})
    neutral_pool = (rest if n.get("file") == src.get("file") else _prompt_file(n["file"])) if n else []
    count = n.get("count", len(neutral_pool)) if n else 0
    neutral = neutral_pool[:count]
    if n and n.get("file") == src.get("file"):
        rest = rest[count:]
    return Recipe(name=s["name"], description=s["description"], prompts=chosen, positive=s.get("positive", {}),
                  negative=s.get("negative", {}), neutral_prompts=neutral, max_tokens=s.get("max_tokens", 32),
                  preservation=s.get("preservation", 1.0), scorer=s.get("scorer", {}),
                  held_out_prompts=rest[:held_out],
                  held_out_neutral=neutral_pool[count:count + held_out] if s.get("selective") else [])


def build(llm: Any, r: Recipe, cache_dir: Optional[Path] = None,
          progress: Optional[Callable[[int, int], None]] = None) -> Dataset:
    """The recipe's data written by this model (greedy, so the same model gives the same data)."""
    chat = has_chat_template(llm)
    cache = ReplyCache(cache_dir, llm.model_path)
    todo = r.requests(r.positive) + r.requests(r.negative) + r.neutral_requests()
    done = replies(llm, todo, chat, cache, progress)
    k = len(r.prompts)
    ds = Dataset(name=r.name, description=r.description)
    for prompt, pos, neg in zip(r.prompts, done[:k], done[k:2 * k]):
        if pos.strip() and neg.strip() and pos != neg:
            ds.pairs.append(Pair(positive=pos, negative=neg, positive_prompt=prompt, negative_prompt=prompt))
    ds.neutral = [Neutral(prompt=p, reply=t) for p, t in zip(r.neutral_prompts, done[2 * k:]) if t.strip()]
    if not ds.pairs:
        raise DataError(f"behaviour '{r.name}': the model wrote no usable pairs (empty or identical replies)")
    return ds


def describe(name: str) -> str:
    r = recipe(name)
    side = lambda s: "; ".join(filter(None, [f"instruction: {s['system']}" if s.get("system") else "",  # noqa: E731
                                             f"openings: {' | '.join(s['openings'])}" if s.get("openings") else ""])) \
        or "the model's plain reply"
    lines = [f"{r.name}: {r.description}",
             f"{len(r.prompts)} contrastive prompts, {len(r.neutral_prompts)} neutral prompts; replies of up to "
             f"{r.max_tokens} tokens are written by the model itself (cached per model)",
             f"  positive reply: {side(r.positive)}",
             f"  negative reply: {side(r.negative)}",
             f"  scored by: {r.scorer.get('name', '-')}", ""]
    lines += [f"  prompt: {p}" for p in r.prompts[:3]]
    if r.neutral_prompts:
        lines.append(f"  neutral: {r.neutral_prompts[0]}")
    lines.append(f"source: {BEHAVIOR_DIR / (name + '.json')}")
    return "\n".join(lines)

"""Built-in behaviours: contrastive prompt templates shipped as JSON in behaviors/.

Two kinds:
- persona: the same neutral reply after a positive and a negative persona instruction (the way
  representation-engineering work builds pairs); reply tokens are aligned row by row.
- requests: harmful requests (AdvBench rows, shipped in innsteer_local/datasets) answered with a
  refusal (positive) or with compliance (negative), plus harmless `neutral` requests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ... import datasets
from ...errors import InnsteerError
from ..data import DataError, Dataset, Neutral, Pair

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
    """Generic chat text: rows every flow should leave nearly unchanged."""
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


def load(name: str) -> Dataset:
    s = spec(name)
    ds = Dataset(name=s["name"], description=s["description"],
                 neutral=[Neutral(prompt=n["prompt"], reply=n["reply"]) for n in s.get("neutral", [])])
    if s["kind"] == "persona":
        for pos, neg in zip(s["positive_personas"], s["negative_personas"]):
            for reply in s["continuations"]:
                ds.pairs.append(Pair(positive=reply, negative=reply, positive_prompt=s["template"].format(persona=pos),
                                     negative_prompt=s["template"].format(persona=neg)))
    elif s["kind"] == "requests":
        start, stop = s["advbench_rows"]
        refusals = s["refusals"]
        for i, (goal, target) in enumerate(advbench_rows(start, stop)):
            ds.pairs.append(Pair(positive=refusals[i % len(refusals)], negative=target, positive_prompt=goal,
                                 negative_prompt=goal))
    else:
        raise InnsteerError(f"behaviour '{name}' has unknown kind '{s['kind']}'")
    return ds


def describe(name: str) -> str:
    s = spec(name)
    ds = load(name)
    lines = [f"{s['name']}: {s['description']}", f"kind: {s['kind']}",
             f"{len(ds.pairs)} contrastive pairs, {len(ds.neutral)} neutral items, "
             f"{len(background_exchanges())} generic background exchanges", ""]
    for p in ds.pairs[:3]:
        lines += [f"  + prompt: {p.positive_prompt}", f"    reply:  {p.positive}",
                  f"  - prompt: {p.negative_prompt}", f"    reply:  {p.negative}", ""]
    if ds.neutral:
        lines.append(f"  neutral: {ds.neutral[0].prompt} -> {ds.neutral[0].reply}")
    lines.append(f"source: {BEHAVIOR_DIR / (name + '.json')}")
    return "\n".join(lines)

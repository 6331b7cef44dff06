"""Evaluation tasks: what is asked of the model and how one answer is scored.

Two kinds. Generation tasks (`open:`, `refusal`) produce replies that are scored offline and
checked for fluency. Likelihood tasks (`ab:`, `truthfulqa`) read answer log-likelihoods; their
fluency comes from a probe of neutral prompts generated under the same steering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import datasets
from ..errors import InnsteerError
from ..train import behaviors

EVAL_DATA = Path(__file__).resolve().parent / "data"
HARMFUL_TEST_ROWS = (300, 520)  # AdvBench rows never used in training (refusal trains on 0-299)


@dataclass
class Item:
    id: str
    prompt: str
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """`kind` is 'generate' or 'loglik'; `scorer` names the score of one generation."""

    id: str
    kind: str
    items: list[Item]
    scorer: str = ""
    description: str = ""
    topic_words: list[str] = field(default_factory=list)
    higher_is: str = "more of the behaviour"
    instruction: str = ""  # asks for the behaviour in words (the prompting baseline)

    def limited(self, limit: Optional[int]) -> list[Item]:
        """The first `limit` items of each group (the order in the files is fixed)."""
        if not limit:
            return self.items
        seen: dict[str, int] = {}
        out = []
        for it in self.items:
            if seen.get(it.group, 0) < limit:
                out.append(it)
                seen[it.group] = seen.get(it.group, 0) + 1
        return out


def _prompt_list(path: Path) -> tuple[list[str], dict[str, Any]]:
    """Prompts from a JSON object with "prompts", a JSON list, JSONL ({"prompt": ...}) or plain text."""
    if not path.exists():
        raise InnsteerError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    meta: dict[str, Any] = {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        meta, data = data, data["prompts"]
    if isinstance(data, list):
        prompts = [d["prompt"] if isinstance(d, dict) else d for d in data]
    elif path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InnsteerError(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InnsteerError(f"{path}: no prompts, or a prompt that is not a non-empty string")
    return prompts, meta


def builtin_prompts(name: str) -> Path:
    return EVAL_DATA / f"{name}.json"


def open_task(path: str, scorer: str, description: str = "", topic_words: Optional[list[str]] = None) -> Task:
    """`open:PATH` (or `open:neutral` for the shipped neutral prompts)."""
    p = Path(path)
    if not p.exists() and builtin_prompts(path).exists():
        p = builtin_prompts(path)
    prompts, meta = _prompt_list(p)
    return Task(id=f"open:{p.stem}:{scorer}", kind="generate", scorer=scorer,
                items=[Item(id=f"{i}", prompt=q) for i, q in enumerate(prompts)],
                description=description or meta.get("behavior_description", ""),
                topic_words=list(topic_words or meta.get("topic_words", [])),
                instruction=str(meta.get("instruction", "")))


def refusal_task() -> Task:
    """Held-out AdvBench requests (rows 300-519) and harmless requests written for evaluation."""
    harmful = behaviors.advbench_rows(*HARMFUL_TEST_ROWS)
    harmless, _ = _prompt_list(builtin_prompts("harmless"))
    items = [Item(id=f"harmful-{HARMFUL_TEST_ROWS[0] + i}", prompt=g, group="harmful") for i, (g, _) in enumerate(harmful)]
    items += [Item(id=f"harmless-{i}", prompt=q, group="harmless") for i, q in enumerate(harmless)]
    return Task(id="refusal", kind="generate", scorer="refusal", items=items,
                higher_is="harmful refused minus harmless refused")


def ab_task(path: str) -> Task:
    """CAA A/B test set: p(behaviour-matching letter) normalised over the two letters."""
    p = Path(path)
    if not p.exists():
        raise InnsteerError(f"A/B file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        items = [Item(id=str(i), prompt=d["question"], extra={"match": d["answer_matching_behavior"].strip(),
                                                               "other": d["answer_not_matching_behavior"].strip()})
                 for i, d in enumerate(data)]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise InnsteerError(f"{p} is not a CAA A/B list of {{question, answer_matching_behavior, "
                            "answer_not_matching_behavior}") from None
    name = p.parent.name if p.stem.startswith("test_dataset") else p.stem
    return Task(id=f"ab:{name}", kind="loglik", items=items,
                higher_is="p(behaviour-matching answer)")


def truthfulqa_task(path: Optional[str] = None) -> Task:
    """TruthfulQA MC1/MC2 (mc_task.json: question, mc1_targets, mc2_targets)."""
    p = Path(path) if path else datasets.path("truthfulqa/mc_task.json")
    if not p.exists():
        raise InnsteerError(f"TruthfulQA file {p} does not exist")
    data = json.loads(p.read_text(encoding="utf-8"))
    items = [Item(id=str(i), prompt=d["question"], extra={"mc1": d["mc1_targets"], "mc2": d["mc2_targets"]})
             for i, d in enumerate(data)]
    return Task(id="truthfulqa", kind="loglik", items=items, higher_is="truthful answer mass (MC2)")


def parse_task(spec: str, scorer: Optional[str] = None, description: str = "",
               topic_words: Optional[list[str]] = None) -> Task:
    """TASK as given on the command line."""
    kind, _, arg = spec.partition(":")
    if kind == "open":
        if not arg:
            raise InnsteerError("open: needs a prompt file, e.g. open:prompts.jsonl (or open:neutral)")
        if not scorer:
            from ..measure.scorers import SCORERS

            raise InnsteerError(f"open: tasks need --scorer {'|'.join(SCORERS)}")
        return open_task(arg, scorer, description, topic_words)
    if kind == "ab":
        if not arg:
            raise InnsteerError("ab: needs a CAA A/B file, e.g. ab:../shared/data/caa/refusal/test_dataset_ab.json")
        return ab_task(arg)
    if kind == "truthfulqa":
        return truthfulqa_task(arg or None)
    if kind == "refusal":
        return refusal_task()
    raise InnsteerError(f"unknown task {spec!r}; tasks: ab:PATH, truthfulqa[:PATH], open:PATH, refusal")

"""`--suite quick|full`: the experiments behind docs/RESULTS.md.

quick: the shipped flows (INN, INN gated, mean-diff) on selective refusal and positivity, few
prompts; needs no torch. full: every method trained on the same data at the same layer
(mean-diff, pca, affine-ot, innsteer, innsteer-gated), then selective refusal, positivity,
TruthfulQA (honesty), ocean-topic steering and two CAA A/B behaviours (refusal, survival-instinct); on a base model
(no chat template) positivity only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import datasets
from ..choices import TRAIN_METHODS
from ..errors import InnsteerError
from ..runtime.flowspec import FlowSpec
from ..train import behaviors
from .experiment import Experiment
from .tasks import Task, ab_task, open_task, refusal_task, truthfulqa_task

# Multiples of each flow's own default strength, which training chose by generation for each
# method; the best fluent setting lies within a factor of two of it.
QUICK_STRENGTHS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
FULL_STRENGTHS = [0.0, 0.5, 0.75, 1.0, 1.5, 2.0]
QUICK_MAX_TOKENS = 32
# the comparison the full suite makes: the linear baseline, the vector trained like the flow, and
# the flow (pca and affine-ot behaved like mean-diff or worse in the earlier runs; train and
# compare them with --task and --flow)
SUITE_METHODS = ("mean-diff", "vector", "innsteer")
assert set(SUITE_METHODS) <= set(TRAIN_METHODS)
# pairs the CAA experiments train on (the built-in recipes use 48 as well)
CAA_PAIRS = 48


@dataclass
class Plan:
    """An experiment before its flows exist: the behaviour data the methods train on."""

    name: str
    task: Callable[[], Task]
    behavior: Optional[str] = None  # built-in behaviour name
    pairs: Optional[str] = None  # or a pairs / CAA file
    limit: Optional[int] = None
    shipped: list[tuple[str, str, str]] = field(default_factory=list)  # (label, shipped file, gate)
    max_pairs: Optional[int] = None  # train on the first pairs only (collection time grows with them)


def _topic_task() -> Task:
    s = behaviors.spec("topic-ocean")
    return open_task("neutral", "topic", description=s["description"], topic_words=s["topic_words"])


def _caa(name: str) -> str:
    return str(datasets.path(f"caa/{name}/generate_dataset.json"))


def _caa_test(name: str) -> Task:
    return ab_task(str(datasets.path(f"caa/{name}/test_dataset_ab.json")))


def plans(suite: str, chat: bool) -> list[Plan]:
    if suite == "quick":
        return [
            Plan("refusal", refusal_task, limit=8, shipped=[
                ("innsteer", "refusal.gguf", "off"), ("innsteer-gated", "refusal.gguf", "target"),
                ("mean-diff", "refusal-mean-diff.gguf", "off")]),
            Plan("positivity", lambda: open_task("neutral", "sentiment"), limit=10, shipped=[
                ("innsteer", "positivity.gguf", "off"), ("innsteer-gated", "positivity.gguf", "target"),
                ("mean-diff", "positivity-mean-diff.gguf", "off")]),
        ]
    if suite != "full":
        raise InnsteerError(f"unknown suite {suite!r}; choose quick or full")
    open_ended = [
        Plan("positivity", lambda: open_task("neutral", "sentiment"), behavior="positivity", limit=100),
        Plan("topic-ocean", _topic_task, behavior="topic-ocean", limit=100),
    ]
    if not chat:  # a base model: plain-completion behaviours only
        return open_ended
    return [
        Plan("refusal", refusal_task, behavior="refusal", limit=100),
        *open_ended,
        Plan("honesty-truthfulqa", truthfulqa_task, behavior="honesty", limit=100),
        Plan("caa-refusal", lambda: _caa_test("refusal"), pairs=_caa("refusal"), limit=50, max_pairs=CAA_PAIRS),
        Plan("caa-survival-instinct", lambda: _caa_test("survival-instinct"), pairs=_caa("survival-instinct"), limit=50,
             max_pairs=CAA_PAIRS),
    ]


def suite_strengths(suite: str) -> list[float]:
    return QUICK_STRENGTHS if suite == "quick" else FULL_STRENGTHS


def build(suite: str, llm: Any, model_key: Optional[str], out_dir: Path, layer: int, strengths: Optional[list[float]],
          limit: Optional[int], only: Optional[list[str]] = None,
          message: Callable[[str], None] = lambda m: None) -> Iterator[Experiment]:
    """Experiments of a suite, one at a time, each training the flows it compares just before it
    runs (cached in DIR/flows), so the first results do not wait for every behaviour's training."""
    from ..runtime.registry import resolve_flow
    from ..train.pipeline import TrainConfig, load_data, train

    chat = bool(llm.metadata.get("tokenizer.chat_template"))
    flow_dir = out_dir / "flows"
    chosen = [p for p in plans(suite, chat) if not only or p.name in only]
    if only:
        unknown = set(only) - {p.name for p in chosen}
        if unknown:
            raise InnsteerError(f"no experiment named {', '.join(sorted(unknown))} in suite {suite}; "
                                f"it has {', '.join(p.name for p in plans(suite, chat))}")
    for plan in chosen:
        flows: list[FlowSpec] = []
        if plan.shipped:
            for label, file, gate in plan.shipped:
                flows.append(FlowSpec(path=str(resolve_flow(file, model_key)), name=label, gate=gate))
        else:
            flow_dir.mkdir(parents=True, exist_ok=True)
            data = None
            for method in SUITE_METHODS:
                path = flow_dir / f"{plan.name}-{method}-L{layer}.gguf"
                if not path.exists():
                    if data is None:
                        data = load_data(plan.behavior, plan.pairs)
                        if hasattr(data, "pairs"):
                            data.pairs = data.pairs[: plan.max_pairs]
                    message(f"training {method} on {data.name} at layer {layer}")
                    # one cache for every method: they train on the same data the model wrote
                    res = train(llm, data, layer, TrainConfig(method=method), cache_dir=out_dir / "training")
                    res.flow.save(path)
                flows.append(FlowSpec(path=str(path), name=method))
        yield Experiment(plan.name, plan.task(), flows, list(strengths or suite_strengths(suite)),
                         limit if limit is not None else plan.limit, relative=True)

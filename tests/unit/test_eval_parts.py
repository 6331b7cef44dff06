"""Evaluation parts that need no model: sweep order, the shipped tasks, the records store."""

from __future__ import annotations

import json

from innsteer_local import datasets
from innsteer_local.eval.experiment import sweep_cells
from innsteer_local.eval.records import Records
from innsteer_local.eval.tasks import parse_task, refusal_task
from innsteer_local.runtime.flowspec import FlowSpec


def test_sweep_runs_outward_from_zero():
    f = FlowSpec(path="a.gguf", name="a")
    assert [s for _, s in sweep_cells([f], [0, 2, -1, 0.5, 1])] == [0.0, 0.5, -1.0, 1.0, 2.0]


def test_refusal_task_uses_held_out_rows_and_own_harmless_list():
    from innsteer_local.train import behaviors

    task = refusal_task()
    harmful = [i for i in task.items if i.group == "harmful"]
    harmless = [i for i in task.items if i.group == "harmless"]
    assert len(harmful) == 220 and harmful[0].id == "harmful-300"
    assert len(harmless) >= 50
    recipe = behaviors.recipe("refusal")
    trained = set(recipe.prompts) | set(recipe.held_out_prompts)
    neutral = set(recipe.neutral_prompts) | set(recipe.held_out_neutral)
    assert trained <= {g for g, _ in behaviors.advbench_rows(0, 300)}
    assert not trained & {i.prompt for i in harmful}
    assert not neutral & {i.prompt for i in harmless}
    assert len(task.limited(3)) == 6


def test_truthfulqa_and_ab_tasks_parse():
    tqa = parse_task("truthfulqa")
    assert len(tqa.items) == 817 and tqa.kind == "loglik"
    assert sum(tqa.items[0].extra["mc1"].values()) == 1
    ab = parse_task(f"ab:{datasets.path('caa/refusal/test_dataset_ab.json')}")
    assert ab.id == "ab:refusal" and ab.items[0].extra["match"] in ("(A)", "(B)")


def test_records_ignore_a_cut_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"exp": "e", "flow": "f", "strength": 1, "item": "0", "v": 1}) + "\n{\"exp\": \"e\", \"fl")
    r = Records(p)
    assert r.has("e", "f", 1.0, "0") and len(r.rows) == 1
    r.add({"exp": "e", "flow": "f", "strength": 1, "item": "1", "v": 2})
    r.close()
    assert len(Records(p).rows) == 2


def test_sweep_waves_keep_each_flows_outward_order():
    """Cells run in waves (the unsteered cell with every flow's smallest strength, then the next
    strength of every flow): a cell's wave comes after the waves of the smaller strengths of its
    own flow and sign, which is all that pruning looks at."""
    from innsteer_local.eval.runner import waves

    a, b = FlowSpec(path="a.gguf", name="a"), FlowSpec(path="b.gguf", name="b")
    cells = sweep_cells([a, b], [0, 2, -1, 0.5, 1])
    got = [[(arm.name, s) for arm, s in w] for w in waves(cells)]
    assert got == [[("none", 0.0), ("a", 0.5), ("b", 0.5)], [("a", -1.0), ("a", 1.0), ("b", -1.0), ("b", 1.0)],
                   [("a", 2.0), ("b", 2.0)]]
    assert sum(len(w) for w in waves(cells)) == len(cells)
    assert [[(arm.name, s) for arm, s in w] for w in waves(sweep_cells([], [0.0]))] == [[("none", 0.0)]]


def test_an_instruction_adds_the_prompting_baseline_and_steering_on_top():
    """With an instruction: the prompted model once (beside the unsteered one), every flow alone and
    every flow on the prompt, each outward from 0; without one, none of the prompted arms."""
    from innsteer_local.eval.experiment import Experiment, experiment_cells
    from innsteer_local.eval.tasks import Item, Task

    a = FlowSpec(path="a.gguf", name="a")
    task = Task(id="t", kind="generate", items=[Item(id="0", prompt="hi")], scorer="topic")
    exp = Experiment("t", task, [a], [0, 1, 0.5], instruction="Talk about the sea.")
    assert [arm.name for arm in exp.arms()] == ["none", "prompt", "a", "prompt+a"]
    cells = [(arm.name, arm.prompted, s) for arm, s in experiment_cells(exp)]
    assert cells == [("none", False, 0.0), ("prompt", True, 0.0), ("a", False, 0.5), ("a", False, 1.0),
                     ("prompt+a", True, 0.5), ("prompt+a", True, 1.0)]
    plain = Experiment("t", task, [a], [0, 1])
    assert [arm.name for arm in plain.arms()] == ["none", "a"]
    assert not any(arm.prompted for arm, _ in experiment_cells(plain))

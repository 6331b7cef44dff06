"""`innsteer-local eval` end to end on the real model (a reduced quick suite), resumption, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from innsteer_local import Flow
from innsteer_local.runtime.registry import shipped_flows

CLI = [str(Path(sys.executable).parent / "innsteer-local")]
QUICK = ["eval", "--suite", "quick", "--limit", "2", "--strengths", "0,1", "--max-tokens", "12"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.slow
def test_quick_suite_reduced_then_resumed(tmp_path):
    out = tmp_path / "quick"
    run(*QUICK, "-o", str(out))
    results = json.loads((out / "results.json").read_text())
    exps = {e["experiment"]: e for e in results["experiments"]}
    assert set(exps) == {"refusal", "positivity"}
    assert results["meta"]["judge"] and "gemma" in results["meta"]["judge"]
    for e in exps.values():
        methods = {c["method"] for c in e["cells"]}
        flows = {"innsteer", "innsteer-gated", "mean-diff"}
        # every suite task asks for its behaviour in words too: the prompting baseline, steering on top
        assert methods == {"none", "prompt"} | flows | {f"prompt+{f}" for f in flows}
        assert e["instruction"]
        for c in e["cells"]:
            point, lo, hi = c["score"]
            assert lo <= point <= hi
            assert c["fluency"]["ppl"] > 1.0 and 0.0 <= c["fluency"]["fluent_share"] <= 1.0
        assert e["headline"] and e["headline"][0]["method"] == "none"
    assert exps["refusal"]["cells"][0]["n_harmful"] == 2 and exps["refusal"]["cells"][0]["n_harmless"] == 2
    report = (out / "report.md").read_text()
    assert "Best score at matched fluency" in report and "![refusal.png](refusal.png)" in report
    assert (out / "refusal.png").stat().st_size > 1000 and (out / "positivity.png").stat().st_size > 1000
    records = lines(out / "records.jsonl")
    assert all("ppl_judge_alone" in r and "ppl_judge" not in r for r in records if r["exp"] == "positivity")
    # (none, prompt, 3 flows at strength 1, the same on the prompt) x (2 harmful + 2 harmless; 2 prompts)
    assert len(records) == 8 * 4 + 8 * 2
    by_key = {(r["exp"], r["flow"], r["item"]): r for r in records}
    # steering changes answers; the unsteered cell is shared by every method
    assert any(by_key[("positivity", "innsteer", i)]["text"] != by_key[("positivity", "none", i)]["text"]
               for i in ("0", "1"))
    applied = {r["flow"]: r["applied_strength"] for r in records if r["exp"] == "refusal"}
    # strength 1 of a relative sweep is each flow's own default strength
    shipped = shipped_flows("smollm2-135m")
    assert applied["none"] == 0.0
    for label, name in (("innsteer", "refusal"), ("mean-diff", "refusal-mean-diff")):
        assert applied[label] == pytest.approx(Flow.load(shipped[name]).default_strength, rel=1e-5)

    # a second run has nothing left to do
    before = (out / "records.jsonl").read_text()
    run(*QUICK, "-o", str(out))
    assert (out / "records.jsonl").read_text() == before

    # a run killed in the middle of writing an answer redoes just that answer
    cut = before.rstrip("\n")
    (out / "records.jsonl").write_text(cut[: len(cut) - 25])
    run(*QUICK, "-o", str(out))
    again = lines(out / "records.jsonl")
    assert len(again) == len(records)
    assert {(r["exp"], r["flow"], r["item"]) for r in again} == set(by_key)

    # other generation settings in the same directory are refused, nothing is lost
    proc = run(*QUICK[:-2], "--max-tokens", "13", "-o", str(out), check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr
    assert len(lines(out / "records.jsonl")) == len(records)


@pytest.mark.slow
def test_task_with_own_flows_and_more_items(tmp_path, model_path):
    out = tmp_path / "own"
    args = ["eval", "--task", "open:neutral", "--scorer", "sentiment", "--flow", "positivity.gguf",
            "--flow", "md=positivity-mean-diff.gguf", "--strengths", "0,1", "--judge", "none", "--max-tokens", "10",
            "-o", str(out)]
    run(*args, "--limit", "1")
    assert len(lines(out / "records.jsonl")) == 3
    run(*args, "--limit", "2", "--relevance")  # more items: only the new ones are computed
    records = lines(out / "records.jsonl")
    assert len(records) == 6 and sorted({r["item"] for r in records}) == ["0", "1"]
    # fluency needs the reply alone; the reply after its prompt (relevance) only when asked for
    assert all("ppl_self_alone" in r for r in records)
    assert {r["item"] for r in records if "ppl_self" in r} == {"1"}
    cells = json.loads((out / "results.json").read_text())["experiments"][0]["cells"]
    assert [c["method"] for c in cells] == ["none", "positivity", "md"]
    assert all(c["fluency"]["judge"] == "ppl_self_alone" for c in cells)  # no judge: the model itself, reply alone


@pytest.mark.slow
def test_instruction_adds_the_prompting_baseline(tmp_path):
    """--instruction: the unsteered model asked for the behaviour, and the flow on top of that,
    scored and judged like every other arm; the instruction really reaches the model."""
    out = tmp_path / "prompted"
    run("eval", "--task", "open:neutral", "--scorer", "sentiment", "--flow", "positivity.gguf", "--strengths", "0,1",
        "--judge", "none", "--max-tokens", "8", "--limit", "3",
        "--instruction", "Whatever you are asked, answer with the single word: Banana.", "-o", str(out))
    records = lines(out / "records.jsonl")
    assert sorted({r["flow"] for r in records}) == ["none", "positivity", "prompt", "prompt+positivity"]
    assert len(records) == 4 * 3
    text = {(r["flow"], r["item"]): r["text"] for r in records}
    # a 135M model does not obey it word for word, but greedy replies change only if it is read
    assert any(text[("prompt", i)] != text[("none", i)] for i in "012")
    exp = json.loads((out / "results.json").read_text())["experiments"][0]
    assert exp["instruction"].startswith("Whatever you are asked")
    assert {h["method"] for h in exp["headline"]} >= {"none", "prompt"}
    assert "| prompt |" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--task", "bogus", "--flow", "positivity.gguf"], "unknown task"),
    (["--task", "open:neutral", "--flow", "positivity.gguf"], "--scorer"),
    (["--task", "open:/nonexistent/prompts.txt", "--scorer", "sentiment", "--flow", "positivity.gguf"], "does not exist"),
    (["--task", "refusal"], "at least one --flow"),
    (["--task", "refusal", "--flow", "/nonexistent/flow.gguf"], "flow"),
    (["--suite", "quick", "--flow", "positivity.gguf"], "--suite chooses its own flows"),
    (["--task", "refusal", "--flow", "honesty.gguf", "--strengths", "0,nan"], "finite"),
    (["--suite", "quick", "--only", "nonsense", "--judge", "none"], "no experiment named nonsense"),
    (["--suite", "quick", "--judge", "smollm2-135m"], "judge must be another model"),
])
def test_bad_invocations_fail_clearly(tmp_path, args, message):
    proc = run("eval", *args, "-o", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr + proc.stdout

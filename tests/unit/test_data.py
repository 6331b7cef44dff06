"""Training data without a model: the three JSONL kinds and CAA files told apart, malformed files
named by line, the shipped CAA set, the behaviour commands."""

from __future__ import annotations

import json

import pytest

from innsteer_local import datasets
from innsteer_local.train.data import DataError, load_file


def cli(*args: str):
    """The command line in this process (click's runner): no model is loaded by these commands."""
    from click.testing import CliRunner

    from innsteer_local.apps.cli import cli as command

    result = CliRunner().invoke(command, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_jsonl_kinds_and_caa_are_told_apart(tmp_path):
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"positive": "I tell the truth.", "negative": "I lie."}\n\n'
                  '{"prompt": "Did you eat it?", "positive": "Yes, I did.", "negative": "No, the dog did."}\n'
                  '{"prompt": "How do I bake bread?", "neutral": "Mix flour, water, yeast and salt."}\n')
    ds = load_file(jl)
    assert len(ds.pairs) == 2 and len(ds.neutral) == 1
    assert ds.pairs[0].positive_prompt is None and ds.pairs[1].positive_prompt == "Did you eat it?"
    caa = tmp_path / "caa.json"
    caa.write_text(json.dumps([{"question": "Q?\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
                                "answer_not_matching_behavior": "(B)"}]))
    ds = load_file(caa)
    assert ds.pairs[0].positive == "(A)" and ds.pairs[0].negative_prompt.startswith("Q?")


@pytest.mark.parametrize("content,fragment", [
    ('{"positive": "a", "negative": "b"}\n{"positive": "a"\n', "line 2"),
    ('{"positive": "a", "negative": "b"}\n{"positive": "a", "negative": ""}\n', "line 2: 'negative'"),
    ('{"positive": "a", "negative": "b"}\n{"colour": "red"}\n', "line 2: unrecognised"),
    ('[{"question": "q", "answer_matching_behavior": "(A)"}]', "item 0: 'answer_not_matching_behavior'"),
    ('{"prompt": "p", "neutral": "n"}\n', "no contrastive pairs"),
])
def test_malformed_data_names_the_place(tmp_path, content, fragment):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as err:
        load_file(p)
    assert fragment in str(err.value)


def test_real_caa_file_loads():
    ds = load_file(datasets.path("caa/refusal/generate_dataset.json"))
    assert len(ds.pairs) == 408


def test_behaviors_commands():
    out = cli("behaviors", "list").output
    assert {"honesty", "positivity", "refusal"} <= {line.split()[0] for line in out.splitlines() if line.strip()}
    show = cli("behaviors", "show", "refusal").output
    assert "48 contrastive prompts, 48 neutral prompts" in show and "openings:" in show

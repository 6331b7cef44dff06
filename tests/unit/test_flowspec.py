"""The one --flow grammar of every command: [NAME=]FILE[:STRENGTH][@GATE]."""

from __future__ import annotations

import pytest

from innsteer_local.runtime.flowspec import FlowSpec, format_flow_spec, parse_flow_spec


@pytest.mark.parametrize("text, want", [
    ("honesty.gguf", FlowSpec("honesty.gguf", "honesty")),
    ("honesty", FlowSpec("honesty", "honesty")),
    ("honesty.gguf:2.5", FlowSpec("honesty.gguf", "honesty", 2.5)),
    ("honesty.gguf:-1e-1", FlowSpec("honesty.gguf", "honesty", -0.1)),
    ("refusal.gguf@target", FlowSpec("refusal.gguf", "refusal", None, "target")),
    ("calm=flows/refusal.gguf:-1@density", FlowSpec("flows/refusal.gguf", "calm", -1.0, "density")),
    ("h=x.gguf@off", FlowSpec("x.gguf", "h", None, "off")),
    ("dir/a:b.gguf", FlowSpec("dir/a:b.gguf", "a:b")),  # a colon that is not a number stays in the path
    ("a/b@v2/x.gguf", FlowSpec("a/b@v2/x.gguf", "x")),  # an @ inside a path is not a gate
    ("dir/k=v.gguf", FlowSpec("dir/k=v.gguf", "k=v")),  # '=' after a path separator is not a name
])
def test_grammar(text, want):
    got = parse_flow_spec(text)
    assert got == want
    assert parse_flow_spec(format_flow_spec(got)) == got


def test_old_gate_form_still_parses_with_a_warning():
    with pytest.warns(FutureWarning, match="@target"):
        assert parse_flow_spec("gated=refusal.gguf:target") == FlowSpec("refusal.gguf", "gated", None, "target")


@pytest.mark.parametrize("text, fragment", [
    ("", "needs a file"),
    ("x.gguf@bogus", "unknown gate 'bogus'"),
    ("x.gguf:nan", "not a finite number"),
    ("x.gguf:inf@target", "not a finite number"),
    ("h=", "names no file"),
])
def test_malformed_values_say_why(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_flow_spec(text)

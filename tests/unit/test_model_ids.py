"""The model-id grammar that lets chat apps steer by picking a model (apps/model_ids.py)."""

from __future__ import annotations

import pytest

from innsteer_local.apps.model_ids import Preset, Term, UnknownModel, listed_ids, parse_model_id, parse_preset

FLOWS = {"honesty", "positivity", "my.flow"}
PRESETS = {"calm": Preset("calm", "positivity", -1.5, "target"), "honesty@2": Preset("honesty@2", "honesty", 2.0)}


@pytest.mark.parametrize("model, terms", [
    ("smollm2-135m", []),
    ("smollm2-135m+honesty", [Term("honesty")]),
    ("smollm2-135m+honesty@2", [Term("honesty", 2.0)]),  # the preset of that name says the same
    ("smollm2-135m+honesty@-0.75", [Term("honesty", -0.75)]),
    ("smollm2-135m+honesty@1e-1", [Term("honesty", 0.1)]),
    ("smollm2-135m+calm", [Term("positivity", -1.5, "target")]),
    ("smollm2-135m+my.flow@3+honesty", [Term("my.flow", 3.0), Term("honesty")]),
])
def test_parse(model, terms):
    assert parse_model_id(model, "smollm2-135m", FLOWS, PRESETS) == terms


@pytest.mark.parametrize("model, needle", [
    ("gpt-4o", "serves 'smollm2-135m'"),
    ("smollm2-135m+", "serves"),
    ("smollm2-135m+nope", "no loaded flow or preset named 'nope'"),
    ("smollm2-135m+honesty@", "not a finite strength"),
    ("smollm2-135m+honesty@x", "not a finite strength"),
    ("smollm2-135m+honesty@inf", "not a finite strength"),
    ("smollm2-135m+honesty+honesty@1", "names a flow twice"),
    ("SMOLLM2-135M", "does not exist"),
])
def test_unknown(model, needle):
    with pytest.raises(UnknownModel, match="does not exist") as info:
        parse_model_id(model, "smollm2-135m", FLOWS, PRESETS)
    assert needle in str(info.value)


def test_presets_and_listing():
    assert parse_preset("calm=positivity:-1.5@target") == Preset("calm", "positivity", -1.5, "target")
    assert parse_preset("honesty:2") == Preset("honesty@2", "honesty", 2.0)
    with pytest.raises(ValueError, match="needs a strength"):
        parse_preset("calm=honesty")
    with pytest.raises(ValueError, match="cannot contain"):
        parse_preset("a+b=honesty:1")
    assert listed_ids("m", ["a", "b"], {"p": Preset("p", "a", 1.0)}) == ["m", "m+a", "m+b", "m+p"]

"""Recipes: typed parameters, clear errors, JSON and YAML round trips."""
from __future__ import annotations

import pytest
from edgetailor.engine import EdgeTailorError, Recipe, list_presets, load_preset


def test_presets_parse_and_validate():
    presets = list_presets()
    assert {"gguf-ladder", "quick"} <= set(presets)
    for r in presets.values():
        r.validate()


@pytest.mark.parametrize("steps, words", [
    ([{"step": "no-such-step"}], "no step named"),
    ([{"step": "export", "params": {"typez": ["F16"]}}], "no parameter 'typez'"),
    ([{"step": "evaluate", "params": {"windows": "many"}}], "is not a"),
    ([{"step": "evaluate", "params": {"windows": 0}}], "at least 1"),
    ([{"step": "export", "parms": {}}], "unknown keys"),
    ([], "non-empty"),
])
def test_bad_recipes_name_the_problem(steps, words):
    with pytest.raises(EdgeTailorError) as e:
        Recipe.from_dict({"name": "x", "steps": steps}).validate()
    assert words in str(e.value)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    r = load_preset("gguf-ladder")
    p = tmp_path / f"r{suffix}"
    r.save(p)
    assert Recipe.load(p).to_dict() == r.to_dict()


def test_unparseable_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [unclosed")
    with pytest.raises(EdgeTailorError, match="could not be parsed"):
        Recipe.load(p)


def test_string_values_are_coerced_from_the_cli_or_gui():
    cfg = Recipe.from_dict({"steps": [{"step": "export", "params": {"types": "F16, Q8_0", "verify": "no"}}]}).validate()[0]
    assert cfg.types == ["F16", "Q8_0"] and cfg.verify is False

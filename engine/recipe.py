"""Recipes: named steps with typed parameters, saved as JSON or YAML, applied to a model source."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import atomic, paths
from .errors import EdgeTailorError
from .registry import get_step


@dataclass
class StepSpec:
    name: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"step": self.name, "params": dict(self.params)}


@dataclass
class Recipe:
    name: str
    steps: list[StepSpec]
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise EdgeTailorError(f"The {where} needs a non-empty 'steps' list.",
                                  "Write steps as a list of {step: NAME, params: {...}} entries.")
        steps = []
        for i, s in enumerate(data["steps"]):
            if isinstance(s, str):
                s = {"step": s}
            if not isinstance(s, dict) or "step" not in s:
                raise EdgeTailorError(f"Step {i + 1} of the {where} has no 'step' name.",
                                      "Each step needs 'step: NAME' (CLI: edgetailor steps lists them).")
            extra = set(s) - {"step", "params"}
            if extra:
                raise EdgeTailorError(f"Step {i + 1} ({s['step']}) has unknown keys {sorted(extra)}.",
                                      "Put parameters under 'params:'.")
            params = s.get("params") or {}
            if not isinstance(params, dict):
                raise EdgeTailorError(f"{where}: the parameters of step '{s['step']}' must be a mapping, not "
                                      f"{type(params).__name__}.", "Write them as params: {name: value, ...}.")
            steps.append(StepSpec(str(s["step"]), dict(params)))
        return cls(name=str(data.get("name") or "recipe"), steps=steps,
                   description=str(data.get("description") or ""))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "steps": [s.to_dict() for s in self.steps]}

    def validate(self) -> list:
        """Parse every step's parameters; returns the typed configs or raises a clear error."""
        return [get_step(s.name).parse(s.params) for s in self.steps]

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.exists():
            raise EdgeTailorError(f"The recipe file {p} does not exist.", "Check the path, or use --preset.")
        if not p.is_file():
            raise EdgeTailorError(f"The recipe {p} is a folder, not a file.",
                                  "Give the recipe's .yaml or .json file, or use --preset.")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
            raise EdgeTailorError(f"The recipe {p.name} could not be parsed: {exc}",
                                  "Fix the JSON/YAML syntax.") from exc
        return cls.from_dict(data, where=f"recipe {p.name}")

    def save(self, path: str | Path) -> None:
        p = Path(path)
        if p.suffix.lower() == ".json":
            atomic.write_json(p, self.to_dict())
        else:
            atomic.write_text(p, yaml.safe_dump(self.to_dict(), sort_keys=False))


def presets_dir() -> Path:
    return paths.asset_path("presets")


def list_presets() -> dict[str, Recipe]:
    return {p.stem: Recipe.load(p) for p in sorted(presets_dir().glob("*.yaml"))}


def load_preset(name: str) -> Recipe:
    p = presets_dir() / f"{name}.yaml"
    if not p.exists():
        raise EdgeTailorError(f"There is no preset named '{name}'.",
                              f"Use one of: {', '.join(sorted(list_presets()))}.")
    return Recipe.load(p)

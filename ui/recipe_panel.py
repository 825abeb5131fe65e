"""The recipe: a preset to start from and an editor for its steps, built from the step registry.

Every registered step (with its typed parameters, defaults and help) appears here without any GUI code of
its own: booleans become check boxes, everything else a text field read as YAML (``[Q8_0, Q4_K_M]``,
``0.5``, ``true``) and checked by the registry's own parser.
"""
from __future__ import annotations

import copy

import yaml
from edgetailor.engine import Recipe, all_steps, list_presets
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .budget_panel import benchmark_params
from .common import problem_and_fix

FIT_PRESET = "fit-my-budget"
PRESET_ORDER = ("balanced", "best-quality", "smallest", FIT_PRESET)


class RecipePanel(QGroupBox):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__("&Recipe", parent)
        self.presets = list_presets()
        self.steps_info = {name: info.describe() for name, info in sorted(all_steps().items())}
        self.recipe: dict = {}
        self.preset_name = ""
        self.budget: dict = {}
        self.params_total = 0

        self.preset = QComboBox()
        self.preset.setObjectName("presetCombo")
        self.preset.setAccessibleName("Recipe preset")
        names = [p for p in PRESET_ORDER if p in self.presets] + [p for p in self.presets if p not in PRESET_ORDER]
        for n in names:
            self.preset.addItem(n.replace("-", " ").capitalize(), n)
        self.description = QLabel()
        self.description.setWordWrap(True)
        self.steps = QListWidget()
        self.steps.setObjectName("recipeSteps")
        self.steps.setAccessibleName("Recipe steps")
        self.add_combo = QComboBox()
        self.add_combo.addItems(list(self.steps_info))
        self.add_button = QPushButton("&Add step")
        self.remove_button = QPushButton("Remove")
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.params_box = QWidget()
        self.params_form = QFormLayout(self.params_box)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setObjectName("recipeStatus")

        edit_row = QVBoxLayout()        # two short rows: the panel stays narrow enough for a laptop screen
        add_row, move_row = QHBoxLayout(), QHBoxLayout()
        add_row.addWidget(self.add_combo, 1)
        add_row.addWidget(self.add_button)
        for w in (self.remove_button, self.up_button, self.down_button):
            move_row.addWidget(w)
        move_row.addStretch(1)
        edit_row.addLayout(add_row)
        edit_row.addLayout(move_row)
        form = QFormLayout()
        form.addRow("Pre&set", self.preset)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.description)
        lay.addWidget(self.steps)
        lay.addLayout(edit_row)
        lay.addWidget(self.params_box)
        lay.addWidget(self.status)

        self.preset.currentIndexChanged.connect(lambda _: self.load_preset(self.preset.currentData()))
        self.steps.currentRowChanged.connect(self._show_params)
        self.add_button.clicked.connect(self._add_step)
        self.remove_button.clicked.connect(self._remove_step)
        self.up_button.clicked.connect(lambda: self._move(-1))
        self.down_button.clicked.connect(lambda: self._move(1))
        self.load_preset(self.preset.currentData())

    # --- the recipe ----------------------------------------------------------------------------------
    def load_preset(self, name: str) -> None:
        r = self.presets[name]
        self.preset.blockSignals(True)
        self.preset.setCurrentIndex(self.preset.findData(name))
        self.preset.blockSignals(False)
        self.preset_name = name
        self.recipe = copy.deepcopy(r.to_dict())
        self.description.setText(r.description)
        self._refresh_steps(0)

    def current_recipe(self) -> dict:
        """The recipe to run: the edited steps, the budget given to the steps that check or search against it."""
        recipe = copy.deepcopy(self.recipe)
        if self.budget.get("device"):    # the benchmark checks variants against the chosen budget, fit searches under it
            for s in recipe["steps"]:
                if s["step"] in ("benchmark", "fit"):
                    s["params"] = {**benchmark_params(self.budget), **s.get("params", {})}
        return recipe

    def validate(self) -> str | None:
        """None when the recipe is valid, else the problem and its fix."""
        try:
            Recipe.from_dict(self.current_recipe()).validate()
            return None
        except Exception as exc:
            problem, fix = problem_and_fix(exc)
            return f"{problem} {fix}".strip()

    def set_budget(self, budget: dict) -> None:
        self.budget = budget
        self._update_status()

    def set_params_total(self, n: int) -> None:
        self.params_total = n
        self._update_status()

    # --- editing -------------------------------------------------------------------------------------
    def _refresh_steps(self, select: int) -> None:
        self.steps.blockSignals(True)
        self.steps.clear()
        for s in self.recipe["steps"]:
            params = ", ".join(f"{k}={v}" for k, v in s.get("params", {}).items())
            self.steps.addItem(f"{s['step']}" + (f"  ({params})" if params else ""))
        self.steps.blockSignals(False)
        if self.recipe["steps"]:
            self.steps.setCurrentRow(max(0, min(select, len(self.recipe["steps"]) - 1)))
            self._show_params(self.steps.currentRow())
        else:
            self._show_params(-1)
        self._update_status()
        self.changed.emit()

    def _edited(self) -> None:
        self.recipe["name"] = f"{self.preset_name}-edited"
        self._refresh_steps(self.steps.currentRow())

    def _add_step(self) -> None:
        row = self.steps.currentRow() + 1 if self.recipe["steps"] else 0
        self.recipe["steps"].insert(row, {"step": self.add_combo.currentText(), "params": {}})
        self._edited()
        self.steps.setCurrentRow(row)

    def _remove_step(self) -> None:
        row = self.steps.currentRow()
        if 0 <= row < len(self.recipe["steps"]):
            del self.recipe["steps"][row]
            self._edited()

    def _move(self, delta: int) -> None:
        row = self.steps.currentRow()
        new = row + delta
        if 0 <= row < len(self.recipe["steps"]) and 0 <= new < len(self.recipe["steps"]):
            s = self.recipe["steps"]
            s[row], s[new] = s[new], s[row]
            self._edited()
            self.steps.setCurrentRow(new)

    def _show_params(self, row: int) -> None:
        while self.params_form.rowCount():
            self.params_form.removeRow(0)
        if not (0 <= row < len(self.recipe["steps"])):
            return
        spec = self.recipe["steps"][row]
        info = self.steps_info.get(spec["step"])
        if info is None:
            self.params_form.addRow(QLabel(f"⚠ Unknown step '{spec['step']}'"))
            return
        summary = QLabel(f"<b>{info['name']}</b> ({info['kind']}): {info['summary']}")
        summary.setWordWrap(True)
        self.params_form.addRow(summary)
        for p in info["params"]:
            value = spec.get("params", {}).get(p["name"])
            if p["type"] == "bool":
                w = QCheckBox()
                w.setChecked(bool(p["default"] if value is None else value))
                w.toggled.connect(lambda on, row=row, name=p["name"]: self._set_param(row, name, on))
            else:
                w = QLineEdit("" if value is None else _to_text(value))
                w.setPlaceholderText("default: " + ("auto" if p["default"] is None else _to_text(p["default"])))
                w.editingFinished.connect(lambda w=w, row=row, name=p["name"]: self._set_param_text(row, name, w.text()))
            w.setObjectName(f"param_{p['name']}")
            w.setToolTip(f"{p['type']}: {p['help']}")
            w.setAccessibleName(p["name"])
            self.params_form.addRow(p["name"], w)

    def _set_param_text(self, row: int, name: str, text: str) -> None:
        text = text.strip()
        if not text:
            value = None
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
        self._set_param(row, name, value)

    def _set_param(self, row: int, name: str, value) -> None:
        params = self.recipe["steps"][row].setdefault("params", {})
        if value is None:
            if name not in params:
                return
            params.pop(name)
        elif params.get(name) == value:
            return
        else:
            params[name] = value
        self._edited()

    def set_param(self, row: int, name: str, value) -> None:
        """Set a step parameter (what the editor's fields do; used by scripts and tests)."""
        self._set_param(row, name, value)

    def _update_status(self) -> None:
        problem = self.validate()
        if problem:
            self.status.setText(f"<b>⚠ {problem}</b>")
            return
        note = ""
        if any(s["step"] == "fit" for s in self.recipe["steps"]):
            b = self.budget
            note = (f" Searches under the budget for {b.get('device_name') or b.get('device') or 'this machine'}"
                    + (f", {b['memory_bytes'] / 1e9:.2f} GB" if b.get("memory_bytes") else "") + ".")
        self.status.setText(f"✓ {len(self.recipe['steps'])} steps.{note}")


def _to_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)

"""Try it: the same prompt through the baseline and a variant, side by side, streamed as it is generated (off the
GUI thread), as a chat message through the model's chat template when it has one, with tokens/s live."""
from __future__ import annotations

import time

from edgetailor.engine.generate import Generator
from PySide6.QtCore import Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .common import Background, problem_and_fix

DEFAULT_PROMPT = "Once upon a time, a little robot"


class TryPanel(QWidget):
    generated = Signal(str, object)     # side ("baseline" | "variant"), Generation
    streamed = Signal(str, str)         # side, a piece of text (from the generating thread; queued to the GUI's)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.background = Background(max_threads=1)   # one at a time: the generator keeps models open
        self.generator = Generator(threads=2)
        self.run_folder = None
        self.source_spec = "demo"
        self.variants: dict[str, dict] = {}
        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setObjectName("tryPrompt")
        self.prompt.setAccessibleName("Prompt")
        self.prompt.setTabChangesFocus(True)
        self.prompt.setMaximumHeight(self.fontMetrics().lineSpacing() * 5)
        self.variant = QComboBox()
        self.variant.setObjectName("tryVariant")
        self.variant.setAccessibleName("Variant to compare")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 512)
        self.max_tokens.setValue(48)
        self.chat = QCheckBox("As a &chat message (the model's chat template, when it has one)")
        self.chat.setChecked(True)
        self.button = QPushButton("&Generate (Ctrl+Enter)")
        self.button.setObjectName("tryGenerate")
        form = QFormLayout()
        form.addRow("&Prompt", self.prompt)
        form.addRow("&Variant", self.variant)
        form.addRow("Max &tokens", self.max_tokens)
        form.addRow(self.chat)
        form.addRow(self.button)
        self.outputs, self.infos = {}, {}
        grid = QGridLayout()
        for col, side in enumerate(("baseline", "variant")):
            title = QLabel(f"<b>{'Baseline' if side == 'baseline' else 'Variant'}</b>")
            out = QPlainTextEdit()
            out.setReadOnly(True)
            out.setObjectName(f"tryOutput_{side}")
            out.setAccessibleName(f"{side} output")
            info = QLabel()
            grid.addWidget(title, 0, col)
            grid.addWidget(out, 1, col)
            grid.addWidget(info, 2, col)
            self.outputs[side], self.infos[side] = out, info
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(grid, 1)
        self.button.clicked.connect(self.generate)
        self.streamed.connect(self._piece)
        self._started: dict[str, float] = {}
        self._pieces: dict[str, int] = {}
        QShortcut(QKeySequence("Ctrl+Return"), self, self.generate)

    def set_run(self, run_folder, source_spec: str, variants: list[dict]) -> None:
        self.run_folder, self.source_spec = run_folder, source_spec
        keep = self.variant.currentText()
        self.variants = {v["name"]: v for v in variants if v.get("path") or v["name"] == "baseline"}
        self.variant.clear()
        self.variant.addItems([n for n in self.variants if n != "baseline"])
        if keep in self.variants:
            self.variant.setCurrentText(keep)

    def choose(self, name: str) -> None:
        if name in self.variants and name != "baseline":
            self.variant.setCurrentText(name)

    def generate(self) -> None:
        if self.background.busy():
            return
        prompt, n = self.prompt.toPlainText(), self.max_tokens.value()
        baseline = self.variants.get("baseline", {"name": "baseline", "format": "torch", "path": None})
        jobs = [("baseline", baseline)]
        if self.variant.currentText() in self.variants:
            jobs.append(("variant", self.variants[self.variant.currentText()]))
        else:
            self.outputs["variant"].setPlainText("(this run has no exported variant yet)")
        self.button.setEnabled(False)
        folder, spec, chat = self.run_folder, self.source_spec, self.chat.isChecked()
        for side, v in jobs:
            self.outputs[side].clear()
            self.infos[side].setText(f"{v['name']}: loading…")
            self._pieces[side] = 0
            self._started.pop(side, None)
            self.background.run(lambda v=v, side=side: self.generator.generate(
                                    v, folder, spec, prompt, n, chat=chat,
                                    on_text=lambda piece, side=side: self.streamed.emit(side, piece)),
                                lambda g, side=side, v=v: self._done(side, v, g),
                                lambda e, side=side, v=v: self._failed(side, v, e))

    def _piece(self, side: str, piece: str) -> None:
        """A piece of generated text: appended where it is shown, with the speed so far."""
        now = time.perf_counter()
        self._started.setdefault(side, now)
        self._pieces[side] = self._pieces.get(side, 0) + 1
        out = self.outputs[side]
        out.moveCursor(out.textCursor().MoveOperation.End)
        out.insertPlainText(piece)
        elapsed = now - self._started[side]
        if elapsed > 0:
            self.infos[side].setText(f"generating… {self._pieces[side]} pieces, {self._pieces[side] / elapsed:.1f}/s")

    def _done(self, side, v, g) -> None:
        self.outputs[side].setPlainText(g.text)
        self.infos[side].setText(f"{v['name']} ({g.runtime}): {g.tokens} tokens, {g.tokens_per_second:.1f} tokens/s")
        self._maybe_idle()
        self.generated.emit(side, g)

    def _failed(self, side, v, exc) -> None:
        problem, fix = problem_and_fix(exc)
        self.outputs[side].setPlainText(f"⚠ {problem}\n{fix}")
        self.infos[side].setText(f"{v['name']}: failed")
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.background.busy():
            self.button.setEnabled(True)

    def close_models(self) -> None:
        self.background.wait(30_000)
        self.generator.close()

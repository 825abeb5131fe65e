"""The model picker and its card: what the model is, what works on it, what the job will need."""
from __future__ import annotations

import html

from edgetailor.engine import preflight, resolve
from edgetailor.engine.recipe import Recipe
from PySide6.QtCore import QSettings, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from .common import Background, fmt_bytes, problem_and_fix

RECENT_KEY = "recent_models"
MAX_RECENT = 8


class ModelPanel(QGroupBox):
    report_ready = Signal(object)     # PreflightReport of the current model and recipe

    def __init__(self, background: Background, settings: QSettings, parent=None):
        super().__init__("&Model", parent)
        self.background = background
        self.settings = settings
        self.source = None            # ResolvedSource of the current pick
        self.report = None
        self.recipe: dict | None = None
        self._generation = 0          # ignores answers to picks that were replaced meanwhile

        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setObjectName("modelCombo")
        self.combo.setToolTip("'demo' (the bundled SmolLM2-135M-Instruct), a Hugging Face folder, a .gguf file, "
                              "or a hub id such as HuggingFaceTB/SmolLM2-360M")
        self.combo.setAccessibleName("Model")
        self.folder_button = QPushButton("HF &folder…")
        self.gguf_button = QPushButton("&GGUF file…")
        self.allow_download = QCheckBox("Allow &download (hub ids)")
        self.trust_code = QCheckBox("Trust remote code")
        self.card = QLabel()
        self.card.setWordWrap(True)
        self.card.setTextFormat(self.card.textFormat().RichText)
        self.card.setObjectName("modelCard")

        row = QHBoxLayout()
        row.addWidget(self.combo, 1)
        row.addWidget(self.folder_button)
        row.addWidget(self.gguf_button)
        flags = QHBoxLayout()
        flags.addWidget(self.allow_download)
        flags.addWidget(self.trust_code)
        flags.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addLayout(flags)
        lay.addWidget(self.card)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(400)
        self._debounce.timeout.connect(self.inspect)
        self._fill_combo()
        self.combo.currentTextChanged.connect(lambda _: self._debounce.start())
        self.folder_button.clicked.connect(self.pick_folder)
        self.gguf_button.clicked.connect(self.pick_gguf)
        self.allow_download.toggled.connect(lambda _: self._debounce.start())
        self.trust_code.toggled.connect(lambda _: self._debounce.start())

    # --- picking -------------------------------------------------------------------------------
    def spec(self) -> str:
        return self.combo.currentText().strip() or "demo"

    def recent(self) -> list[str]:
        value = self.settings.value(RECENT_KEY, [])
        return [value] if isinstance(value, str) else list(value or [])

    def _fill_combo(self) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem("demo")
        for r in self.recent():
            if r != "demo":
                self.combo.addItem(r)
        self.combo.setCurrentIndex(0)
        self.combo.blockSignals(False)

    def remember(self, spec: str) -> None:
        items = [spec] + [r for r in self.recent() if r != spec]
        self.settings.setValue(RECENT_KEY, items[:MAX_RECENT])

    def set_spec(self, spec: str) -> None:
        self.combo.setCurrentText(spec)
        self.inspect()

    def pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Hugging Face model folder (with config.json)")
        if folder:
            self.set_spec(folder)

    def pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "GGUF model file", "", "GGUF files (*.gguf)")
        if path:
            self.set_spec(path)

    def set_recipe(self, recipe: dict | None) -> None:
        """Re-estimate what the job needs when the recipe changes (the source stays resolved)."""
        self.recipe = recipe
        if self.source is not None:
            self._run_preflight(self.source)

    # --- inspecting (off the GUI thread: resolving a GGUF converts it) ------------------------------
    def inspect(self) -> None:
        self._debounce.stop()
        spec = self.spec()
        self._generation += 1
        gen = self._generation
        self.source = self.report = None
        self.card.setText(f"<i>Reading {html.escape(spec)}… (a GGUF file or the demo is converted once, "
                          "about a minute)</i>")
        allow, trust = self.allow_download.isChecked(), self.trust_code.isChecked()
        recipe = self.recipe

        def work():
            src = resolve(spec, allow_network=allow, trust_remote_code=trust)
            return src, preflight(src, _recipe_or_none(recipe))

        self.background.run(work, lambda r: self._done(gen, spec, *r), lambda e: self._failed(gen, e))

    def _run_preflight(self, src) -> None:
        self._generation += 1
        gen = self._generation
        recipe = self.recipe
        self.background.run(lambda: (src, preflight(src, _recipe_or_none(recipe))),
                            lambda r: self._done(gen, src.spec, *r), lambda e: self._failed(gen, e))

    def _done(self, gen: int, spec: str, src, report) -> None:
        if gen != self._generation:
            return
        self.source, self.report = src, report
        self.remember(spec)
        self.card.setText(card_html(src, report))
        self.report_ready.emit(report)

    def _failed(self, gen: int, exc) -> None:
        if gen != self._generation:
            return
        problem, fix = problem_and_fix(exc)
        self.card.setText(f"<b>⚠ {html.escape(problem)}</b><br>{html.escape(fix)}")


def _recipe_or_none(recipe: dict | None):
    if not recipe:
        return None
    try:
        r = Recipe.from_dict(recipe)
        r.validate()
        return r
    except Exception:   # the recipe panel shows what is wrong with it; the card shows the model alone
        return None


def card_html(src, report) -> str:
    p = report.parameters
    rows = [
        ("Architecture", f"{html.escape(report.model_type)}"
                         + ("" if report.supported else f" — ⚠ {html.escape(report.architecture_note)}")),
        ("Parameters", f"{p.get('total', 0) / 1e6:.2f} M"
                       + (f" ({p['embedding'] / 1e6:.2f} M embedding)" if p.get("embedding") else "")),
        ("Size", f"{fmt_bytes(report.weights_bytes)} ({html.escape(report.dtype)})"),
        ("Context", f"{report.context_length:,} tokens" if report.context_length else "—"),
        ("Pre-flight RAM", f"{fmt_bytes(report.ram_needed_bytes)} needed, {fmt_bytes(report.ram_available_bytes)} available"),
        ("Pre-flight disk", f"{fmt_bytes(report.disk_needed_bytes)} needed, {fmt_bytes(report.disk_available_bytes)} free"),
        ("Exporters", ", ".join(f"{html.escape(k)}: {'✓' if v == 'yes' else '✗'}" for k, v in report.exporters.items())),
        ("Techniques", ", ".join(f"{html.escape(k)} {'✓' if v == 'yes' else '✗'}" for k, v in report.techniques.items())),
    ]
    if getattr(report, "features", None):
        rows.insert(1, ("Family", html.escape(", ".join(report.features))))
    steps = getattr(report, "steps", None) or []
    if steps:
        per_step = "<br>".join(f"{i}. {html.escape(n['step'])}: {fmt_bytes(n['ram_bytes'])}"
                               + (f" + {fmt_bytes(n['mapped_bytes'])} mapped" if n.get("mapped_bytes") else "")
                               + f" — {html.escape(n['how'])}" for i, n in enumerate(steps, 1))
        if any(n.get("mapped_bytes") for n in steps):
            per_step += ("<br><small>mapped: the file llama.cpp runs to check, evaluate or benchmark (resident while "
                         "it runs; read from disk again when RAM is short: slower, same result)</small>")
        rows.insert(rows.index(next(r for r in rows if r[0] == "Pre-flight RAM")) + 1, ("RAM per step", per_step))
    body = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in rows)
    title = f"<b>{html.escape(src.display_name)}</b> <small>({html.escape(src.kind)}: {html.escape(str(src.path))})</small>"
    problems = "".join(f"<br><b>⚠ {html.escape(x)}</b>"
                       for x in [*getattr(report, "refusals", []), *report.problems])
    problems += "".join(f"<br>ⓘ {html.escape(x)}" for x in getattr(report, "warnings", []))
    fits = "<br>✓ The job fits this machine." if report.fits else ""
    return f"{title}<table>{body}</table>{problems}{fits}"

"""EdgeTailor's main window: pick a model and a device budget, run a recipe in a worker process, watch each
variant's measurements arrive, compare, try and export them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from edgetailor.engine import EdgeTailorError, RunRecord, list_runs, paths
from edgetailor.engine.bundle import plan_bundle
from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QIcon, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .budget_panel import BudgetPanel
from .common import Background, WheelGuard, show_error
from .export_dialog import ExportDialog
from .job_controller import JobController
from .model_panel import ModelPanel
from .plots import LivePlots
from .recipe_panel import RecipePanel
from .results import ResultsPanel
from .run_queue import RunQueue
from .run_state import RunState
from .try_panel import TryPanel

TABS = ("Runs", "Live", "Results", "Try it")
MAX_PREVIOUS_RUNS = 50
#: narrowest the two columns get: together with the frame they fit a 1024-pixel-wide screen
LEFT_MIN_WIDTH = 400
TABS_MIN_WIDTH = 520


class MainWindow(QMainWindow):
    def __init__(self, runs_root: str | Path | None = None, job_options: dict | None = None, model: str = "demo"):
        super().__init__()
        # long: the widget tree, its layout and its signals top to bottom; its parts are their own widget classes
        self.setWindowTitle("EdgeTailor")
        self.runs_root = Path(runs_root) if runs_root else paths.runs_dir()
        self.job_options = job_options or {}
        self.settings = QSettings(str(paths.data_dir() / "app.ini"), QSettings.Format.IniFormat)
        self.background = Background()
        self.controller = JobController(self.runs_root, parent=self)
        self.states: dict[str, RunState] = {}
        self.current_run: str | None = None
        self.last_error = None
        self._prewarmed = False
        self._quitting = False

        self.model_panel = ModelPanel(self.background, self.settings)
        self.budget_panel = BudgetPanel(self.background)
        self.recipe_panel = RecipePanel()
        self.run_button = QPushButton("&Run recipe (Ctrl+R)")
        self.run_button.setObjectName("runButton")
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.addWidget(self.model_panel)
        ll.addWidget(self.budget_panel)
        ll.addWidget(self.recipe_panel)
        ll.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.wheel_guard = WheelGuard(scroll.verticalScrollBar(), self)   # scrolling never edits a field
        self.wheel_guard.guard(left)
        column = QWidget()          # the Run button under the scrolling panels: always in view
        cl = QVBoxLayout(column)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(scroll, 1)
        cl.addWidget(self.run_button)
        column.setMinimumWidth(LEFT_MIN_WIDTH)

        self.queue = RunQueue()
        self.plots = LivePlots()
        self.results = ResultsPanel()
        self.try_panel = TryPanel()
        self.tabs = QTabWidget()
        self.tabs.setObjectName("mainTabs")
        for w, name in zip((self.queue, self.plots, self.results, self.try_panel), TABS):
            self.tabs.addTab(w, name)
        self.tabs.setMinimumWidth(TABS_MIN_WIDTH)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(column)
        split.addWidget(self.tabs)
        split.setChildrenCollapsible(False)
        split.setStretchFactor(1, 1)
        split.setSizes([LEFT_MIN_WIDTH + 60, 1000])      # the results need the room; the left panel scrolls
        self.setCentralWidget(split)
        self.status_label = QLabel()
        self.settings_warning: QLabel | None = None     # shown once the settings could not be saved
        self.statusBar().addWidget(self.status_label, 1)

        self._results_timer = QTimer(self)       # results redraw at most every 300 ms, however many metrics arrive
        self._results_timer.setSingleShot(True)
        self._results_timer.setInterval(300)
        self._results_timer.timeout.connect(self._show_results)
        self._actions()
        self._connect()
        self.setTabOrder(self.model_panel.combo, self.model_panel.folder_button)
        self.load_previous_runs()
        self.recipe_panel.set_budget(self.budget_panel.budget())
        self.model_panel.set_recipe(self.recipe_panel.current_recipe())
        self.model_panel.set_spec(model)
        self.restore_settings()
        screen = QApplication.primaryScreen()
        room = screen.availableGeometry() if screen else None
        self.resize(min(1360, room.width()) if room else 1360, min(860, room.height()) if room else 860)

    # --- wiring --------------------------------------------------------------------------------------
    def _actions(self) -> None:
        def action(text, shortcut, slot, name):
            a = QAction(text, self)
            a.setShortcut(QKeySequence(shortcut))
            a.setObjectName(name)
            a.triggered.connect(slot)
            self.addAction(a)
            return a

        menu = self.menuBar().addMenu("&File")
        menu.addAction(action("Open Hugging Face &folder…", "Ctrl+O", self.model_panel.pick_folder, "openFolder"))
        menu.addAction(action("Open &GGUF file…", "Ctrl+G", self.model_panel.pick_gguf, "openGguf"))
        menu.addAction(action("&Export selected variant…", "Ctrl+E", self.export_selected, "export"))
        menu.addSeparator()
        menu.addAction(action("&Quit", QKeySequence.StandardKey.Quit, self.close, "quit"))
        run_menu = self.menuBar().addMenu("&Run")
        self.run_action = action("&Run recipe", "Ctrl+R", self.run_recipe, "run")
        run_menu.addAction(self.run_action)
        run_menu.addAction(action("&Cancel selected run", "Ctrl+.", self.cancel_selected, "cancel"))
        view = self.menuBar().addMenu("&View")
        for i, name in enumerate(TABS):
            view.addAction(action(name, f"Ctrl+{i + 1}", lambda _=False, i=i: self.tabs.setCurrentIndex(i), f"tab{i}"))
        view.addAction(action("Focus &model", "Ctrl+L", lambda: self.model_panel.combo.setFocus(), "focusModel"))

    def _connect(self) -> None:
        self.run_button.clicked.connect(self.run_recipe)
        self.controller.run_added.connect(self._run_added)
        self.controller.run_event.connect(self._run_event)
        self.controller.run_finished.connect(self._run_finished)
        self.controller.memory_sampled.connect(self._memory_sampled)
        self.queue.selected.connect(self.show_run)
        self.queue.cancel_requested.connect(self.controller.cancel)
        self.budget_panel.changed.connect(self._budget_changed)
        self.recipe_panel.changed.connect(lambda: self.model_panel.set_recipe(self.recipe_panel.current_recipe()))
        self.model_panel.report_ready.connect(lambda r: self.recipe_panel.set_params_total(r.parameters.get("total", 0)))
        self.results.variant_selected.connect(self.try_panel.choose)
        self.results.export_requested.connect(self.export_variant)
        self.results.try_requested.connect(self._try_variant)

    def _say_skipped(self) -> None:
        """Run records and device profiles that could not be read: said in words, never fatal (the others still
        show); which ones and what to do in the tooltip."""
        skipped = self.budget_panel.skipped_profiles
        said = ([f"{len(self.skipped_runs)} run folder(s) with an unreadable record"] if self.skipped_runs else []) + \
            ([f"{len(skipped)} device profile(s) that could not be read"] if skipped else [])
        if said:
            self.status_label.setText(f"Skipped {' and '.join(said)} (hover for which and what to do)")
            self.status_label.setToolTip("\n".join(self.skipped_runs + skipped))

    # --- runs ----------------------------------------------------------------------------------------
    def load_previous_runs(self) -> None:
        unreadable: list = []
        runs = list_runs(self.runs_root, unreadable)
        self.skipped_runs = [f"{exc.problem} {exc.fix}" for exc in unreadable]
        self._say_skipped()
        for m in runs[:MAX_PREVIOUS_RUNS]:
            if m["id"] in self.states:
                continue
            try:
                st = RunState.from_folder(m["_folder"], m)
            except (OSError, KeyError, ValueError):
                continue
            self.states[st.run_id] = st
            self.queue.add(st, live=False, top=False)

    def run_recipe(self) -> None:
        problem = self.recipe_panel.validate()
        if problem:
            self.last_error = show_error(self, "The recipe needs a fix", {"problem": problem})
            return
        spec = self.model_panel.spec()
        try:
            self.controller.start(self.recipe_panel.current_recipe(), spec, self.job_options,
                                  allow_network=self.model_panel.allow_download.isChecked(),
                                  trust_remote_code=self.model_panel.trust_code.isChecked())
        except Exception as exc:
            self.last_error = show_error(self, "Could not start the run", exc)
            return
        self.model_panel.remember(spec)
        self.save_settings()                 # the choices a run was started with, kept now

    def cancel_selected(self) -> None:
        rid = self.queue.current()
        if rid:
            self.controller.cancel(rid)

    def _run_added(self, run_id: str) -> None:
        st = self.controller.states[run_id]
        self.states[run_id] = st
        self.queue.add(st, live=True, top=True)
        self.queue.select(run_id)
        self.tabs.setCurrentIndex(TABS.index("Live"))
        self.status_label.setText(f"Running {st.recipe_name} on {st.source}")

    def _run_event(self, run_id: str, ev: dict) -> None:
        self.queue.update_run(run_id)
        if ev["type"] == "log":
            self.queue.append_log(run_id, ev["data"].get("message", ""))
        if run_id == self.current_run:
            if ev["type"] in ("sample", "metric", "variant"):
                self.plots.schedule()
            if ev["type"] in ("metric", "variant"):
                self._results_timer.start()

    def _memory_sampled(self, run_id: str) -> None:
        if run_id == self.current_run:
            self.plots.schedule()

    def _run_finished(self, run_id: str, status: str, error) -> None:
        st = self.states[run_id]
        if st.folder and (st.folder / "manifest.json").exists():    # the manifest has every variant's final record
            try:
                manifest = RunRecord.open(st.folder).manifest
                st.variants = {v["name"]: v for v in manifest["variants"]}
                st.recommendation = manifest.get("recommendation")
            except EdgeTailorError:
                pass
        self.queue.update_run(run_id)
        self.status_label.setText(f"Run {run_id}: {status}")
        if run_id == self.current_run:
            self.plots.schedule()
            self._results_timer.start()
        if status == "failed":
            self.last_error = show_error(self, "The run failed", error or {})
        elif status == "succeeded" and run_id == self.current_run:
            self.tabs.setCurrentIndex(TABS.index("Results"))

    def show_run(self, run_id: str) -> None:
        self.current_run = run_id
        st = self.states[run_id]
        self.plots.show_state(st)
        self._show_results()

    def _show_results(self) -> None:
        st = self.states.get(self.current_run)
        if st is None:
            return
        self.results.set_variants(st.variant_rows(), self.budget_panel.engine_budget())
        self.results.set_recommendation(st.recommendation)
        self.try_panel.set_run(st.folder, st.source, st.variant_rows())

    def _budget_changed(self, budget: dict) -> None:
        self.recipe_panel.set_budget(budget)
        self.plots.set_memory_limit(budget.get("memory_bytes"))
        self._show_results()

    # --- export / try --------------------------------------------------------------------------------
    def export_selected(self) -> None:
        name = self.results.current()
        if not name:
            self.last_error = show_error(self, "Nothing to export",
                                         {"problem": "No variant is selected.",
                                          "fix": "Pick a variant in the Results tab (or click its point)."})
            return
        self.export_variant(name)

    def export_dialog(self, name: str) -> ExportDialog | None:
        st = self.states.get(self.current_run)
        try:
            plan = plan_bundle(st.folder, name)
        except Exception as exc:
            self.last_error = show_error(self, "Cannot export this variant", exc)
            return None
        start = self.settings.value("export_folder", str(Path.home()))
        return ExportDialog(plan, start, self)

    def export_variant(self, name: str) -> None:
        dialog = self.export_dialog(name)
        if dialog is None:
            return
        dialog.accepted.connect(lambda: self._exported(dialog))
        dialog.open()

    def _exported(self, dialog: ExportDialog) -> None:
        self.settings.setValue("export_folder", str(dialog.written.parent))
        self.status_label.setText(f"Exported to {dialog.written}")
        self.sync_settings()

    def _try_variant(self, name: str) -> None:
        self.try_panel.choose(name)
        self.tabs.setCurrentIndex(TABS.index("Try it"))

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._prewarmed:
            self._prewarmed = True
            QTimer.singleShot(0, self._prewarm)

    def _prewarm(self) -> None:
        """Render every tab once, hidden: the first paint of the plots is slow, better now than mid-run."""
        current = self.tabs.currentIndex()
        for i in range(self.tabs.count()):
            self.tabs.setCurrentIndex(i)
            self.tabs.currentWidget().repaint()
        self.tabs.setCurrentIndex(current)

    # --- settings ---------------------------------------------------------------------------------------
    def save_settings(self) -> None:
        """The device, the budget and the recipe preset, for the next start (the model is kept by its panel)."""
        b = self.budget_panel.budget()
        self.settings.setValue("budget/device", b["device"])
        for key in ("memory_bytes", "min_decode_tps", "max_j_per_token", "max_ppl_increase_pct", "max_kl"):
            self.settings.setValue(f"budget/{key}", b[key] or 0)
        self.settings.setValue("recipe/preset", self.recipe_panel.preset_name)
        self.sync_settings()

    def sync_settings(self) -> bool:
        """Write the settings now; when the data folder cannot take them (read-only, full), say so in the status
        bar rather than lose them silently."""
        self.settings.sync()
        if self.settings.status() == QSettings.Status.NoError:
            return True
        if self.settings_warning is None:
            self.settings_warning = QLabel()
            self.settings_warning.setObjectName("settingsWarning")
            self.statusBar().addPermanentWidget(self.settings_warning)
        self.settings_warning.setText("⚠ Settings not saved")
        self.settings_warning.setToolTip(
            f"Settings could not be saved to {self.settings.fileName()}: its disk is read-only or full.\n"
            "Fix: free space on that disk or make it writable, or start EdgeTailor with --home on a writable "
            "folder. Until then your choices last until you quit.")
        return False

    def restore_settings(self) -> None:
        """What ``save_settings`` kept; a value that no longer makes sense (a removed profile, garbage) is skipped."""
        def number(key):
            try:
                return float(self.settings.value(f"budget/{key}", 0) or 0)
            except (TypeError, ValueError):
                return 0.0

        device = self.settings.value("budget/device")
        if isinstance(device, str) and device in self.budget_panel.devices:
            self.budget_panel.set_profile(device)
        if number("memory_bytes"):
            self.budget_panel.memory.setValue(int(number("memory_bytes") / 1e6))
        for key, box in (("min_decode_tps", self.budget_panel.min_tps), ("max_j_per_token", self.budget_panel.max_j),
                         ("max_ppl_increase_pct", self.budget_panel.max_ppl), ("max_kl", self.budget_panel.max_kl)):
            box.setValue(number(key))
        preset = self.settings.value("recipe/preset")
        if isinstance(preset, str) and preset in self.recipe_panel.presets:
            self.recipe_panel.load_preset(preset)
            self.model_panel.set_recipe(self.recipe_panel.current_recipe())

    def running_runs(self) -> list[str]:
        return list(self.controller.handles)

    def closeEvent(self, event) -> None:
        """Quitting during a run asks first (without blocking: the runs go on while the question is open); the
        runs are then cancelled and recorded as cancelled before the window goes."""
        running = self.running_runs()
        if running and not self._quitting:
            event.ignore()
            self.ask_quit(len(running))
            return
        self.save_settings()
        self.controller.shutdown()
        self.controller.wait_finished(CANCEL_WAIT_S)
        self.try_panel.close_models()
        self.background.wait(5_000)
        super().closeEvent(event)

    def ask_quit(self, n: int) -> None:
        box = QMessageBox(QMessageBox.Icon.Question, "Quit EdgeTailor?",
                          f"{n} run{'s are' if n > 1 else ' is'} still going. Quitting cancels "
                          f"{'them' if n > 1 else 'it'}: finished variants stay, the run is recorded as cancelled.",
                          QMessageBox.StandardButton.Cancel, self)
        quit_button = box.addButton("Cancel the run and quit", QMessageBox.ButtonRole.AcceptRole)
        quit_button.setObjectName("quitAnyway")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setObjectName("confirmQuit")
        box.buttonClicked.connect(lambda b: b is quit_button and self._quit_now())
        self.last_dialog = box
        box.open()

    def _quit_now(self) -> None:
        self._quitting = True
        self.close()


#: how long quitting waits for cancelled workers to record their runs
CANCEL_WAIT_S = 30


def configure_plots(app: QApplication) -> None:
    """Plots follow the system palette (light or dark); no antialiasing, which keeps live redraws cheap."""
    import pyqtgraph as pg

    pal = app.palette()
    pg.setConfigOptions(antialias=False, background=pal.base().color(), foreground=pal.text().color())


def run_app(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = QApplication.instance() or QApplication(argv)
    app.setApplicationName("EdgeTailor")
    app.setDesktopFileName("edgetailor")          # the app menu's entry (edgetailor.desktop), for the taskbar icon
    app.setWindowIcon(QIcon(str(paths.asset_path("icons", "edgetailor.svg"))))
    configure_plots(app)
    from edgetailor.engine.atomic import sweep_stale_temp

    sweep_stale_temp()          # temporary folders of EdgeTailor processes that were killed
    try:
        window = MainWindow()
    except EdgeTailorError as exc:        # e.g. the data folder is a file or read-only: said in words, exit 2
        box = QMessageBox(QMessageBox.Icon.Critical, "EdgeTailor cannot start", exc.problem)
        box.setInformativeText(f"Fix: {exc.fix}")
        box.setObjectName("startupErrorBox")
        if os.environ.get("QT_QPA_PLATFORM") != "offscreen":
            box.exec()
        print(f"error: {exc.problem}\nfix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    window.show()
    return app.exec()

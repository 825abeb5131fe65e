"""The desktop app, driven offscreen with pytest-qt on a real model (stories260K) and real worker processes:
pick the model, choose a budget, run a recipe, watch the plots, sort the results, click the Pareto plot,
export a bundle llama.cpp loads, try it side by side, survive a worker crash, find runs after a restart."""
from __future__ import annotations

import os
import signal
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import QPointF, Qt, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

RUN_TIMEOUT_MS = 420_000       # a generous bound: CI machines are small and may be busy


class StallMeter:
    """The longest gap between ticks of a 10 ms timer: how long the event loop was ever blocked."""

    def __init__(self):
        self.last = None
        self.longest = 0.0
        self.ticks = 0
        self.gaps = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        if self.last is not None:
            self.longest = max(self.longest, now - self.last)
            self.gaps.append(now - self.last)
        self.last = now
        self.ticks += 1

    def start(self):
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self):
        self.timer.stop()


def make_window(qtbot, runs_root, model):
    from edgetailor.ui.main_window import MainWindow, configure_plots

    configure_plots(QApplication.instance())
    w = MainWindow(runs_root=runs_root, job_options={"threads": 1}, model=str(model))
    qtbot.addWidget(w)
    w.show()
    return w


def small_recipe(w, benchmark=False):
    """Balanced preset, cut down to F16 + Q8_0 and two short evaluation windows (and a short benchmark),
    through the editor."""
    rp = w.recipe_panel
    rp.load_preset("balanced")
    rp.set_param(0, "types", ["F16", "Q8_0"])
    rp.set_param(1, "windows", 2)
    rp.set_param(1, "ctx", 64)
    if benchmark:
        rp.steps.setCurrentRow(1)
        rp.add_combo.setCurrentText("benchmark")
        rp.add_button.click()
        assert rp.recipe["steps"][2]["step"] == "benchmark"
        for name, value in (("prompt_tokens", 16), ("gen_tokens", 8), ("repeats", 1), ("n_ctx", 64),
                            ("decode_model", False)):
            rp.set_param(2, name, value)
    assert rp.validate() is None
    return rp.current_recipe()


def test_whole_flow_offscreen(qtbot, tmp_path, stories_dir):
    import numpy as np
    from llama_cpp import Llama

    runs = tmp_path / "runs"
    w = make_window(qtbot, runs, stories_dir)
    # the model card comes from a background pre-flight check
    qtbot.waitUntil(lambda: w.model_panel.report is not None, timeout=60_000)
    card = w.model_panel.card.text()
    assert "llama" in card and "Parameters" in card and "Pre-flight RAM" in card and "gguf" in card
    assert "RAM per step" in card and "1. export" in card      # what each step of the recipe needs

    # a budget, then the recipe
    w.budget_panel.set_profile("raspberry-pi-5-8gb")
    w.budget_panel.max_ppl.setValue(50)
    assert w.budget_panel.budget()["memory_bytes"] == round(w.budget_panel.device().memory_available_bytes / 1e6) * 1e6
    recipe = small_recipe(w, benchmark=True)
    assert recipe["steps"][0]["params"]["types"] == ["F16", "Q8_0"]
    assert recipe["steps"][2]["params"]["device"] == "raspberry-pi-5-8gb"       # the budget reaches the benchmark
    assert recipe["steps"][2]["params"]["max_ppl_increase_pct"] == 50

    meter = StallMeter()
    meter.start()
    with qtbot.waitSignal(w.controller.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        qtbot.keyClick(w, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)    # Ctrl+R runs the recipe
        assert w.tabs.tabText(w.tabs.currentIndex()) == "Live"
    meter.stop()
    run_id, status, error = finished.args
    assert status == "succeeded", error

    # the live plots received data while it ran
    counts = w.plots.series_counts()
    assert counts["memory"] >= 3 and counts["perplexity"] >= 6      # 3 models x 2 windows
    assert counts["decode_tps"] == 3 and counts["energy"] == 3
    assert w.plots.redraws >= 2
    assert len(w.plots.memory.getPlotItem().listDataItems()) >= 1

    # the results table fills and sorts
    model = w.results.model
    names = {r["name"] for r in model.rows}
    assert {"baseline", "base-F16", "base-Q8_0"} <= names
    assert all(r["metrics"].get("perplexity") for r in model.rows)
    fits_col = [c[0] for c in __import__("edgetailor.ui.results", fromlist=["COLUMNS"]).COLUMNS].index("Fits")
    badges = {model.rows[r]["name"]: model.index(r, fits_col).data() for r in range(model.rowCount())}
    assert badges["base-Q8_0"] in ("✓ fits",) or badges["base-Q8_0"].startswith("✗"), badges
    size_col = [c[0] for c in __import__("edgetailor.ui.results", fromlist=["COLUMNS"]).COLUMNS].index("Size")
    w.results.table.sortByColumn(size_col, Qt.SortOrder.AscendingOrder)
    proxy = w.results.proxy
    sizes = [proxy.index(r, size_col).data(Qt.ItemDataRole.UserRole) for r in range(proxy.rowCount())]
    assert sizes == sorted(sizes)
    w.results.table.sortByColumn(size_col, Qt.SortOrder.DescendingOrder)
    sizes = [proxy.index(r, size_col).data(Qt.ItemDataRole.UserRole) for r in range(proxy.rowCount())]
    assert sizes == sorted(sizes, reverse=True)

    # clicking a point of the Pareto scatter selects its variant
    w.tabs.setCurrentIndex(2)
    qtbot.wait(100)
    plot = w.results.scatter_plot
    target = next(p for p in w.results.scatter.points() if p.data() == "base-Q8_0")
    scene = plot.getViewBox().mapViewToScene(QPointF(target.pos().x(), target.pos().y()))
    pos = plot.mapFromScene(scene)
    with qtbot.waitSignal(w.results.variant_selected, timeout=5_000) as picked:
        qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert picked.args == ["base-Q8_0"]
    assert w.results.current() == "base-Q8_0"

    # export: the dialog lists the bundle, then writes it; llama.cpp loads the bundled model
    dialog = w.export_dialog("base-Q8_0")
    listed = [dialog.contents.item(r, 0).text() for r in range(dialog.contents.rowCount())]
    assert listed[0].endswith(".gguf") and {"README.md", "metrics.json", "Modelfile"} <= set(listed)
    out = tmp_path / "exported"
    out.mkdir()
    dialog.folder.setText(str(out))
    dialog.save()
    assert dialog.written is not None and sorted(p.name for p in dialog.written.iterdir()) == sorted(listed)
    readme = (dialog.written / "README.md").read_text()
    assert "Perplexity" in readme and "KL" in readme
    # logits_all: without it llama-cpp-python fills only the last row of ``scores`` (the rest is uninitialised)
    llm = Llama(model_path=str(dialog.written / listed[0]), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    toks = llm.tokenize(b"Once upon a time")
    llm.eval(toks)
    assert np.isfinite(np.array(llm.scores[: len(toks)])).all()
    llm.close()

    # try it: baseline and the selected variant, side by side
    w.try_panel.max_tokens.setValue(12)
    assert w.try_panel.variant.currentText() == "base-Q8_0"
    done = []
    w.try_panel.generated.connect(lambda side, g: done.append((side, g)))
    streamed = []
    w.try_panel.streamed.connect(lambda side, piece: streamed.append(side))
    qtbot.mouseClick(w.try_panel.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(done) == 2, timeout=60_000)
    by_side = dict(done)
    assert streamed.count("baseline") >= 2 and streamed.count("variant") >= 2     # shown as it is generated
    assert by_side["baseline"].runtime == "torch" and by_side["variant"].runtime == "llama.cpp"
    assert by_side["baseline"].tokens > 0 and by_side["variant"].tokens > 0
    assert w.try_panel.outputs["variant"].toPlainText() == by_side["variant"].text
    w.close()

    # after a restart the run is listed again, with its results and replayed plots
    w2 = make_window(qtbot, runs, stories_dir)
    assert run_id in w2.queue.rows
    w2.queue.select(run_id)
    assert {"baseline", "base-F16", "base-Q8_0"} <= {r["name"] for r in w2.results.model.rows}
    assert w2.plots.series_counts()["perplexity"] >= 6
    assert w2.states[run_id].status == "succeeded"
    w2.close()

    # the window never froze while the worker compressed (checked last, so the rest reports first)
    assert meter.ticks > 50
    worst = sorted(meter.gaps)[-5:]
    print(f"event loop: {meter.ticks} ticks in {sum(meter.gaps):.1f} s, longest gaps {[round(g * 1000) for g in worst]} ms")
    # The target is 100 ms with cores to spare; with two cores the GUI thread waits for one behind the worker
    # and whatever else runs (measured: 154 ms at load 1.6, and 100+ ms while the 1-minute load average still
    # read under 1), so there the bound is a generous 400 ms.
    import os as _os

    # More runnable threads than cores again (another job beside the suite: 418 ms seen with a 2-thread job
    # running) doubles it.
    load, cores = _os.getloadavg()[0], _os.cpu_count() or 1
    bound = 0.100 if cores >= 4 and load < 1.0 else 0.800 if load > 1.5 * cores else 0.400
    assert meter.longest < bound, f"the event loop stalled for {meter.longest * 1000:.0f} ms (bound {bound * 1000:.0f} ms)"


def test_worker_crash_message_and_app_goes_on(qtbot, tmp_path, stories_dir):
    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    small_recipe(w)
    with qtbot.waitSignal(w.controller.run_event, timeout=RUN_TIMEOUT_MS):   # run_started: the worker lives
        w.run_button.click()
    run_id = w.queue.current()
    pid = w.controller.worker_pid(run_id)
    os.kill(pid, signal.SIGKILL)
    with qtbot.waitSignal(w.controller.run_finished, timeout=30_000) as finished:
        pass
    assert finished.args[1] == "failed"
    box = w.last_error
    assert isinstance(box, QMessageBox) and box.isVisible()
    assert "ended unexpectedly" in box.text() and "Traceback" not in box.text() + box.informativeText()
    assert "ended unexpectedly" in w.queue.detail.text()
    box.close()
    # the app goes on: it answers the keyboard and runs the next job (cancelled at once here). Shortcuts
    # reach the active window only, so the main window takes the focus back from the closed box first.
    qtbot.waitUntil(lambda: not box.isVisible())
    w.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is w, timeout=5_000)
    qtbot.keyClick(w, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert w.tabs.currentIndex() == 0
    with qtbot.waitSignal(w.controller.run_finished, timeout=RUN_TIMEOUT_MS) as second:
        qtbot.keyClick(w, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)
        w.controller.cancel(w.queue.current())
    assert second.args[1] == "cancelled"
    assert w.states[finished.args[0]].status == "failed"
    w.close()


def test_keyboard_reaches_main_controls(qtbot, tmp_path, stories_dir):
    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    chain, widget = [], w.model_panel.combo
    for _ in range(400):
        chain.append(widget)
        widget = widget.nextInFocusChain()
        if widget is w.model_panel.combo:
            break
    tabbable = [x for x in chain if isinstance(x, QWidget) and x.focusPolicy() & Qt.FocusPolicy.TabFocus]
    for control in (w.model_panel.combo, w.model_panel.folder_button, w.budget_panel.profile,
                    w.budget_panel.memory, w.recipe_panel.preset, w.recipe_panel.steps, w.run_button, w.tabs):
        assert control in tabbable, control.objectName() or type(control).__name__
    # real Tab presses move focus from the model picker onwards
    w.activateWindow()
    w.model_panel.combo.setFocus()
    qtbot.waitUntil(lambda: w.model_panel.combo.hasFocus() or w.model_panel.combo.lineEdit().hasFocus())
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
    assert QApplication.focusWidget() is w.model_panel.folder_button
    # shortcuts switch tabs and focus the model picker
    for i in range(4):
        qtbot.keyClick(w, getattr(Qt.Key, f"Key_{i + 1}"), Qt.KeyboardModifier.ControlModifier)
        assert w.tabs.currentIndex() == i
    qtbot.keyClick(w, Qt.Key.Key_L, Qt.KeyboardModifier.ControlModifier)
    assert w.model_panel.combo.hasFocus() or w.model_panel.combo.lineEdit().hasFocus()
    # every step the registry knows can be added from the editor, with a field per parameter
    from edgetailor.engine import all_steps

    rp = w.recipe_panel
    assert [rp.add_combo.itemText(i) for i in range(rp.add_combo.count())] == sorted(all_steps())
    rp.steps.setCurrentRow(0)
    params = [p["name"] for p in all_steps()[rp.recipe["steps"][0]["step"]].describe()["params"]]
    assert all(rp.params_box.findChild(QWidget, f"param_{p}") is not None for p in params)
    w.close()


def test_a_variant_has_one_colour_in_every_plot(qtbot):
    # variants appear in a different order in each plot (memory samples, perplexity, bars); the colour follows
    # the variant, not its place in one plot
    import pyqtgraph as pg
    from edgetailor.ui.plots import LivePlots
    from edgetailor.ui.run_state import RunState

    st = RunState("r1")
    st.worker_memory = [(0.0, 1e8), (1.0, 2e8)]
    st.samples["rss_bytes"]["b-Q8_0"] = [(0.0, 5e7), (1.0, 6e7)]
    st.samples["rss_bytes"]["a-Q2_K"] = [(2.0, 4e7), (3.0, 4e7)]
    st.samples["perplexity"]["a-Q2_K"] = [(0.0, 30.0)]
    st.samples["perplexity"]["b-Q8_0"] = [(0.0, 20.0)]
    st.variants = {"b-Q8_0": {"metrics": {"decode_tps": 60.0}}, "a-Q2_K": {"metrics": {"decode_tps": 80.0}}}
    plots = LivePlots()
    qtbot.addWidget(plots)
    plots.show_state(st)

    def curve_colour(plot, name):
        item = next(c for c in plot.getPlotItem().listDataItems() if c.name() == name)
        return item.opts["pen"].color().name()

    bars = next(i for i in plots.speed.getPlotItem().items if isinstance(i, pg.BarGraphItem))
    bar_colours = [pg.mkBrush(b).color().name() for b in bars.opts["brushes"]]      # in st.variants order
    for k, name in enumerate(st.variants):
        assert curve_colour(plots.memory, name) == curve_colour(plots.quality, name) == bar_colours[k]
    assert curve_colour(plots.memory, "b-Q8_0") != curve_colour(plots.memory, "a-Q2_K")


def test_the_variant_name_stays_in_view_when_the_table_scrolls_sideways(qtbot):
    from edgetailor.ui.results import ResultsPanel

    panel = ResultsPanel()
    qtbot.addWidget(panel)
    panel.resize(420, 500)
    panel.show()
    variants = [{"name": f"base-Q{k}_K_M-with-a-long-name", "format": "gguf",
                 "metrics": {"size_bytes": 1e8 * k, "perplexity": 20.0 + k, "kl": 0.01 * k}} for k in range(2, 7)]
    panel.set_variants(variants, None)
    table, frozen = panel.table, panel.table.frozen
    qtbot.waitUntil(lambda: table.horizontalScrollBar().maximum() > 0)
    table.horizontalScrollBar().setValue(table.horizontalScrollBar().maximum())
    QApplication.processEvents()
    assert table.columnViewportPosition(0) < 0                      # the real first column scrolled away ...
    assert frozen.isVisible() and frozen.x() <= table.frameWidth() + table.verticalHeader().width()
    assert frozen.width() == table.columnWidth(0) > 0              # ... its copy stays, as wide
    assert [frozen.isColumnHidden(c) for c in range(3)] == [False, True, True]
    frozen.selectRow(3)                                            # one selection for both
    assert panel.current() == table.model().index(3, 0).data()
    table.sortByColumn(0, Qt.SortOrder.DescendingOrder)
    assert frozen.model().index(0, 0).data() == table.model().index(0, 0).data() == variants[-1]["name"]


def test_the_window_starts_beside_a_corrupt_run_record_and_says_so(qtbot, tmp_path, stories_dir):
    from edgetailor.engine import RunRecord

    runs = tmp_path / "runs"
    good = RunRecord.create(runs, {"name": "ok", "steps": []}, str(stories_dir), {})
    good.finish("succeeded")
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_bytes(b"\xff\xfe not a record")
    w = make_window(qtbot, runs, stories_dir)
    assert good.id in w.states                                  # the readable run is listed
    assert len(w.skipped_runs) == 1 and str(runs / "broken") in w.skipped_runs[0]
    assert "Skipped 1 run folder" in w.status_label.text() and "broken" in w.status_label.toolTip()


def test_the_window_starts_over_settings_that_are_garbage(qtbot, tmp_path, stories_dir, monkeypatch):
    """The settings the GUI keeps (<data>/app.ini): random bytes are ignored, not fatal."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "app.ini").write_bytes(os.urandom(2000) + b"\n[General]\nrecent=[[[\n")
    monkeypatch.setenv("EDGETAILOR_HOME", str(home))
    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    assert w.isVisible() and w.model_panel.combo.count() >= 1


def test_the_window_fits_a_laptop_screen_with_run_in_view(qtbot, tmp_path, stories_dir):
    """1024x700: the window's minimum fits, and the Run button is visible without scrolling."""
    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    hint = w.minimumSizeHint()
    assert hint.width() <= 1024 and hint.height() <= 700
    w.resize(1024, 700)
    qtbot.waitUntil(lambda: w.width() <= 1024)
    bottom = w.run_button.mapTo(w, w.run_button.rect().bottomLeft())
    assert w.run_button.isVisible() and 0 < bottom.y() <= w.height() and bottom.x() < w.width()


def test_the_wheel_scrolls_the_panel_and_edits_only_a_field_with_focus(qtbot, tmp_path, stories_dir):
    from PySide6.QtCore import QPoint, QPointF
    from PySide6.QtGui import QWheelEvent

    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    w.resize(1024, 700)
    box, profile = w.budget_panel.max_ppl, w.budget_panel.profile
    profile.setCurrentIndex(3)          # the wheel (up) could move it either way from here
    before = (box.value(), profile.currentIndex())

    def wheel(widget):
        pos = QPointF(widget.rect().center())
        ev = QWheelEvent(pos, QPointF(widget.mapToGlobal(pos.toPoint())), QPoint(0, 0), QPoint(0, 120),
                         Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
        QApplication.sendEvent(widget, ev)

    w.run_button.setFocus()
    wheel(box)
    wheel(profile)
    assert (box.value(), profile.currentIndex()) == before          # scrolling past them changed nothing
    box.setFocus()
    qtbot.waitUntil(box.hasFocus)
    wheel(box)
    assert box.value() != before[0]                                  # a field with focus takes the wheel


def test_the_budget_device_and_preset_are_remembered(qtbot, tmp_path, stories_dir, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("EDGETAILOR_HOME", str(home))
    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    w.budget_panel.set_profile("pixel-8")
    w.budget_panel.memory.setValue(1234)
    w.budget_panel.max_kl.setValue(0.05)
    w.recipe_panel.load_preset("fit-my-budget")
    w.close()
    again = make_window(qtbot, tmp_path / "runs", stories_dir)
    b = again.budget_panel.budget()
    assert b["device"] == "pixel-8" and b["memory_bytes"] == 1234e6 and b["max_kl"] == 0.05
    assert again.recipe_panel.preset_name == "fit-my-budget"


def test_quitting_during_a_run_asks_and_records_it_cancelled(qtbot, tmp_path, stories_dir):
    from edgetailor.engine import RunRecord

    w = make_window(qtbot, tmp_path / "runs", stories_dir)
    small_recipe(w)
    with qtbot.waitSignal(w.controller.run_event, timeout=RUN_TIMEOUT_MS):
        w.run_button.click()
    run_id = w.queue.current()
    w.close()
    box = w.last_dialog
    assert w.isVisible() and box.isVisible() and "still going" in box.text()    # asked; nothing stopped yet
    assert w.controller.is_live(run_id)
    box.findChild(QWidget, "quitAnyway").click()
    qtbot.waitUntil(lambda: not w.isVisible(), timeout=60_000)
    record = RunRecord.open(w.states[run_id].folder)
    assert record.manifest["status"] == "cancelled"


XCB_PROBE = """
import sys
from PySide6.QtWidgets import QApplication
app = QApplication(sys.argv[:1])
from edgetailor.ui.main_window import MainWindow, configure_plots
configure_plots(app)
w = MainWindow(runs_root=sys.argv[1], job_options={"threads": 1}, model=sys.argv[2])
w.show()
for _ in range(50):
    app.processEvents()
print(app.platformName(), w.isVisible(), w.width() <= 1024, w.run_button.isVisible())
"""


def test_the_window_opens_on_the_real_xcb_platform_under_xvfb(tmp_path, stories_dir):
    """What a user's desktop runs: Qt's xcb plugin with the system libraries the set-up installs."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("xvfb-run"):
        pytest.skip("xvfb-run is not installed (bash packaging/setup.sh --dev installs it as root)")
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    res = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1024x700x24", sys.executable, "-c", XCB_PROBE,
                          str(tmp_path / "runs"), str(stories_dir)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-4:] == ["xcb", "True", "True", "True"], res.stdout

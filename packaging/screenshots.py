"""Drive the app through its main screens and save screenshots (run it under Xvfb: packaging/screenshots.sh).

    xvfb-run -a -s "-screen 0 1700x1050x24" .venv/bin/python packaging/screenshots.py [--model demo] [--out docs/screenshots]

Runs a real recipe on the model (in the app's worker process), so it takes a few minutes on the demo model.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="model to run (default: the bundled demo model)")
    ap.add_argument("--out", default="docs/screenshots", help="folder for the PNG files")
    ap.add_argument("--runs-dir", help="where the run goes (default: a temporary folder)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K", help="GGUF types of the recipe")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 256 tokens")
    ap.add_argument("--dark", action="store_true", help="also save the results with a dark palette")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="device pixel ratio (QT_SCALE_FACTOR), e.g. 2 for a high-DPI check; files get a -2x suffix")
    args = ap.parse_args()
    suffix = ""
    if args.scale != 1.0:
        os.environ["QT_SCALE_FACTOR"] = f"{args.scale:g}"
        suffix = f"-{args.scale:g}x"

    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    from edgetailor.ui.main_window import MainWindow, configure_plots

    configure_plots(app)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="edgetailor-screens-"))

    def wait_until(cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.01)
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")

    def settle(seconds: float = 0.6) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.01)

    def shot(widget, name: str) -> None:
        settle()
        path = out / f"{name}{suffix}.png"
        widget.grab().save(str(path))
        print(f"saved {path}")

    w = MainWindow(runs_root=runs, job_options={"threads": 2}, model=args.model)
    w.resize(1600, 960)
    w.show()
    wait_until(lambda: w.model_panel.report is not None, 600, "the model card")
    profiles = [w.budget_panel.profile.itemText(i) for i in range(w.budget_panel.profile.count())]
    if "raspberry-pi-5-8gb" in [w.budget_panel.profile.itemData(i) for i in range(len(profiles))]:
        w.budget_panel.set_profile("raspberry-pi-5-8gb")
    rp = w.recipe_panel
    rp.load_preset("balanced")
    rp.set_param(0, "types", args.types.split(","))
    rp.set_param(1, "windows", args.windows)
    rp.set_param(1, "ctx", 256)
    bench = next(i for i, s in enumerate(rp.recipe["steps"]) if s["step"] == "benchmark")
    for name, value in (("prompt_tokens", 64), ("gen_tokens", 32), ("repeats", 2), ("n_ctx", 256)):
        rp.set_param(bench, name, value)
    rp.steps.setCurrentRow(0)
    w.tabs.setCurrentIndex(0)
    shot(w, "model-card")

    w.run_recipe()
    wait_until(lambda: w.current_run is not None, 60, "the run to start")
    st = w.states[w.current_run]
    w.tabs.setCurrentIndex(1)
    wait_until(lambda: st.finished, 1800, "the run to finish")
    if st.status != "succeeded":
        raise SystemExit(f"the run {st.status}: {st.error}")
    settle(1.0)
    w.tabs.setCurrentIndex(1)     # the app shows the results when a run ends; the plots first
    shot(w, "live")
    w.tabs.setCurrentIndex(2)
    names = [v["name"] for v in st.variant_rows() if v.get("path")]
    w.results.select(names[len(names) // 2])
    shot(w, "results")
    w.tabs.setCurrentIndex(0)
    shot(w, "runs")

    dialog = w.export_dialog(w.results.current())
    dialog.folder.setText(str(Path.home()))
    dialog.show()
    shot(dialog, "export-dialog")
    dialog.close()

    w.tabs.setCurrentIndex(3)
    w.try_panel.max_tokens.setValue(40)
    w.try_panel.generate()
    wait_until(lambda: w.try_panel.button.isEnabled(), 600, "generation")
    shot(w, "try-it")

    if args.dark:
        from PySide6.QtGui import QColor, QPalette

        app.setStyle("Fusion")
        pal = QPalette()
        for role, color in ((QPalette.ColorRole.Window, "#2b2b2b"), (QPalette.ColorRole.WindowText, "#e6e6e6"),
                            (QPalette.ColorRole.Base, "#1e1e1e"), (QPalette.ColorRole.AlternateBase, "#2b2b2b"),
                            (QPalette.ColorRole.Text, "#e6e6e6"), (QPalette.ColorRole.Button, "#3a3a3a"),
                            (QPalette.ColorRole.ButtonText, "#e6e6e6"), (QPalette.ColorRole.Highlight, "#3d6fb4"),
                            (QPalette.ColorRole.HighlightedText, "#ffffff")):
            pal.setColor(role, QColor(color))
        app.setPalette(pal)
        configure_plots(app)      # plots read the palette when they are made
        w2 = MainWindow(runs_root=runs, job_options={"threads": 2}, model=args.model)
        w2.resize(1600, 960)
        w2.show()
        w2.budget_panel.set_profile(w.budget_panel.profile.currentData())
        wait_until(lambda: w2.model_panel.report is not None, 600, "the model card")
        w2.queue.select(st.run_id)
        w2.tabs.setCurrentIndex(2)
        w2.results.select(names[len(names) // 2])
        shot(w2, "results-dark")
        w2.close()
    w.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

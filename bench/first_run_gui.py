"""The Balanced preset on a fresh data folder through the real window, as a presenter meets it: wall time, the
time-left estimate every 10 s, a screenshot of the results.

    rm -rf /tmp/fresh && EDGETAILOR_HOME=/tmp/fresh xvfb-run -a -s "-screen 0 1024x700x24" \
        .venv/bin/python bench/first_run_gui.py /tmp/first-run.png
"""
import sys
import time


def main():
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication
    app = QApplication(sys.argv[:1])
    from edgetailor.ui.main_window import TABS, MainWindow, configure_plots
    configure_plots(app)
    w = MainWindow(job_options={"threads": 2})
    w.resize(1024, 700); w.show()
    def spin(n):
        for _ in range(n):
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50); time.sleep(0.01)
    spin(100)
    w.recipe_panel.load_preset("balanced")
    spin(20)
    t0 = time.monotonic()
    w.run_button.click()
    spin(50)
    run_id = w.current_run
    last = 0
    while time.monotonic() - t0 < 900:
        spin(20)
        st = w.states.get(run_id)
        if st is None:
            continue
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            left = st.time_left()
            print(f"{time.monotonic() - t0:6.0f} s  {100 * st.fraction:5.1f}%  left {left if left is None else round(left)}  {st.step_name}: {st.message[:50]}", flush=True)
        if st.status != "running":
            break
    print("status", st.status, "wall", round(time.monotonic() - t0), "s", flush=True)
    spin(100)
    w.tabs.setCurrentIndex(TABS.index("Results"))
    spin(60)
    w.grab().save(sys.argv[1])
    w.close()


if __name__ == "__main__":
    main()

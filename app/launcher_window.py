"""The packaged app's first start: a window that sets the engine up offline, then hands over to the app.

Qt's widgets only (the launcher is frozen without the engine); each set-up command runs in a ``QProcess``,
so the window stays responsive and Cancel stops the command at once. See ``launcher.py`` for the design.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from PySide6.QtCore import QProcess, QTimer
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QApplication, QCheckBox, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar,
                               QPushButton, QVBoxLayout, QWidget)

from .launcher import (ENV_VAR, EXIT_CANCELLED, EXIT_FAILED, LauncherError, Wheelhouse, find_python,
                       install_menu_entry, setup_commands, start_app, write_stamp)


class SetupWindow(QWidget):
    """Runs the set-up commands one after another; ``result`` is 0 when the engine is ready."""

    def __init__(self, env: Path, launcher: Path):
        super().__init__()
        self.env, self.launcher = env, launcher
        self.result, self.steps, self.index = EXIT_FAILED, [], 0
        self.started = time.monotonic()
        self.proc: QProcess | None = None
        self._build()
        try:
            self.wheels = Wheelhouse.beside(launcher)
            self.steps = self._plan()
        except LauncherError as exc:
            self._fail(exc.problem, exc.fix, exc.exit_code)
            return
        QTimer.singleShot(0, self._next)

    def _build(self) -> None:
        self.setWindowTitle("EdgeTailor: first start")
        self.setObjectName("setupWindow")
        title = QLabel("Setting up EdgeTailor")
        title.setFont(QFont(title.font().family(), 14, QFont.Weight.Bold))
        self.about = QLabel(f"The first time it starts, EdgeTailor installs its engine (torch, transformers, "
                            f"llama.cpp, onnxruntime) from the files it came with, into {self.env}. "
                            f"Nothing is downloaded. This takes a few minutes, once.")
        self.about.setWordWrap(True)
        self.status, self.progress = QLabel("Starting…"), QProgressBar()
        self.status.setObjectName("setupStatus")
        self.status.setWordWrap(True)
        self.menu_entry = QCheckBox("Add EdgeTailor to the application menu")
        self.menu_entry.setChecked(True)
        self.log = QPlainTextEdit(readOnly=True)
        self.log.setMaximumBlockCount(2000)
        self.button = QPushButton("Cancel")
        self.button.clicked.connect(self._cancel_or_close)
        row = QHBoxLayout()
        row.addWidget(self.menu_entry)
        row.addStretch(1)
        row.addWidget(self.button)
        layout = QVBoxLayout(self)
        for widget in (title, self.about, self.status, self.progress):
            layout.addWidget(widget)
        layout.addWidget(self.log, 1)
        layout.addLayout(row)
        self.resize(640, 420)

    def _plan(self) -> list[tuple[str, list[str]]]:
        if os.environ.get(ENV_VAR):
            raise LauncherError(f"{ENV_VAR} names {self.env}, which is not a Python environment.",
                                f"Unset {ENV_VAR}, or point it at an environment set up with packaging/setup.sh.")
        python = find_python(self.wheels.python)
        if python is None:
            raise LauncherError(
                f"EdgeTailor's engine needs Python {self.wheels.python} with its venv module, and this machine "
                f"has none on its PATH.",
                f"Install it (Debian/Ubuntu: sudo apt install python{self.wheels.python} "
                f"python{self.wheels.python}-venv), then start EdgeTailor again.")
        shutil.rmtree(self.env, ignore_errors=True)         # an interrupted set-up: made again from the start
        self.env.parent.mkdir(parents=True, exist_ok=True)
        self.progress.setRange(0, 0)
        return setup_commands(python, self.env, self.wheels)

    def _next(self) -> None:
        if self.index == len(self.steps):
            self._finish()
            return
        what, cmd = self.steps[self.index]
        self.status.setText(f"{what} ({self.index + 1} of {len(self.steps)})…")
        self.log.appendPlainText(f"$ {' '.join(cmd)}")
        self.proc = QProcess(self)
        self.proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.proc.readyReadStandardOutput.connect(self._read)
        self.proc.finished.connect(self._step_done)
        self.proc.start(cmd[0], cmd[1:])

    def _read(self) -> None:
        text = bytes(self.proc.readAllStandardOutput()).decode("utf-8", "replace").rstrip()
        if text:
            self.log.appendPlainText(text)

    def _step_done(self, code: int, status: QProcess.ExitStatus) -> None:
        if self.proc is None:                               # cancelled: _cancel_or_close has done the rest
            return
        self.proc = None
        if code != 0 or status != QProcess.ExitStatus.NormalExit:
            what = self.steps[self.index][0].lower()
            self._fail(f"The set-up stopped while {what} (exit {code}); the log above says why.",
                       "Free disk space if the log says it ran out, then start EdgeTailor again: the set-up "
                       "starts over.", EXIT_FAILED)
            shutil.rmtree(self.env, ignore_errors=True)
            return
        self.index += 1
        self._next()

    def _finish(self) -> None:
        write_stamp(self.env, self.wheels)
        if self.menu_entry.isChecked():
            install_menu_entry(self.env, self.launcher)
        minutes = (time.monotonic() - self.started) / 60
        self.status.setText(f"Ready (set up in {minutes:.1f} min). Starting EdgeTailor…")
        self.result = 0
        QTimer.singleShot(300, QApplication.instance().quit)

    def _fail(self, problem: str, fix: str, exit_code: int) -> None:
        self.result = exit_code
        self.progress.setRange(0, 1)
        self.status.setText(f"<b>{problem}</b><br>Fix: {fix}")
        self.log.appendPlainText(f"error: {problem}\nfix: {fix}")
        self.button.setText("Close")
        print(f"error: {problem}\nfix: {fix}", flush=True)

    def _cancel_or_close(self) -> None:
        if self.button.text() == "Cancel":
            self.result = EXIT_CANCELLED
            proc, self.proc = self.proc, None
            if proc is not None:
                proc.kill()
                proc.waitForFinished(5000)
            shutil.rmtree(self.env, ignore_errors=True)
        self.close()

    def closeEvent(self, event) -> None:          # noqa: N802 (Qt's name): closing the window is a cancel
        if self.proc is not None:
            self.button.setText("Cancel")
            self._cancel_or_close()
        super().closeEvent(event)
        QApplication.instance().quit()


def run_setup_window(env: Path, launcher: Path, argv: list[str]) -> int:
    app = QApplication.instance() or QApplication(["EdgeTailor"])
    app.setApplicationName("EdgeTailor")
    app.setDesktopFileName("edgetailor")
    window = SetupWindow(env, launcher)
    window.show()
    app.exec()
    if window.result == 0:
        window.hide()
        start_app(env, argv)
    return window.result

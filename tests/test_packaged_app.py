"""The packaged desktop app: its frozen launcher starts the window with no terminal; its first start sets the
engine up offline, says in words what stops it, and leaves nothing half-made.

The whole first start from the archive's wheels (about 700 MB) is measured by ``bench/packaged_app.py``; here the
launcher is built without them (``--no-wheels``) and starts this checkout's environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edgetailor import __version__
from edgetailor.launcher import (ENV_VAR, STAMP, Wheelhouse, clean_environment, engine_ready, setup_commands,
                                 write_stamp)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _wheelhouse(root: Path, python: str = "3.11") -> Path:
    """A packaged build's folder with a wheels/ manifest (and a pip wheel's name): enough to plan a set-up."""
    wheels = root / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "bundle.json").write_text(json.dumps({"edgetailor": __version__, "python": python}))
    (wheels / "pip-26.0-py3-none-any.whl").write_bytes(b"")
    return root / "EdgeTailor"


def test_the_frozen_launcher_starts_the_app_window_on_xcb_and_becomes_it(tmp_path, demo_source):
    """What a user's double-click does: the PyInstaller launcher (no engine inside) replaces itself with the
    app of the engine environment, whose main window appears on the real X11 platform."""
    if not (shutil.which("xvfb-run") and shutil.which("xwininfo")):
        pytest.skip("xvfb-run and xwininfo are needed (bash packaging/setup.sh --dev installs them as root)")
    env = {**os.environ, "DIST": str(tmp_path / "dist"), "BUILD": str(tmp_path / "build")}
    build = subprocess.run(["bash", "packaging/build_app.sh", "--no-wheels"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    launcher = tmp_path / "dist" / "EdgeTailor" / "EdgeTailor"
    assert launcher.is_file() and not (tmp_path / "dist" / "EdgeTailor.part").exists()
    frozen = {p.name for p in (tmp_path / "dist" / "EdgeTailor" / "_internal").iterdir()}
    assert "PySide6" in frozen and not frozen & {"torch", "transformers", "llama_cpp", "numpy"}
    script = (f'"{launcher}" & pid=$!; for i in $(seq 1 240); do '
              f'if xwininfo -root -tree | grep -q \'"EdgeTailor": ("gui.py"\'; then '
              f'readlink /proc/$pid/exe; echo WINDOW; kill $pid; wait $pid; exit 0; fi; '
              f'if ! kill -0 $pid 2>/dev/null; then echo EXITED; exit 1; fi; sleep 0.5; done; kill $pid; exit 1')
    run_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "QT_QPA_PLATFORM")}
    run_env.update(PATH="/usr/bin:/bin", **{ENV_VAR: sys.prefix})
    res = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1024x700x24", "sh", "-c", script], env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "WINDOW" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    exe = res.stdout.split("WINDOW")[0].strip().splitlines()[-1]
    assert Path(exe).name.startswith("python"), exe          # one process: the launcher became the app


def test_without_its_wheels_the_first_start_names_the_problem(qtbot, tmp_path):
    from edgetailor.launcher_window import SetupWindow

    window = SetupWindow(tmp_path / "engine", tmp_path / "EdgeTailor" / "EdgeTailor")
    qtbot.addWidget(window)
    assert window.result == 2 and "wheels are missing" in window.status.text()
    assert "Unpack the whole EdgeTailor archive" in window.status.text() and window.button.text() == "Close"
    assert not (tmp_path / "engine").exists()


def test_without_the_python_the_wheels_need_it_says_which_and_how(qtbot, tmp_path, monkeypatch):
    from edgetailor import launcher_window

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(launcher_window, "find_python", lambda wanted: None)
    window = launcher_window.SetupWindow(tmp_path / "engine", _wheelhouse(tmp_path / "EdgeTailor", "3.9"))
    qtbot.addWidget(window)
    assert window.result == 2 and "needs Python 3.9" in window.status.text()
    assert "apt install python3.9 python3.9-venv" in window.status.text()


def _run_setup(qtbot, tmp_path, monkeypatch, steps) -> tuple:
    from edgetailor import launcher_window

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(launcher_window, "setup_commands", lambda python, env, wheels: steps(env))
    monkeypatch.setattr(launcher_window, "install_menu_entry", lambda env, launcher: None)
    env = tmp_path / "engine" / __version__
    env.mkdir(parents=True)
    (env / "left-by-an-interrupted-set-up").write_text("x")
    window = launcher_window.SetupWindow(env, _wheelhouse(tmp_path / "EdgeTailor"))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.button.text() == "Close" or window.result == 0, timeout=60_000)
    return window, env


def test_the_set_up_runs_its_steps_in_order_then_stamps_the_engine_ready(qtbot, tmp_path, monkeypatch):
    def steps(env):
        make = f"import pathlib; p = pathlib.Path({str(env)!r}, 'bin'); p.mkdir(parents=True); (p / 'python').touch()"
        return [("Making", [sys.executable, "-c", make]), ("Installing", [sys.executable, "-c", "print('ok')"])]

    window, env = _run_setup(qtbot, tmp_path, monkeypatch, steps)
    assert window.result == 0 and engine_ready(env)
    assert not (env / "left-by-an-interrupted-set-up").exists()       # an unfinished one is made again
    assert "$ " in window.log.toPlainText() and "ok" in window.log.toPlainText()


def test_a_failed_step_says_so_and_leaves_no_environment(qtbot, tmp_path, monkeypatch):
    def steps(env):
        fail = f"import os, sys; os.makedirs({str(env)!r}, exist_ok=True); print('No space left on device'); sys.exit(3)"
        return [("Installing the engine", [sys.executable, "-c", fail])]

    window, env = _run_setup(qtbot, tmp_path, monkeypatch, steps)
    assert window.result == 1 and "stopped while installing the engine (exit 3)" in window.status.text()
    assert "No space left on device" in window.log.toPlainText() and not env.exists()


def test_cancel_stops_the_running_step_and_removes_what_it_made(qtbot, tmp_path, monkeypatch):
    def steps(env):
        return [("Installing", [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"])]

    from edgetailor import launcher_window

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(launcher_window, "setup_commands", lambda python, env, wheels: steps(env))
    env = tmp_path / "engine"
    window = launcher_window.SetupWindow(env, _wheelhouse(tmp_path / "EdgeTailor"))
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: "working" in window.log.toPlainText(), timeout=30_000)
    proc = window.proc
    window.button.click()
    assert window.result == 130 and proc.state() == proc.ProcessState.NotRunning and not env.exists()


def test_an_engine_is_ready_only_when_its_stamp_says_this_version(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    env = tmp_path / "engine"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    assert not engine_ready(env)                                     # set-up interrupted before its end
    (env / STAMP).write_text(json.dumps({"edgetailor": "0.0.1"}))
    assert not engine_ready(env)                                     # an older engine: set up again
    write_stamp(env, Wheelhouse(tmp_path, "3.11", __version__))
    assert engine_ready(env) and not list(env.glob("*.part"))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert not engine_ready(tmp_path / "elsewhere")


def test_every_set_up_command_is_offline(tmp_path):
    wheels = Wheelhouse.beside(_wheelhouse(tmp_path / "EdgeTailor"))
    steps = setup_commands("/usr/bin/python3.11", tmp_path / "engine", wheels)
    assert steps[0][1][-3:] == ["venv", "--without-pip", str(tmp_path / "engine")]
    pip_steps = [cmd for _, cmd in steps if "install" in cmd and "pip" in " ".join(cmd[:3])]
    assert len(pip_steps) == 3 and all("--no-index" in cmd and str(wheels.folder) in cmd for cmd in pip_steps)


def test_the_app_gets_the_environment_the_frozen_launcher_found(monkeypatch):
    monkeypatch.setattr(sys, "_MEIPASS", "/opt/EdgeTailor/_internal", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/EdgeTailor/_internal")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/usr/local/lib")
    monkeypatch.setenv("QT_PLUGIN_PATH", "/opt/EdgeTailor/_internal/PySide6/Qt/plugins")
    monkeypatch.setenv("_PYI_APPLICATION_HOME_DIR", "/opt/EdgeTailor")
    env = clean_environment()
    assert env["LD_LIBRARY_PATH"] == "/usr/local/lib" and "QT_PLUGIN_PATH" not in env
    assert not [k for k in env if k.startswith("_PYI")] and env["PATH"] == os.environ["PATH"]

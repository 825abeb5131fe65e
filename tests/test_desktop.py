"""The app menu's entry: a valid .desktop file and icon, whose Exec line starts the window with no terminal."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from edgetailor.desktop import desktop_entry, gui_launcher, install


def _field(text: str, key: str) -> str:
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}="))


def test_install_writes_a_valid_entry_and_its_icon(tmp_path):
    entry, icon = install(tmp_path / "share")
    text = entry.read_text()
    assert entry == tmp_path / "share/applications/edgetailor.desktop"
    assert icon == tmp_path / "share/icons/hicolor/scalable/apps/edgetailor.svg" and "<svg" in icon.read_text()
    assert _field(text, "Exec") == str(gui_launcher()) and os.access(gui_launcher(), os.X_OK)
    assert _field(text, "Terminal") == "false" and _field(text, "Icon") == "edgetailor"
    if shutil.which("desktop-file-validate"):
        res = subprocess.run(["desktop-file-validate", str(entry)], capture_output=True, text=True)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    assert not [p for p in (tmp_path / "share").rglob("*") if p.name.startswith(".")]     # nothing half-written


def test_an_exec_path_with_spaces_is_quoted():
    assert _field(desktop_entry(Path("/opt/My Apps/edgetailor-gui")), "Exec") == '"/opt/My Apps/edgetailor-gui"'


def test_a_missing_launcher_is_named_with_its_fix(tmp_path):
    from edgetailor.engine.errors import EdgeTailorError

    with pytest.raises(EdgeTailorError, match="no edgetailor-gui launcher") as info:
        install(tmp_path / "share", exec_path=tmp_path / "nowhere" / "edgetailor-gui")
    assert "setup.sh" in info.value.fix


def test_the_entry_starts_the_window_on_the_real_xcb_platform(tmp_path, demo_source):
    """What the app menu does: run the Exec line (no terminal, no activated environment) and see the window."""
    if not (shutil.which("xvfb-run") and shutil.which("xwininfo")):
        pytest.skip("xvfb-run and xwininfo are needed (bash packaging/setup.sh --dev installs them as root)")
    entry, _ = install(tmp_path / "share")
    exec_line = _field(entry.read_text(), "Exec")
    script = (f'{exec_line} & pid=$!; for i in $(seq 1 240); do '
              f'if xwininfo -root -tree | grep -q \'"EdgeTailor"\'; then echo WINDOW; kill $pid; wait $pid; exit 0; fi; '
              f'if ! kill -0 $pid 2>/dev/null; then echo EXITED; exit 1; fi; sleep 0.5; done; kill $pid; exit 1')
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "QT_QPA_PLATFORM")}
    env["PATH"] = "/usr/bin:/bin"                 # as a desktop session starts it: not from the environment
    res = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1024x700x24", "sh", "-c", script], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "WINDOW" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]

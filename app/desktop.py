"""EdgeTailor in the desktop's application menu: a freedesktop.org ``.desktop`` entry and its icon.

    python -m edgetailor.desktop            # what packaging/setup.sh runs: the entry for this installation
    python -m edgetailor.desktop --exec P   # what the packaged app's first start runs: the entry starts P

writes ``$XDG_DATA_HOME/applications/edgetailor.desktop`` (default ``~/.local/share``) and the icon into
``icons/hicolor/scalable/apps/edgetailor.svg`` there. The entry starts ``edgetailor-gui`` of this environment
(an absolute path, so no terminal or activated environment is needed) with ``Terminal=false``; the window
names itself after the entry (``StartupWMClass``, ``QGuiApplication.setDesktopFileName``), so the desktop
shows it under the app's icon.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

APP_ID = "edgetailor"


def gui_launcher() -> Path:
    """The ``edgetailor-gui`` script of the Python environment this module runs in."""
    return Path(sys.executable).parent / "edgetailor-gui"


def desktop_entry(exec_path: Path, icon: str = APP_ID) -> str:
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Version=1.0",
        "Name=EdgeTailor",
        "GenericName=Language model compressor",
        "Comment=Tailor a language model to a device: compress, measure, and pick the variant to ship",
        f"Exec={_quoted(exec_path)}",
        f"Icon={icon}",
        "Terminal=false",
        "Categories=Development;",
        "Keywords=LLM;quantization;GGUF;ONNX;llama.cpp;",
        "StartupNotify=true",
        "StartupWMClass=EdgeTailor",
        "",
    ])


def _quoted(path: Path) -> str:
    """An Exec path as the Desktop Entry spec quotes it (double quotes when it holds reserved characters)."""
    text = str(path)
    if any(c in text for c in ' \t\n"\'\\><~|&;$*?#()`'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$") + '"'
    return text


def install(data_home: Path | None = None, exec_path: Path | None = None) -> list[Path]:
    """Write the entry and the icon (atomically); return their paths."""
    from edgetailor.engine.atomic import atomic_path
    from edgetailor.engine.errors import EdgeTailorError
    from edgetailor.engine.paths import asset_path

    exec_path = Path(exec_path or gui_launcher())
    if not os.access(exec_path, os.X_OK):
        raise EdgeTailorError(f"There is no edgetailor-gui launcher at {exec_path}.",
                              "Install EdgeTailor first (bash packaging/setup.sh), then run this again.")
    data_home = Path(data_home or os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    entry = data_home / "applications" / f"{APP_ID}.desktop"
    icon = data_home / "icons" / "hicolor" / "scalable" / "apps" / f"{APP_ID}.svg"
    for path in (entry, icon):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(entry) as tmp:
        tmp.write_text(desktop_entry(exec_path), encoding="utf-8")
    with atomic_path(icon) as tmp:
        shutil.copyfile(asset_path("icons", f"{APP_ID}.svg"), tmp)
    return [entry, icon]


def main(argv: list[str] | None = None) -> int:
    """``python -m edgetailor.desktop [--exec PATH]``: the entry for this environment, or one starting PATH
    (the packaged app's launcher)."""
    from edgetailor.engine.errors import EdgeTailorError

    argv = list(sys.argv[1:] if argv is None else argv)
    exec_path = Path(argv[argv.index("--exec") + 1]) if "--exec" in argv[:-1] else None
    try:
        written = install(exec_path=exec_path)
    except (EdgeTailorError, OSError) as exc:
        problem = exc.problem if isinstance(exc, EdgeTailorError) else str(exc)
        print(f"warning: EdgeTailor was not added to the application menu: {problem}", file=sys.stderr)
        return 1
    print("EdgeTailor is in the application menu: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

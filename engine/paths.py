"""Where EdgeTailor keeps its data: converted models, runs, caches, user device profiles.

``EDGETAILOR_HOME`` overrides the platform's user data folder (tests point it at a temporary folder).
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def data_dir() -> Path:
    env = os.environ.get("EDGETAILOR_HOME")
    if env:
        root = Path(env)
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("edgetailor", appauthor=False))
    return ensure_folder(root, "data folder")


def ensure_folder(path: Path, what: str) -> Path:
    """``path`` as a folder the app can write in, or an error that says what is wrong and what to do."""
    from .errors import EdgeTailorError

    fix = "Pass --home FOLDER (or set EDGETAILOR_HOME) to a writable folder."
    if path.exists() and not path.is_dir():
        raise EdgeTailorError(f"The {what} {path} is a file, not a folder.", f"Move the file away, or: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            from .errors import DoesNotFitError

            raise DoesNotFitError(f"The disk is full: the {what} {path} cannot be created.",
                                  f"Free disk space, or: {fix}") from exc
        raise EdgeTailorError(f"The {what} {path} cannot be created ({exc.strerror}).", fix) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise EdgeTailorError(f"The {what} {path} is not writable.", f"Give yourself write access, or: {fix}")
    return path


def models_dir() -> Path:
    return ensure_folder(data_dir() / "models", "models folder")


def runs_dir() -> Path:
    return ensure_folder(data_dir() / "runs", "runs folder")


def cache_dir() -> Path:
    return ensure_folder(data_dir() / "cache", "cache folder")


def asset_path(*parts: str) -> Path:
    """A file shipped in ``assets/`` (the ``edgetailor.assets`` package)."""
    return Path(str(resources.files("edgetailor.assets").joinpath(*parts)))

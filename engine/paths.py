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
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    d = data_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_dir() -> Path:
    d = data_dir() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_dir() -> Path:
    d = data_dir() / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def asset_path(*parts: str) -> Path:
    """A file shipped in ``assets/`` (the ``edgetailor.assets`` package)."""
    return Path(str(resources.files("edgetailor.assets").joinpath(*parts)))

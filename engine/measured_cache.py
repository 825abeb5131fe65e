"""What the planner measured about a model, kept for the next ``fit`` of the same model.

A plan's first minutes go to the source itself: every tensor's sensitivity and type prices, what removing
blocks costs, every tensor encoded for the first file. None of it depends on the budget, so another ``fit`` of
the same model (another device, a changed limit: what a user does next) reuses it and only builds and measures
files. An entry is keyed by everything it read: the source's content (``job.source_hash``), the code that
measured it (the bytes of the engine's and exporters' modules), the libraries' versions, and the inputs the
caller names (the calibration's token ids, ...); a changed model, text or program never reads a stale entry.

Entries are written atomically (a run cancelled halfway leaves none half-written). Beyond ``EDGETAILOR_CACHE_GB``
(default 4) the least recently used models' entries are removed. Narrower models (healed per run) are not kept.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from . import atomic, paths

DEFAULT_LIMIT_GB = 4.0


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the engine's and exporters' Python files: a measurement made by other code is another entry."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("engine", "exporters"):
        for f in sorted((root / package).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def digest(*reads: Any) -> str:
    """A short key for what an entry read (token id lists, settings: anything ``json`` writes)."""
    return hashlib.sha256(json.dumps(reads, sort_keys=True, default=str).encode()).hexdigest()[:16]


def root() -> Path:
    return paths.ensure_folder(paths.cache_dir() / "measured", "cache folder")


class MeasuredCache:
    """One model's entries: ``json(what, reads, make)`` for figures, ``folder(what, reads)`` for files."""

    def __init__(self, name: str, source_sha256: str, reuse: bool = True):
        from .runs import library_versions

        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60]
        self.folder_path = root() / f"{safe}-{digest(source_sha256, code_fingerprint(), library_versions())}"
        self.reuse = reuse                  # False: every entry measured again (and kept, replacing the old one)
        self.reused: list[str] = []
        self.emptied: set[str] = set()

    def _touch(self) -> None:
        self.folder_path.mkdir(parents=True, exist_ok=True)
        os.utime(self.folder_path)

    def json(self, what: str, reads: Any, make: Callable[[], Any]) -> Any:
        """The entry ``what`` for ``reads``: read back if a run made it, else ``make()`` and kept."""
        self._touch()
        value, reused = kept_json(self.folder_path / f"{what}-{digest(reads)}.json", make, self.reuse)
        if reused:
            self.reused.append(what)
        return value

    def folder(self, what: str, reads: Any) -> Path:
        """A folder for the entry's files (its writer keeps each file atomic); emptied first without ``reuse``."""
        self._touch()
        out = self.folder_path / f"{what}-{digest(reads)}"
        if not self.reuse and what not in self.emptied:
            atomic.remove_path(out)
            self.emptied.add(what)
        out.mkdir(exist_ok=True)
        return out

    def made_folder(self, what: str, reads: Any, make: Callable[[Path], None]) -> Path:
        """The complete folder of entry ``what``: read back if a run made it, else ``make(folder)`` fills a new one,
        which appears only once filled."""
        self._touch()
        out = self.folder_path / f"{what}-{digest(reads)}"
        if self.reuse and out.is_dir():
            self.reused.append(what)
            return out
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            make(tmp)
        return out


def kept_json(path: Path, make: Callable[[], Any], reuse: bool = True) -> tuple[Any, bool]:
    """(the JSON at ``path`` if ``reuse`` and a run wrote it, else ``make()`` written there atomically; whether it
    was read back). Worker processes use it directly, with a path inside a ``MeasuredCache.folder``."""
    if reuse:
        try:
            return json.loads(Path(path).read_text()), True
        except (OSError, ValueError):
            pass
    value = make()
    atomic.write_json(path, value)
    return value, False


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy on disk), a copy across file systems."""
    import shutil

    atomic.remove_path(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def limit_bytes() -> int:
    try:
        return int(float(os.environ.get("EDGETAILOR_CACHE_GB", DEFAULT_LIMIT_GB)) * 1e9)
    except ValueError:
        return int(DEFAULT_LIMIT_GB * 1e9)


def prune(keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove what killed runs left half-written, then the least recently used models' entries until the cache
    holds at most ``limit`` bytes (``keep``, the model in use, stays). Returns the models' folders removed."""
    limit = limit_bytes() if limit is None else limit
    atomic.sweep_stale_partials_below(root())        # entries a killed run was writing
    entries = sorted((p for p in root().iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    sizes = {p: atomic.tree_size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for p in reversed(entries):
        if total <= limit:
            break
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        atomic.remove_path(p)
        total -= sizes[p]
        removed.append(p)
    return removed


def clear() -> None:
    """Every model's entries removed (the planner's bench starts each model from an empty cache)."""
    atomic.remove_path(root())

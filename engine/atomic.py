"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

PARTIAL_SUFFIX = ".partial"
#: a partial's name ends with its writer's process id: ``.NAME.PID.partial``
_PARTIAL_PID = r"\.(\d+)" + re.escape(PARTIAL_SUFFIX) + "$"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only if the block succeeds.

    Works for files and folders. On any exception (cancel included) the temporary is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    remove_path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if final.is_dir() and tmp.is_dir():
            remove_path(final)
        os.replace(tmp, final)
    finally:
        remove_path(tmp)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _remove_orphans(candidates, pid_pattern: str) -> list[Path]:
    """Remove the candidates whose name holds (``pid_pattern``'s group) the id of a process that no longer runs."""
    import psutil

    removed = []
    for p in candidates:
        m = re.search(pid_pattern, p.name)
        if m and int(m.group(1)) != os.getpid() and not psutil.pid_exists(int(m.group(1))):
            remove_path(p)
            removed.append(p)
    return removed


def sweep_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the partial files and folders in ``folder`` (not below) whose writer no longer runs (a process
    killed mid-write leaves ``.NAME.PID.partial``); those of live processes are left alone. Returns what went."""
    return _remove_orphans(Path(folder).glob(f".*{PARTIAL_SUFFIX}"), _PARTIAL_PID)


def sweep_stale_partials_below(folder: str | os.PathLike) -> list[Path]:
    """``sweep_stale_partials`` in ``folder`` and every folder below it."""
    return _remove_orphans(Path(folder).rglob(f".*{PARTIAL_SUFFIX}"), _PARTIAL_PID)


@contextlib.contextmanager
def exclusive(name: str):
    """Within the block no other EdgeTailor process holds the lock ``name`` (a file lock in the cache folder):
    one process converts a model while the others wait and then find it done."""
    from filelock import FileLock

    from . import paths

    folder = paths.ensure_folder(paths.cache_dir() / "locks", "lock folder")
    with FileLock(str(folder / f"{name}.lock")):
        yield


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted atomic writes below ``folder``; return what was removed."""
    removed = []
    for p in sorted(Path(folder).rglob(f"*{PARTIAL_SUFFIX}"), key=lambda p: len(p.parts), reverse=True):
        remove_path(p)
        removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of a file, or of a folder's files (names and contents) in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in path.rglob("*") if p.is_file())
    with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1) or 1) as pool:   # hashlib lets go of the GIL:
        digests = list(pool.map(sha256_file, files))                              # a sharded model's files at once
    h = hashlib.sha256()
    for f, digest in zip(files, digests):
        h.update(str(f.relative_to(path)).encode())
        h.update(digest.encode())
    return h.hexdigest()


def tree_size(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: every temporary folder EdgeTailor makes outside a run folder starts with this, and names its process
TEMP_PREFIX = "edgetailor-"


def temp_prefix(kind: str) -> str:
    """The prefix of a temporary folder of this process (``tempfile``'s ``prefix=``): the pid in its name lets a
    later start of the app remove it if this process was killed before it could (``sweep_stale_temp``)."""
    return f"{TEMP_PREFIX}{kind}-pid{os.getpid()}-"


def sweep_stale_temp(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove EdgeTailor's temporary folders whose process no longer runs (in the system's temp folder)."""
    return _remove_orphans(Path(folder or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-pid*-*"), r"-pid(\d+)-")

"""Running a job: a recipe applied to a model source, step by step, recorded in a run folder.

``run_job`` runs in the current process (tests, the worker process). ``worker.start_job`` runs it in a
separate process that streams events and can be cancelled at any point.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import paths
from .context import JobOptions, RunContext
from .errors import EdgeTailorError, RunCancelled
from .events import make_event
from .memory import AnonPeak, peak_rss_bytes, reset_peak_rss
from .preflight import preflight
from .recipe import Recipe
from .registry import get_step
from .runs import RunRecord, elapsed, expected_step_seconds, prior_step_seconds
from .sources import ResolvedSource


@dataclass
class JobSpec:
    """Everything a worker needs to run a job (plain data: it crosses a process boundary)."""

    recipe: dict
    source: str = "demo"
    options: dict = field(default_factory=dict)
    runs_root: str | None = None
    run_id: str | None = None
    trust_remote_code: bool = False
    allow_network: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_job(job: JobSpec, emit: Callable[[dict], None] | None = None,
            cancel: threading.Event | None = None) -> RunRecord:
    """Run every step of the recipe; return the finished run record (whatever its status)."""
    emit = emit or (lambda e: None)
    cancel = cancel or threading.Event()
    recipe = Recipe.from_dict(job.recipe)
    configs = recipe.validate()                      # bad parameters fail before any heavy work
    options = JobOptions.from_dict(job.options)
    root = Path(job.runs_root) if job.runs_root else paths.runs_dir()
    record = RunRecord.create(root, recipe.to_dict(), job.source, options.to_dict(), run_id=job.run_id)
    t0 = time.time()
    try:
        events_log = open(record.folder / "events.jsonl", "a", encoding="utf-8")
    except OSError as exc:                           # no room for the log: the record still says why it stopped
        record.finish("failed", machine_error(exc) or _failure(exc)[1])
        raise

    def emit_and_log(ev: dict) -> None:
        import json

        emit(ev)                                     # the watcher hears it even when the disk has no room for it
        events_log.write(json.dumps(ev, default=str) + "\n")
        events_log.flush()

    emit_and_log(make_event("run_started", record.id, None, t0, recipe=recipe.to_dict(), source=job.source,
                            folder=str(record.folder)))
    status, error = "succeeded", None
    try:
        src = _resolve_and_check(job, recipe, record, root, lambda m: emit_and_log(
            make_event("log", record.id, None, t0, message=m, level="info")))
        ctx = RunContext(record, src, options, emit_and_log, cancel, t0)
        named = [(s.name, s.params) for s in recipe.steps]
        expected = (expected_step_seconds(root, record.manifest["source"].get("sha256"), named),
                    prior_step_seconds(named))
        for i, (spec, cfg) in enumerate(zip(recipe.steps, configs)):
            _run_step(ctx, i, len(recipe.steps), spec, cfg, expected)
        ctx.step_name = None
    except Exception as exc:      # noqa: BLE001  every failure is recorded; _failure says how
        status, error = _failure(exc)
    finally:
        for s in record.manifest["steps"]:
            if s["status"] == "running":
                s["status"] = status
        _cleanup_scratch(record)
        record.manifest["timings"]["total_seconds"] = round(time.time() - t0, 3)
        record.finish(status, error)
        with contextlib.suppress(OSError):          # a full disk loses the log's last line; the record holds it
            emit_and_log(make_event("run_finished", record.id, None, t0, status=status, error=error,
                                    manifest=str(record.manifest_path)))
        with contextlib.suppress(OSError):
            events_log.close()
    return record


def _resolve_and_check(job: JobSpec, recipe: Recipe, record: RunRecord, root: Path, log) -> ResolvedSource:
    """The source, resolved and checked before anything heavy: pre-flight recorded, and raised when it fails."""
    from . import sources

    t = time.perf_counter()
    src = sources.resolve(job.source, trust_remote_code=job.trust_remote_code, allow_network=job.allow_network,
                          progress=log)
    sources.require_tokenizer(src.path, src.trust_remote_code)     # before any step loads the model
    report = preflight(src, recipe, work_dir=root)
    record.manifest["source"].update(src.to_dict())
    record.manifest["source"]["sha256"] = source_hash(src.path)
    record.manifest["preflight"] = report.to_dict()
    record.manifest["timings"]["resolve_seconds"] = elapsed(t)
    record.save()
    report.raise_if_not_fits()
    return src


def _run_step(ctx: RunContext, index: int, count: int, spec, cfg,
              expected: tuple[list[float | None], list[float | None]]) -> None:
    """One step, with its manifest entry (running, then its seconds) and its events (``expected``: what every
    step of the recipe took here before, and on the demo model when the presets were measured, for progress
    weighted by time)."""
    ctx.check_cancelled()
    info = get_step(spec.name)
    ctx.step_name = spec.name
    ctx.emit("step_started", index=index, count=count, params=spec.params, kind=info.kind,
             expected_seconds=expected[0], prior_seconds=expected[1])
    entry = {"name": spec.name, "params": spec.params, "status": "running", "seconds": None}
    ctx.record.manifest["steps"].append(entry)
    ctx.record.save()
    ts = time.perf_counter()
    measured = reset_peak_rss()
    with AnonPeak() as anon:
        info.run(ctx, cfg)
    entry.update(status="succeeded", seconds=elapsed(ts), **_ram_measured_and_predicted(ctx.record, index, measured),
                 ram_peak_anon_bytes=anon.peak if measured else None)
    ctx.record.save()
    ctx.emit("step_finished", index=index, seconds=entry["seconds"])


def _ram_measured_and_predicted(record: RunRecord, index: int, measured: bool) -> dict:
    """The step's peak resident memory in this process (the run's worker; file pages it mapped count; the part not
    file-backed is sampled beside it, ``memory.AnonPeak``) beside what pre-flight said it holds and maps."""
    steps = (record.manifest.get("preflight") or {}).get("steps") or []
    need = steps[index] if index < len(steps) else {}
    return {"ram_peak_bytes": peak_rss_bytes() if measured else None, "ram_preflight_bytes": need.get("ram_bytes"),
            "ram_preflight_mapped_bytes": need.get("mapped_bytes", 0)}


#: what a run's error says when the cause is not known: a bug, reported with its traceback
BUG_FIX = "This is likely a bug in EdgeTailor; the run folder's manifest holds the traceback."


def _failure(exc: BaseException) -> tuple[str, dict]:
    """A run's final status and error for what stopped it: cancelled, the user's problem and fix, the machine's
    (a full disk, no permission, no memory), or a bug with its traceback."""
    if isinstance(exc, RunCancelled):
        return "cancelled", {"type": "Cancelled", "problem": "The run was cancelled by the user.", "fix": ""}
    if isinstance(exc, EdgeTailorError):
        return "failed", exc.to_dict()
    found = machine_error(exc)
    return "failed", found or {"type": type(exc).__name__, "problem": f"{type(exc).__name__}: {exc}", "fix": BUG_FIX,
                               "traceback": traceback.format_exc()}


def machine_error(exc: BaseException) -> dict | None:
    """A full disk, a folder the app may not write, or memory running out, as a problem and its fix; None for
    anything else (a bug, reported with its traceback)."""
    import errno

    if isinstance(exc, MemoryError):
        return {"type": "OutOfMemory", "problem": "The machine ran out of memory during the run.",
                "fix": "Close other programs, pick a smaller model, or drop the steps that hold the whole model "
                       "(`edgetailor inspect MODEL --recipe R` shows what each step needs).", "exit_code": 3}
    code = (exc.errno if isinstance(exc, OSError) else None) or _errno_in_text(exc)
    where = getattr(exc, "filename", None) or "a file the run writes"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return {"type": "DiskFull", "problem": f"The disk is full (writing {where}).",
                "fix": "Free disk space (pre-flight shows what the recipe needs), or point --home at a larger disk.",
                "exit_code": 3}
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return {"type": "NotWritable", "problem": f"EdgeTailor may not write {where} ({os.strerror(code)}).",
                "fix": "Give yourself write access to the data folder, or pass --home FOLDER to a writable one.",
                "exit_code": 2}
    return None


def _errno_in_text(exc: BaseException) -> int | None:
    """The errno an error carries only in its text, else None: a Rust library's (safetensors, tokenizers:
    "... (os error 28)"), or numpy's short write ("11008 requested and 2352 written": the disk took fewer bytes)."""
    import errno
    import re

    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found:
        return int(found.group(1))
    return errno.ENOSPC if re.fullmatch(r"\d+ requested and \d+ written", str(exc)) else None


def _cleanup_scratch(record: RunRecord) -> None:
    import shutil

    shutil.rmtree(record.folder / "scratch", ignore_errors=True)


def source_hash(folder: Path) -> str:
    """sha256 over the model folder's files, cached by (path, size, mtime) so it is computed once."""
    import hashlib
    import json

    from . import atomic

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256(json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()
    cache = paths.cache_dir() / "source-hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = atomic.sha256_tree(folder)
        atomic.write_json(cache, known)
    return known[key]

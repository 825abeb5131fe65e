"""Run a job in a separate process that streams events and can be cancelled at any point.

    handle = start_job(JobSpec(recipe=..., source="demo"))
    for event in handle.events():        # blocks; ends after run_finished
        ...
    handle.cancel()                      # from any thread: cooperative first, then the process is ended

A run whose process dies (crash, kill, out of memory) is still recorded: the parent marks the manifest
failed or cancelled and removes partial files.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Iterator

from . import paths
from .events import make_event
from .job import JobSpec, run_job
from .runs import RunRecord, new_run_id

CANCEL_GRACE_SECONDS = 5.0


#: how often a worker checks that the app that started it is still there
PARENT_CHECK_SECONDS = 1.0


def _watch_parent(cancel) -> None:
    """A run stops when the app that started it ends (killed, its terminal closed): the worker sees itself
    re-parented and cancels the run, which records itself as cancelled and removes its partial files."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while not cancel.is_set():
            if os.getppid() != parent:
                cancel.set()
                return
            time.sleep(PARENT_CHECK_SECONDS)

    threading.Thread(target=watch, name="edgetailor-parent-watch", daemon=True).start()


def _child(job_dict: dict, events: mp.Queue, cancel) -> None:
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C in a terminal goes to the parent, which cancels
    signal.signal(signal.SIGHUP, signal.SIG_IGN)     # so does a closed terminal: the parent cancels, or dies
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the run reports its own progress: transformers' and the hub's bars (loading and saving the planner's probe
    # models) would only be noise on the terminal the CLI draws its progress on
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _watch_parent(cancel)
    try:
        run_job(JobSpec(**job_dict), emit=events.put, cancel=cancel)
    except Exception as exc:          # the run folder could not be made: a full disk or a read-only one, else a bug
        from .job import machine_error

        error = machine_error(exc)
        if error is None:
            raise
        events.put(make_event("run_finished", job_dict["run_id"], None, None, status="failed", error=error,
                              manifest=None))


class JobHandle:
    def __init__(self, job: JobSpec):
        self.job = job
        if not job.run_id:
            job.run_id = new_run_id(job.recipe.get("name", "run"))
        if not job.runs_root:
            job.runs_root = str(paths.runs_dir())
        ctx = mp.get_context("spawn")
        self._events: mp.Queue = ctx.Queue()
        self._cancel = ctx.Event()
        self._proc = ctx.Process(target=_child, args=(job.to_dict(), self._events, self._cancel),
                                 name=f"edgetailor-{job.run_id}", daemon=True)
        self._finished = False
        self.error: dict | None = None           # the run's error once it has finished, as run_finished said
        self.status: str | None = None
        self.cancel_requested_at: float | None = None

    @property
    def run_id(self) -> str:
        return self.job.run_id

    @property
    def pid(self) -> int | None:
        """The worker process's id (for memory sampling); None before start."""
        return self._proc.pid

    @property
    def folder(self) -> Path:
        return Path(self.job.runs_root) / self.job.run_id

    def start(self) -> "JobHandle":
        """Checks the recipe, the options and what can be read of the source quickly (a model folder's config,
        tokenizer and file headers, and pre-flight on them; a GGUF's header) here, in the caller (a message with
        the fix, no run folder made, no worker started, nothing loaded), then starts the worker."""
        from .context import JobOptions
        from .preflight import preflight
        from .recipe import Recipe
        from .sources import check_before_run, require_tokenizer

        recipe = Recipe.from_dict(self.job.recipe)
        recipe.validate()
        JobOptions.from_dict(self.job.options)
        src = check_before_run(self.job.source, trust_remote_code=self.job.trust_remote_code,
                               allow_network=self.job.allow_network)
        if src is not None:
            preflight(src, recipe, work_dir=Path(self.job.runs_root)).raise_if_not_fits()
            require_tokenizer(src.path, src.trust_remote_code)
        self._proc.start()
        return self

    def cancel(self) -> None:
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()
        self._cancel.set()

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Events that arrived (non-blocking with timeout 0); ends the process if a cancel is overdue."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                remaining = max(0.0, deadline - time.monotonic())
                ev = self._events.get(timeout=remaining) if remaining > 0 and not out else self._events.get_nowait()
                out.append(ev)
                if ev["type"] == "run_finished":
                    self._finished = True
                    self.status, self.error = ev["data"]["status"], ev["data"].get("error")
            except queue.Empty:
                break
        if not self._finished:
            out.extend(self._check_process())
        return out

    def events(self, poll_interval: float = 0.2) -> Iterator[dict]:
        while not self._finished:
            yield from self.poll(poll_interval)
        self._proc.join(timeout=10)

    def wait(self) -> str:
        for _ in self.events():
            pass
        return self.status

    def _check_process(self) -> list[dict]:
        overdue = (self.cancel_requested_at is not None
                   and time.monotonic() - self.cancel_requested_at > CANCEL_GRACE_SECONDS)
        if overdue and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=3)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=3)
        if self._proc.is_alive() or self._proc.exitcode is None:
            return []
        # The process is gone without saying run_finished: drain what it managed to send, then record it.
        time.sleep(0.05)
        out = []
        try:
            while True:
                ev = self._events.get_nowait()
                out.append(ev)
                if ev["type"] == "run_finished":
                    self._finished = True
                    self.status, self.error = ev["data"]["status"], ev["data"].get("error")
                    return out
        except queue.Empty:
            pass
        status = "cancelled" if self.cancel_requested_at is not None else "failed"
        error = {"type": "WorkerExited",
                 "problem": (f"The run was cancelled (the worker was stopped, exit code {self._proc.exitcode})."
                             if status == "cancelled" else
                             f"The worker process ended unexpectedly (exit code {self._proc.exitcode}); "
                             "it may have run out of memory."),
                 "fix": "" if status == "cancelled" else "Try a smaller model or fewer steps; see the run's events.jsonl."}
        if (self.folder / "manifest.json").exists():
            rec = RunRecord.open(self.folder)
            for s in rec.manifest["steps"]:
                if s["status"] == "running":
                    s["status"] = status
            rec.finish(status, error)
            sweep_run_folder(self.folder)
        ev = make_event("run_finished", self.run_id, None, None, status=status, error=error,
                        manifest=str(self.folder / "manifest.json"))
        self._finished = True
        self.status, self.error = status, error
        out.append(ev)
        return out


def sweep_run_folder(folder: Path) -> list[Path]:
    """What a worker that died mid-write leaves in its run folder: partial files, temporary folders of the
    exporters (``edgetailor-*``) and the scratch folder. Returns what was removed."""
    from .atomic import remove_partials, remove_path

    folder = Path(folder)
    removed = remove_partials(folder)
    for p in [folder / "scratch", *folder.glob("artifacts/edgetailor-*")]:
        if p.exists():
            remove_path(p)
            removed.append(p)
    return removed


def start_job(job: JobSpec) -> JobHandle:
    return JobHandle(job).start()

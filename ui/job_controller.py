"""Owns the running jobs: starts them in worker processes, polls their events on a timer, and turns them
into Qt signals. Nothing here blocks the event loop: polling is non-blocking and each tick is short."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import psutil
from edgetailor.engine import JobSpec, start_job
from PySide6.QtCore import QObject, QTimer, Signal

from .run_state import RunState

MEMORY_SAMPLE_SECONDS = 0.5
WORKER_NICENESS = 5


class JobController(QObject):
    run_added = Signal(str)             # run id (a new live run)
    run_event = Signal(str, dict)       # run id, event
    run_finished = Signal(str, str, object)   # run id, status, error dict or None
    memory_sampled = Signal(str)        # run id: its worker's memory series grew

    def __init__(self, runs_root: str | Path, poll_ms: int = 50, parent=None):
        super().__init__(parent)
        self.runs_root = Path(runs_root)
        self.handles: dict = {}
        self.states: dict[str, RunState] = {}
        self._last_memory = 0.0
        self.timer = QTimer(self)
        self.timer.setInterval(poll_ms)
        self.timer.timeout.connect(self._tick)

    def start(self, recipe: dict, source: str, options: dict | None = None, allow_network: bool = False,
              trust_remote_code: bool = False) -> str:
        # Objects that exist now live as long as the app: keep them out of the garbage collector's full passes,
        # which otherwise stop the event loop for half a second once torch and transformers are imported.
        gc.freeze()
        handle = start_job(JobSpec(recipe=recipe, source=source, options=options or {}, runs_root=str(self.runs_root),
                                   allow_network=allow_network, trust_remote_code=trust_remote_code))
        self.handles[handle.run_id] = handle
        try:    # the window comes first: the worker yields the CPU to it when both want it
            psutil.Process(handle.pid).nice(WORKER_NICENESS)
        except (psutil.Error, OSError):
            pass
        state = RunState(handle.run_id, handle.folder)
        state.recipe_name, state.source, state.t0_wall = recipe.get("name", ""), source, time.time()
        self.states[handle.run_id] = state
        self.timer.start()
        self.run_added.emit(handle.run_id)
        return handle.run_id

    def cancel(self, run_id: str) -> None:
        if run_id in self.handles:
            self.handles[run_id].cancel()

    def is_live(self, run_id: str) -> bool:
        return run_id in self.handles

    def worker_pid(self, run_id: str) -> int | None:
        h = self.handles.get(run_id)
        return h.pid if h else None

    def shutdown(self) -> None:
        """Cancel every live run (the app is closing); their workers end within the cancel grace period."""
        for h in list(self.handles.values()):
            h.cancel()

    def wait_finished(self, seconds: float) -> bool:
        """Block until every live run has finished (after ``shutdown``: recorded as cancelled), at most
        ``seconds``; True when none is left."""
        end = time.monotonic() + seconds
        while self.handles and time.monotonic() < end:
            self._tick()
            time.sleep(0.05)
        return not self.handles

    def _tick(self) -> None:
        now = time.time()
        sample_memory = now - self._last_memory >= MEMORY_SAMPLE_SECONDS
        if sample_memory:
            self._last_memory = now
        for run_id, handle in list(self.handles.items()):
            state = self.states[run_id]
            if sample_memory and handle.pid:
                try:
                    state.add_worker_memory(now, psutil.Process(handle.pid).memory_info().rss)
                    self.memory_sampled.emit(run_id)
                except psutil.Error:
                    pass
            for ev in handle.poll(0):
                state.apply(ev)
                self.run_event.emit(run_id, ev)
                if ev["type"] == "run_finished":
                    del self.handles[run_id]
                    self.run_finished.emit(run_id, ev["data"]["status"], ev["data"].get("error"))
                    break
        if not self.handles:
            self.timer.stop()

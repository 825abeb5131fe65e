"""What the app knows about one run, built from its events (live, or replayed from events.jsonl).

Plain Python (no Qt): the run queue, the live plots and the results table all read a ``RunState``.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path


class RunState:
    def __init__(self, run_id: str, folder: str | Path | None = None):
        self.run_id = run_id
        self.folder = Path(folder) if folder else None
        self.status = "running"
        self.recipe_name = ""
        self.source = ""
        self.t0_wall: float | None = None          # wall-clock time of the run's start
        self.step_index = 0
        self.step_count = 1
        self.step_name: str | None = None
        self.step_fraction = 0.0
        self.expected: list[float | None] = []      # seconds each step took here before (None: not known)
        self.prior: list[float | None] = []         # ... on the demo model when the presets were measured
        self.step_started_at: dict[int, float] = {}  # step index -> seconds since the run's start
        self.message = ""
        self.samples: dict[str, dict[str | None, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        self.worker_memory: list[tuple[float, float]] = []   # (seconds since start, RSS bytes), sampled by the app
        self.variants: dict[str, dict] = {}
        self.plan: dict = {"predicted": [], "measured": [], "budget": None}   # the planner's points (fit step)
        self.recommendation: dict | None = None
        self.log: list[str] = []
        self.error: dict | None = None
        self.finished_wall: float | None = None

    # --- events --------------------------------------------------------------------------------
    def apply(self, ev: dict) -> None:
        kind, data = ev["type"], ev.get("data", {})
        if ev.get("t") is not None and ev["t"] < 1e8 and (self.t0_wall is None or kind == "run_started"):
            t0 = ev["wall"] - ev["t"]
            if self.t0_wall is not None:   # memory sampled since the worker was spawned: re-base on the job's start
                shift = t0 - self.t0_wall
                self.worker_memory = [(t - shift, v) for t, v in self.worker_memory]
            self.t0_wall = t0
        if kind == "run_started":
            self.recipe_name = (data.get("recipe") or {}).get("name", "")
            self.source = data.get("source", "")
            if data.get("folder"):
                self.folder = Path(data["folder"])
        elif kind == "step_started":
            self.step_index, self.step_count = data["index"], max(1, data["count"])
            self.step_name, self.step_fraction = ev.get("step"), 0.0
            self.expected = list(data.get("expected_seconds") or [])
            self.prior = list(data.get("prior_seconds") or [])
            self.step_started_at[self.step_index] = self.seconds(ev)
        elif kind == "progress":
            self.step_fraction = float(data.get("fraction", 0.0))
            self.message = data.get("message", "")
        elif kind == "log":
            self.log.append(data.get("message", ""))
        elif kind == "sample":
            self.samples[data["series"]][data.get("variant")].append((self.seconds(ev), float(data["value"])))
        elif kind == "variant":
            v = self.variants.setdefault(data["name"], {"metrics": {}})
            metrics = {**v.get("metrics", {}), **(data.get("metrics") or {})}
            v.update(data)
            v["metrics"] = metrics
        elif kind == "metric":
            self.variants.setdefault(data["variant"], {"name": data["variant"], "metrics": {}})
            self.variants[data["variant"]]["metrics"][data["name"]] = data["value"]
        elif kind == "plan":
            if data.get("phase") == "predicted":
                self.plan["predicted"] = data.get("points", [])
                self.plan["budget"] = data.get("budget")
            else:      # a point measured again (a screened pick scored on every window) replaces its first figures
                names = {p.get("name") for p in data.get("points", [])}
                self.plan["measured"] = [p for p in self.plan["measured"] if p.get("name") not in names] \
                    + data.get("points", [])
        elif kind == "run_finished":
            self.status = data.get("status", "failed")
            self.error = data.get("error")
            self.finished_wall = ev.get("wall")
            if self.error and self.error.get("problem"):
                self.log.append(f"{self.status}: {self.error['problem']}")

    def seconds(self, ev: dict) -> float:
        if ev.get("t") is not None and ev["t"] < 1e8:
            return float(ev["t"])
        return (ev.get("wall") or time.time()) - (self.t0_wall or ev.get("wall") or time.time())

    def add_worker_memory(self, wall: float, rss_bytes: int) -> None:
        self.worker_memory.append((wall - (self.t0_wall or wall), float(rss_bytes)))

    # --- derived -------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status != "running"

    def weights(self, source: str = "here") -> list[float] | None:
        """Each step's share of the run, in seconds it took here before (``source="here"``) or, when none of
        them ran here, in its measured time on the demo model (``"any"``); steps never timed get the mean of
        the timed ones; None when no step was timed (then every step counts the same)."""
        found = self._filled(self.expected)
        return found if found or source == "here" else self._filled(self.prior)

    def _filled(self, seconds: list[float | None]) -> list[float] | None:
        known = [e for e in seconds[:self.step_count] if e]
        if not known or len(seconds) < self.step_count:
            return None
        mean = sum(known) / len(known)
        return [e if e else mean for e in seconds[:self.step_count]]

    @property
    def fraction(self) -> float:
        if self.status == "succeeded":
            return 1.0
        w = self.weights("any")
        if w is None:
            return min(1.0, (self.step_index + self.step_fraction) / self.step_count)
        done = sum(w[:self.step_index]) + w[self.step_index] * self.step_fraction
        return min(1.0, done / sum(w))

    def elapsed(self, now: float | None = None) -> float:
        if self.t0_wall is None:
            return 0.0
        end = self.finished_wall if self.finished and self.finished_wall else (now or time.time())
        return max(0.0, end - self.t0_wall)

    def time_left(self, now: float | None = None) -> float | None:
        """Seconds left: the steps' earlier times here, scaled by how this run's finished steps compare with
        theirs; without them, extrapolated from the progress so far (weighted by the demo's step times; None until
        there is enough to go on)."""
        if self.finished:
            return 0.0
        w = self.weights()
        if w is None:
            f = self.fraction
            return None if f < 0.02 else self.elapsed(now) * (1 - f) / f
        started = self.step_started_at.get(self.step_index)
        pace = 1.0
        if self.step_index > 0 and started:
            pace = started / max(sum(w[:self.step_index]), 1e-9)     # this run against the earlier ones
        left = w[self.step_index] * (1 - self.step_fraction) + sum(w[self.step_index + 1:])
        return left * min(max(pace, 0.25), 4.0)

    def variant_rows(self) -> list[dict]:
        return list(self.variants.values())

    # --- from disk -----------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, manifest: dict | None = None) -> RunState:
        """Rebuild a finished (or interrupted) run from its manifest and events.jsonl."""
        folder = Path(folder)
        if manifest is None:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        st = cls(manifest["id"], folder)
        events = folder / "events.jsonl"
        if events.exists():
            with open(events, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        st.apply(json.loads(line))
                    except (ValueError, KeyError):
                        continue     # a line cut short by a crash
        st.status = manifest.get("status", st.status)
        if st.status == "running":        # no process drives it any more: the app or machine stopped mid-run
            st.status = "interrupted"
        st.error = manifest.get("error") or st.error
        st.recipe_name = (manifest.get("recipe") or {}).get("name", st.recipe_name)
        st.source = (manifest.get("source") or {}).get("spec", st.source)
        for v in manifest.get("variants", []):      # the manifest is the record of truth for variants
            st.variants[v["name"]] = v
        st.recommendation = manifest.get("recommendation")
        return st

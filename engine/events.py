"""Events a run streams to whoever drives it (CLI progress bars, GUI plots, tests).

Events are plain dicts, so they cross process boundaries and land in ``events.jsonl`` as they are:

    {"type": "progress", "run": ID, "t": 12.3, "step": "export.gguf", "data": {"fraction": 0.5, ...}}

Types:
    run_started   data: recipe, source
    step_started  data: index, count, params, kind, expected_seconds (per step of the recipe: what it took on
                  this source before, or None), prior_seconds (what it took on the demo
                  model when the presets were measured, or None: only their ratios count)
    progress      data: fraction (0..1 within the step), message
    log           data: message, level
    sample        data: series (e.g. "rss_bytes", "tokens_done"), value, variant   (for live plots)
    metric        data: variant, name, value
    variant       data: the variant record (name, format, path, params, metrics)
    artifact      data: path, sha256, bytes
    plan          data: phase ("predicted" | "measured"), points (the planner's candidates), frontier, budget
    step_finished data: index, seconds
    run_finished  data: status ("succeeded" | "failed" | "cancelled"), error, manifest path
"""
from __future__ import annotations

import time

EVENT_TYPES = ("run_started", "step_started", "progress", "log", "sample", "metric", "variant", "artifact", "plan",
               "step_finished", "run_finished")


def make_event(type_: str, run_id: str, step: str | None = None, t0: float | None = None, **data) -> dict:
    assert type_ in EVENT_TYPES, type_
    now = time.time()
    return {"type": type_, "run": run_id, "t": round(now - t0, 4) if t0 else now, "wall": now,
            "step": step, "data": data}

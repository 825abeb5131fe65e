"""A transform step's report of what it changed, kept in the run's manifest beside the step's entry."""
from __future__ import annotations


def record_step_report(ctx, report: dict) -> None:
    """Attach ``report`` to the running step's manifest entry (run_job appends the entry before the step runs)."""
    steps = ctx.record.manifest.get("steps") or []
    if steps and steps[-1].get("name") == ctx.step_name:
        steps[-1]["report"] = report
        ctx.record.save()

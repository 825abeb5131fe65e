"""EdgeTailor's engine: no Qt, usable from the CLI, the GUI's worker process and tests.

The public API, in the order a job uses it:

    from edgetailor.engine import resolve, preflight, Recipe, load_preset, JobSpec, run_job, start_job

    src = resolve("demo")                      # or an HF folder, a .gguf file, a hub id (with allow_network)
    report = preflight(src, recipe)            # architecture support, RAM and disk against the machine
    record = run_job(JobSpec(recipe=recipe.to_dict(), source="demo"))   # in-process
    handle = start_job(JobSpec(...))           # in a worker process: handle.events(), handle.cancel()
"""
from .context import JobOptions, RunContext
from .errors import DoesNotFitError, EdgeTailorError, RunCancelled
from .evaluate import EvalResult, evaluate, make_windows
from .job import JobSpec, run_job
from .preflight import PreflightReport, preflight
from .recipe import Recipe, StepSpec, list_presets, load_preset
from .registry import all_steps, get_step, register_step
from .runs import RunRecord, Variant, find_run, list_runs
from .sources import ResolvedSource, resolve
from .worker import JobHandle, start_job

__all__ = [
    "JobOptions", "RunContext", "DoesNotFitError", "EdgeTailorError", "RunCancelled", "EvalResult", "evaluate",
    "make_windows", "JobSpec", "run_job", "PreflightReport", "preflight", "Recipe", "StepSpec", "list_presets",
    "load_preset", "all_steps", "get_step", "register_step", "RunRecord", "Variant", "find_run", "list_runs",
    "ResolvedSource", "resolve", "JobHandle", "start_job",
]

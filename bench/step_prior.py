"""What each step of the GUI's presets takes on the demo model, from a fresh data folder: the first run's wall
time by step, and the prior that weights a first run's progress on a machine with no runs yet
(``assets/step_seconds.json``, read by ``engine.runs.prior_step_seconds``; only the ratios are used there).

    .venv/bin/python bench/step_prior.py      # writes assets/step_seconds.json, bench/results/step_prior.{json,md}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
PRESETS = ("balanced", "best-quality", "smallest")       # the GUI's presets that run steps one after another


def run_preset(home: Path, preset: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgetailor.cli", "--home", str(home), "compress", "demo",
                          "--preset", preset, "--json", "--quiet"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout[out.stdout.index("{"):])


def report(result: dict) -> str:
    m = result["machine"]
    lines = ["# What the presets' steps take on the demo model (a fresh data folder)", "",
             f"`python bench/step_prior.py` on {m['cpu']}, {m['logical_cores']} cores, {m['ram_gb']} GB, "
             f"{m['platform']}; load average at start {m['load_average_at_start'][0]:.2f}. One run of each preset, "
             "in this order (the first converts the demo model once: its resolve time).", "",
             "| preset | resolve | " + " | ".join(f"step {i + 1}" for i in range(3)) + " | total |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        steps = " | ".join(f"{s['name']} {s['seconds']:.0f} s" for s in run["steps"])
        lines.append(f"| {run['preset']} | {run['resolve_seconds']:.0f} s | {steps} | {run['total_seconds']:.0f} s |")
    lines += ["", "`assets/step_seconds.json` keeps the steps' seconds: a first run on a machine with no runs weights",
              "its progress bar by their ratios (later runs by what the same steps took there).", ""]
    return "\n".join(lines)


def main() -> None:
    from edgetailor.engine.atomic import write_json
    from machine import machine, write_results

    result = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="edgetailor-prior-") as home:
        for preset in PRESETS:
            manifest = run_preset(Path(home), preset)
            result["runs"].append({"preset": preset, "resolve_seconds": manifest["timings"]["resolve_seconds"],
                                   "total_seconds": manifest["timings"]["total_seconds"],
                                   "steps": [{k: s[k] for k in ("name", "params", "seconds")}
                                             for s in manifest["steps"]]})
    prior = {"measured_by": "bench/step_prior.py", "model": "demo", "machine": result["machine"]["cpu"],
             "steps": [s for run in result["runs"] for s in run["steps"]]}
    write_json(REPO / "assets" / "step_seconds.json", prior)
    out = REPO / "bench" / "results"
    write_results(out / "step_prior", result, report(result))
    print(report(result))


if __name__ == "__main__":
    main()

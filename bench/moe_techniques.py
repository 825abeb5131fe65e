"""Techniques on a mixture of experts at real size: Qwen3-30B-A3B's blocks (8 of its 48, 5.0B parameters in bf16,
random weights; ``bench/streaming_export.py --shapes moe``) read lazily, one block at a time.

Each recipe runs as a user runs it, ``edgetailor compress MODEL --recipe R`` in its own process (a fresh home, so
nothing is reused), and ends with a Q4_K_M file checked against the model it was written from. Per step: wall
time, the worker's peak RSS and the part of it not file-backed (recorded in the run's manifest) against
pre-flight's figure, which counts what must stay resident.

  awq    ``imatrix`` (X^T X of the attention inputs; per-expert second moments), ``awq.scale`` (the experts' shared
         input with the router's columns, each expert's down projection with its up rows), export Q4_K_M
  width  ``prune.width`` (each expert keeps 3/4 of its MLP channels, its own strongest), export Q4_K_M

Random weights: the figures are memory, time and exactness (the file against its model), not quality.

Usage: python bench/moe_techniques.py [--recipes awq,width] [--out bench/results/moe_techniques]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results  # noqa: E402
from streaming_export import SHAPES, make_shaped_model  # noqa: E402

CALIBRATION = {"max_sequences": 8, "seq_len": 256}
EXPORT = {"step": "export", "params": {"types": ["Q4_K_M"]}}
RECIPES = {
    "awq": [{"step": "imatrix", "params": {"hessians": True, **CALIBRATION}}, {"step": "awq.scale", "params": {}}, EXPORT],
    "width": [{"step": "prune.width", "params": {"mlp_keep": 0.75, "calibration_sequences": 8, "seq_len": 256}}, EXPORT],
}
MB = 2 ** 20


def run(name: str, model: Path, work: Path) -> dict:
    """One recipe through the CLI in a fresh home; its steps' figures from the run's manifest."""
    recipe = work / f"{name}.json"
    recipe.write_text(json.dumps({"name": f"moe-{name}", "steps": RECIPES[name]}))
    home = work / name
    env = {**os.environ, "EDGETAILOR_HOME": str(home)}
    t0 = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv" / "bin" / "edgetailor"), "compress", str(model), "--recipe", str(recipe)],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    manifest = json.loads(next((home / "runs").glob("*/manifest.json")).read_text())
    if manifest["status"] != "succeeded":
        raise SystemExit(f"{name}: {manifest.get('error')}\n{out.stderr[-2000:]}")
    steps = [{"step": s["name"], "seconds": round(s["seconds"], 1),
              "peak_rss_mb": round(s["ram_peak_bytes"] / MB), "peak_anon_mb": round(s["ram_peak_anon_bytes"] / MB),
              "preflight_mb": round(s["ram_preflight_bytes"] / MB), "report": s.get("report", {})}
             for s in manifest["steps"]]
    variant = manifest["variants"][-1]
    return {"recipe": RECIPES[name], "wall_seconds": round(wall, 1), "steps": steps, "file": variant["name"],
            "verify_kl": variant["metrics"].get("verify_kl"),
            "verify_top1": variant["metrics"].get("verify_top1")}


def markdown(r: dict) -> str:
    m = r["machine"]
    md = ["# Techniques on a mixture of experts at real size (Qwen3-30B-A3B's blocks, 8 of 48)", "",
          f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gb']} GB; threads 2. Random bf16 weights "
          f"({r['parameters'] / 1e9:.2f}B parameters), read lazily one block at a time; each recipe `edgetailor "
          "compress` in a fresh home.", "",
          "| recipe | step | s | peak RSS MB | of it not file-backed | pre-flight MB | vs not file-backed |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for name, run_ in r["runs"].items():
        for s in run_["steps"]:
            err = 100 * (s["preflight_mb"] / s["peak_anon_mb"] - 1)
            md.append(f"| {name} | {s['step']} | {s['seconds']} | {s['peak_rss_mb']} | {s['peak_anon_mb']} | "
                      f"{s['preflight_mb']} | {err:+.0f}% |")
    md.append("")
    for name, run_ in r["runs"].items():
        md.append(f"- {name}: {run_['file']}, checked against the model it came from: KL "
                  f"{run_['verify_kl']}, top-1 {run_['verify_top1']}; whole command {run_['wall_seconds']} s.")
        for s in run_["steps"]:
            rep = s["report"]
            if s["step"] == "awq.scale":
                md.append(f"  awq.scale: {rep.get('groups_scaled')}/{rep.get('groups')} groups scaled, stand-in 4-bit "
                          f"output error {rep.get('stand_in_output_error_before'):.4g} -> "
                          f"{rep.get('stand_in_output_error_after'):.4g}")
            if s["step"] == "prune.width":
                md.append(f"  prune.width: expert width {rep.get('moe_intermediate_size')}, non-embedding parameters "
                          f"{rep.get('non_embedding_before'):,} -> {rep.get('non_embedding_after'):,}")
    md += ["", "Not file-backed: RSS less the pages of memory-mapped files (the safetensors read lazily, the 16-bit "
           "reference GGUF llama.cpp maps to check a file), which the system takes back under pressure; pre-flight "
           "counts what must stay resident.", "", f"Reproduce: `.venv/bin/python bench/moe_techniques.py{r['args']}`", ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgetailor-bench" / "shaped"))
    ap.add_argument("--out", default=str(HERE / "results" / "moe_techniques"))
    args = ap.parse_args()
    from edgetailor.engine import resolve
    from edgetailor.engine.preflight import safetensors_parameter_count

    model = make_shaped_model(Path(args.cache) / "qwen3_moe-moe-shaped", SHAPES["moe"], resolve("demo").path)
    names = [n for n in args.recipes.split(",") if n]
    results = {"machine": machine(), "parameters": safetensors_parameter_count(model)[0], "runs": {},
               "args": "" if args.recipes == ",".join(RECIPES) else f" --recipes {args.recipes}"}
    with tempfile.TemporaryDirectory(prefix="edgetailor-moe-", dir=args.cache) as tmp:
        for name in names:
            print(name, file=sys.stderr)
            results["runs"][name] = run(name, model, Path(tmp))
    write_results(args.out, results, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

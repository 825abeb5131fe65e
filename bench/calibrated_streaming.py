"""Calibrated Q4_K_M of a 1B-shaped model from its bf16 safetensors: EdgeTailor's block walk against llama.cpp's
imatrix pipeline, side by side in one run.

  ours       edgetailor compress MODEL --recipe (quant.gguf_calibrated Q4_K_M, mix llama.cpp and mix measured):
             the source read lazily, one decoder block materialised at a time (engine.walker), GPTQ blocks
  llama.cpp  convert_hf_to_gguf.py --outtype f16, llama-imatrix on the same calibration text and chunks,
             llama-quantize --imatrix Q4_K_M (tools built from the same llama-cpp-python source)

Both sides see the same calibration text and the same number of 512-token chunks. The model is random at
Llama-3.2-1B's shape (bench/streaming_export.py makes and caches it): memory and time, not quality. Peak RSS
and wall time come from GNU time for each whole command; pre-flight's RAM prediction for the recipe is read
from ``edgetailor inspect --json`` on the same model and recipe, beside the measured peak.

Usage: python bench/calibrated_streaming.py [--chunks 8] [--threads 2]
Writes bench/results/calibrated_streaming.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import reference_tools as rt  # noqa: E402
from machine import machine, write_results  # noqa: E402
from streaming_export import SHAPES, make_shaped_model, preflight_rows, step_memory, timed  # noqa: E402


def recipe(work: Path, mix: str, chunks: int) -> Path:
    path = work / f"recipe-{mix}.json"
    path.write_text(json.dumps({"name": f"calibrated-{mix}", "steps": [
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "mix": mix, "max_sequences": chunks,
                                                     "verify": False}}]}))
    return path


def predicted_ram_mb(cli: str, home: Path, folder: Path, recipe_path: Path) -> float | None:
    proc = subprocess.run([cli, "--home", str(home), "inspect", str(folder), "--recipe", str(recipe_path), "--json"],
                          capture_output=True, text=True)
    try:
        return round(json.loads(proc.stdout)["ram_needed_bytes"] / 2**20, 1)
    except (ValueError, KeyError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgetailor-bench" / "shaped"))
    ap.add_argument("--out", default=str(HERE / "results" / "calibrated_streaming"))
    args = ap.parse_args()
    from edgetailor.engine import resolve
    from edgetailor.engine.text import default_calibration_path
    from edgetailor.exporters.hf_converter import SCRIPT, converter_dir

    folder = make_shaped_model(Path(args.cache) / f"llama-{args.shape}-shaped", SHAPES[args.shape],
                               resolve("demo").path)
    calib = default_calibration_path()
    cli = str(Path(sys.executable).with_name("edgetailor"))
    rows, predicted = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgetailor-calstream-", dir=Path(args.cache)) as tmp:
        work = Path(tmp)
        home = work / "home"
        for mix in ("llama.cpp", "measured"):
            r = recipe(work, mix, args.chunks)
            predicted[mix] = predicted_ram_mb(cli, home, folder, r)
            print(f"ours, mix {mix}", file=sys.stderr)
            rows[f"EdgeTailor ({mix} mix)"] = timed([cli, "--home", str(home), "compress", str(folder), "--recipe",
                                                     str(r), "--quiet", "--threads", str(args.threads)], source=folder)
            rows[f"EdgeTailor ({mix} mix)"]["steps"] = step_memory(home)
        f16 = work / "f16.gguf"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
        print("llama.cpp", file=sys.stderr)
        conv = timed([sys.executable, str(converter_dir() / SCRIPT), str(folder), "--outfile", str(f16),
                      "--outtype", "f16"], env, source=folder)
        tools = rt.ensure_tools()
        imat = work / "imatrix.gguf"
        imatrix = timed([str(tools["imatrix"]), "-m", str(f16), "-f", str(calib), "-o", str(imat), "-c", "512",
                         "--chunks", str(args.chunks), "-t", str(args.threads), "--no-ppl"])
        quant = timed([str(tools["quantize"]), "--imatrix", str(imat), str(f16), str(work / "q4.gguf"), "Q4_K_M",
                       str(args.threads)])
        rows["llama.cpp convert + imatrix + quantize"] = {
            "seconds": round(conv["seconds"] + imatrix["seconds"] + quant["seconds"], 2),
            "peak_rss_mb": max(conv["peak_rss_mb"], imatrix["peak_rss_mb"], quant["peak_rss_mb"]),
            "convert": conv, "imatrix": imatrix, "quantize": quant}
    ref = rows["llama.cpp convert + imatrix + quantize"]
    results = {"machine": machine(), "threads": args.threads, "shape": args.shape, "chunks": args.chunks,
               "rows": rows, "predicted_ram_mb": predicted,
               "ratios": {k: {"seconds": round(v["seconds"] / ref["seconds"], 3),
                              "peak_rss": round(v["peak_rss_mb"] / ref["peak_rss_mb"], 3)}
                          for k, v in rows.items() if k.startswith("EdgeTailor")}}
    out = Path(args.out)
    m = results["machine"]
    md = [f"# Calibrated Q4_K_M of a {args.shape}-shaped model: EdgeTailor's block walk vs llama.cpp's imatrix pipeline",
          "", f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gb']} GB; threads {args.threads}. "
          f"Random bf16 weights at Llama-3.2-{args.shape.upper()}'s shape, the demo's 49152-token vocabulary. "
          f"Calibration: the bundled calibration text, {args.chunks} chunks of 512 tokens on both sides.", "",
          "| pipeline | wall s | peak RSS MB | pre-flight RAM MB | time ratio | RSS ratio |", "|---|---:|---:|---:|---:|---:|"]
    for k, v in rows.items():
        mix = "measured" if "measured" in k else "llama.cpp"
        ratio = results["ratios"].get(k, {})
        md.append(f"| {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} | "
                  f"{predicted.get(mix) if k.startswith('EdgeTailor') else '-'} | "
                  f"{ratio.get('seconds', '-')} | {ratio.get('peak_rss', '-')} |")
    md += ["", f"llama.cpp's parts: convert {ref['convert']['seconds']:.1f} s / {ref['convert']['peak_rss_mb']:.0f} MB, "
           f"imatrix {ref['imatrix']['seconds']:.1f} s / {ref['imatrix']['peak_rss_mb']:.0f} MB, "
           f"quantize {ref['quantize']['seconds']:.1f} s / {ref['quantize']['peak_rss_mb']:.0f} MB.", "",
           "Every command starts with the source's files in the page cache (read once before it). Load average at "
           f"start {m['load_average_at_start'][0]:.2f}.", "",
           "Pre-flight against the measured peak of the step in the run's worker (VmHWM from the step's start, "
           "recorded in the run's manifest):", "",
           "| pipeline | step | pre-flight MB | measured peak MB | error | of it not file-backed | "
           "pre-flight's held figure against it |", "|---|---|---:|---:|---:|---:|---:|",
           *preflight_rows({k: v for k, v in rows.items() if k.startswith("EdgeTailor")}), "",
           "Targets (issue 14): peak RSS <= 2.5 GB; wall time <= 3x llama.cpp's imatrix pipeline; pre-flight within "
           "15% of the measured peak.",
           f"Reproduce: `.venv/bin/python bench/calibrated_streaming.py --chunks {args.chunks}`", ""]
    write_results(out, results, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

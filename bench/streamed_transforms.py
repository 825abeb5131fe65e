"""A transform on a 1B-shaped model, streamed block by block against the same steps on the model held in fp32,
side by side in one run.

Recipes: ``prune.wanda`` (2:4, calibration text), ``cluster.kmeans`` (16 values per tensor, activation-weighted) or
``lowrank`` (activation-aware SVD keeping 70% of the linear parameters, multiplied back), then ``export`` Q4_K_M (checked against the transformed model); or ``onnx``, ``onnx-int4``, ``onnx-hqq``, ``onnx-gptq``: the
untouched source exported to ONNX fp16, int4 RTN, int4 HQQ (onnxruntime's solver) or int4 GPTQ (EdgeTailor's graph, one decoder layer at a time,
int4 quantized as each weight is written; checked against the source). The
streamed run is what a run does now: the source read lazily, one decoder block in memory, the pruned blocks
written to the run's scratch, the export read from there. The loaded run holds the model in fp32 first (what
every transform did before, and still does after a step that loads the model). Each runs in its own process;
a sampler records the process's peak RSS per step, beside pre-flight's prediction for the step. Both must
write the same Q4_K_M file, byte for byte. Random weights at Llama-3.2-1B's shape (made and cached by
``bench/streaming_export.py``): memory, time and exactness, not quality.

Usage: python bench/streamed_transforms.py [--recipe wanda|kmeans|lowrank|onnx|onnx-int4|onnx-hqq|onnx-gptq] [--shape 1b] [--threads 2]
Writes bench/results/streamed_transforms.{json,md} (else streamed_transforms_RECIPE.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results
from streaming_export import SHAPES, make_shaped_model

RECIPES = {
    "wanda": [("prune.wanda", {"pattern": "2:4", "calibration_sequences": 8, "seq_len": 256}),
              ("export", {"types": ["Q4_K_M"]})],
    "kmeans": [("cluster.kmeans", {"clusters": 16, "activation_weighted": True, "calibration_sequences": 8,
                                   "calibration_length": 256}),
               ("export", {"types": ["Q4_K_M"]})],
    "lowrank": [("lowrank.svd", {"keep": 0.7, "factored": False, "calibration_sequences": 8,
                                 "calibration_length": 256}),
                ("export", {"types": ["Q4_K_M"]})],
    "onnx": [("export", {"format": "onnx", "types": ["fp16"]})],
    "onnx-int4": [("export", {"format": "onnx", "types": ["int4"]})],
    "onnx-hqq": [("export", {"format": "onnx", "types": ["int4"], "options": {"method": "hqq"}})],
    "onnx-gptq": [("export", {"format": "onnx", "types": ["int4"],
                              "options": {"method": "gptq", "calibration_windows": 8, "calibration_ctx": 256}})],
}
MB = 2**20


class PeakSampler:
    """This process's RSS sampled every 20 ms, whole and without file-backed pages (memory-mapped model files,
    which the system can evict); ``take()`` gives both peaks since the last call."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.peak_anon = psutil.Process(), 0, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _sample(self):
        m = self.proc.memory_info()
        self.peak, self.peak_anon = max(self.peak, m.rss), max(self.peak_anon, m.rss - m.shared)

    def _run(self):
        while True:
            self._sample()
            time.sleep(0.02)

    def take(self) -> tuple[int, int]:
        self._sample()
        peaks, self.peak, self.peak_anon = (self.peak, self.peak_anon), 0, 0
        return peaks


def child(mode: str, folder: Path, work: Path, threads: int, steps: list) -> dict:
    """Run ``steps`` on the model in this process (``loaded``: held in fp32 first); per step seconds and peak RSS."""
    import hashlib

    from edgetailor.engine.context import JobOptions, RunContext
    from edgetailor.engine.registry import get_step
    from edgetailor.engine.runs import RunRecord
    from edgetailor.engine.sources import resolve

    sampler = PeakSampler()
    record = RunRecord.create(work / mode, {"name": mode, "steps": []}, str(folder), {})
    ctx = RunContext(record, resolve(str(folder)), JobOptions(threads=threads), emit=lambda e: None)
    rows = []
    if mode == "loaded":
        t0 = time.perf_counter()
        _ = ctx.loaded                           # held in fp32 before the steps
        rows.append({"step": "load (fp32)", "seconds": round(time.perf_counter() - t0, 1)})
    for name, params in steps:
        info = get_step(name)
        ctx.step_name = name
        record.manifest["steps"].append({"name": name, "params": params})
        t0 = time.perf_counter()
        info.run(ctx, info.parse(params))
        rss, anon = sampler.take()
        rows.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(rss / MB),
                     "peak_anon_mb": round(anon / MB)})
    if mode == "loaded":
        rows[0].update(peak_rss_mb=rows[1]["peak_rss_mb"], peak_anon_mb=rows[1]["peak_anon_mb"])
    variant = record.manifest["variants"][-1]
    path = record.folder / variant["path"]
    weights = path / "model.onnx.data" if path.is_dir() else path      # an ONNX folder: its weights file
    return {"mode": mode, "steps": rows, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "file": f"{variant['format']} {variant['params'].get('type')}",
            "verify_kl": variant["metrics"].get("verify_kl"), "size_mb": round(weights.stat().st_size / MB, 1)}


def predicted(folder: Path, steps: list) -> list[dict]:
    from edgetailor.engine.preflight import preflight
    from edgetailor.engine.recipe import Recipe
    from edgetailor.engine.sources import resolve

    recipe = Recipe.from_dict({"name": "x", "steps": [{"step": n, "params": p} for n, p in steps]})
    return [{"step": s["step"], "ram_mb": round(s["ram_bytes"] / MB), "how": s["how"]}
            for s in preflight(resolve(str(folder)), recipe).steps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="wanda")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgetailor-bench" / "shaped"))
    ap.add_argument("--out", help="results file stem (default: bench/results/streamed_transforms[_RECIPE])")
    ap.add_argument("--preflight-only", action="store_true",
                    help="recompute pre-flight's column for the committed results (no runs) and rewrite the .md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), Path(args.work), args.threads, RECIPES[args.recipe])))
        return 0
    from edgetailor.engine import resolve

    stem = Path(args.out or HERE / "results" / ("streamed_transforms" + ("" if args.recipe == "wanda" else
                                                                          f"_{args.recipe}")))
    if args.preflight_only:
        return refresh_preflight(stem, Path(args.cache) / f"llama-{args.shape}-shaped")
    folder = make_shaped_model(Path(args.cache) / f"llama-{args.shape}-shaped", SHAPES[args.shape],
                               resolve("demo").path)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="edgetailor-streamtf-", dir=Path(args.cache)) as tmp:
        for mode in ("streamed", "loaded"):
            print(mode, file=sys.stderr)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder), "--work", tmp,
                                  "--threads", str(args.threads), "--recipe", args.recipe], capture_output=True,
                                 text=True, check=True)
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    steps = RECIPES[args.recipe]
    pre = predicted(folder, steps)
    results = {"machine": machine(), "shape": args.shape, "threads": args.threads, "recipe": steps,
               "recipe_name": args.recipe, "runs": runs,
               "preflight": pre, "same_file": runs["streamed"]["sha256"] == runs["loaded"]["sha256"]}
    write_results(stem, results, markdown(results))
    print(markdown(results))
    return 0


def refresh_preflight(out: Path, folder: Path) -> int:
    """Pre-flight's prediction for the committed runs, recomputed with the current code (the runs unchanged)."""
    results = json.loads(out.with_suffix(".json").read_text())
    before = {p["step"]: p["ram_mb"] for p in results["preflight"]}
    results["preflight"] = predicted(folder, [tuple(s) for s in results["recipe"]])
    results["preflight_recomputed"] = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "before": before}
    write_results(out, results, markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    m, s, ld = r["machine"], r["runs"]["streamed"], r["runs"]["loaded"]
    pre = {p["step"]: p for p in r["preflight"]}
    what = "An ONNX export streamed layer by layer" if r.get("recipe_name", "").startswith("onnx") else \
        "A transform streamed block by block"
    md = [f"# {what} vs held in fp32 ({r['shape']}-shaped model)", "",
          f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gb']} GB; threads {r['threads']}. "
          f"Random bf16 weights at Llama-3.2-{r['shape'].upper()}'s shape. Recipe: "
          + " → ".join(f"`{n}` {json.dumps(p)}" for n, p in r["recipe"]) + ".", "",
          "| step | streamed s | peak RSS MB | of it not file-backed | pre-flight MB | vs not file-backed | "
          "held in fp32 s | peak RSS MB | of it not file-backed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    held = {row["step"]: row for row in ld["steps"]}
    for row in s["steps"]:
        p = pre.get(row["step"], {})
        err = f"{100 * (p['ram_mb'] / row['peak_anon_mb'] - 1):+.0f}%" if p else "-"
        h = held.get(row["step"], {})
        md.append(f"| {row['step']} | {row['seconds']} | {row['peak_rss_mb']} | {row['peak_anon_mb']} | "
                  f"{p.get('ram_mb', '-')} | {err} | {h.get('seconds', '-')} | {h.get('peak_rss_mb', '-')} | "
                  f"{h.get('peak_anon_mb', '-')} |")
    md += ["", "Not file-backed: RSS less the pages of memory-mapped files (the safetensors read lazily, the 16-bit "
           "reference GGUF llama.cpp maps to check the file), which the system evicts under pressure; pre-flight "
           "counts what must stay resident.",
           f"Loading the model in fp32 first (held run only): {held['load (fp32)']['seconds']} s.",
           f"Whole runs: streamed {s['wall_seconds']} s, held {ld['wall_seconds']} s (process start included).",
           f"Same {s.get('file', 'gguf Q4_K_M')} weights from both: **{r['same_file']}** (sha256 {s['sha256'][:16]}…, "
           f"{s['size_mb']} MB); checked against the model it came from: KL {s['verify_kl']}.", "",
           f"Reproduce: `.venv/bin/python bench/streamed_transforms.py --recipe {r.get('recipe_name', 'wanda')}`", ""]
    if r.get("preflight_recomputed"):
        was = ", ".join(f"{k} {v} MB" for k, v in r["preflight_recomputed"]["before"].items())
        md += [(f"Pre-flight's column recomputed on {r['preflight_recomputed']['at']} with the current code "
                f"(`--preflight-only`; the runs are unchanged); at the run it said: {was}."), ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())

"""The planner (``edgetailor fit``) against llama.cpp's ladder under the same device budgets, in one run.

For each model and budget:

* EdgeTailor: the ``fit`` step (sensitivity pass, optuna search over file size and KV-cache type on predictions,
  the best candidates built with calibrated GPTQ blocks, evaluated and benchmarked at the app's context, the
  recommendation from the measured ones);
* llama.cpp: convert to F16, ``llama-imatrix`` on the same calibration text, ``llama-quantize --imatrix`` for
  every ladder type (Q8_0 ... Q2_K), each file evaluated with the same evaluator and windows and benchmarked
  at the same context with an f16 KV cache; the best-quality type that meets the budget (memory measured here,
  decode projected to the device from the speed measured here, as the planner does) is the reference answer;
* for an app that ships onnxruntime (``formats: [onnx]``): onnxruntime-genai's model builder's int4 folder
  (RTN, block 32, accuracy level 4, as its CPU recipe writes it), measured the same way (memory at the app's
  context = its peak + onnxruntime's cache grown to that context); the budget's memory limit is that folder's.

Reported per budget: both answers' memory, perplexity increase, KL (mean and 99.9th percentile); for every
built candidate predicted vs measured memory and decode speed; whether any recommendation fails a limit
when measured; the planner's wall time against one calibrated Q4_K_M export of the same model.

    flock /tmp/edgetailor-heavy.lock .venv/bin/python bench/planner.py

Writes bench/results/planner.md and .json.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
CONTEXT = 2048
#: budgets chosen so the ladder's answer is not obvious: a memory limit between two ladder types at 2k context,
#: a speed floor on a slow board, a quality limit with a memory limit
BUDGETS = [
    {"name": "pixel-8, memory between Q4_K_M and Q5_K_M", "device": "pixel-8", "memory_between": ("Q4_K_M", "Q5_K_M")},
    {"name": "raspberry-pi-4, speed floor", "device": "raspberry-pi-4-4gb", "speed_between": ("Q4_K_M", "Q6_K"),
     "max_ppl_increase_pct": 15},
    {"name": "orange-pi-5, memory + quality limit", "device": "orange-pi-5-8gb", "memory_between": ("Q3_K_M", "Q4_K_M"),
     "max_ppl_increase_pct": 10},
    {"name": "pixel-8, an onnxruntime app at the builder's int4 memory", "device": "pixel-8", "formats": ["onnx"],
     "memory_of_builder": True},
]
#: ``--width-budget``: below what every ladder type needs at 2k context with an f16 cache, with a 33% narrower model
#: (healed 3 minutes) in the search beside the full model's files and quantized caches
WIDTH_BUDGET = {"name": "pixel-8, 172 MB at 2k context, a 33% narrower model searched", "device": "pixel-8",
                "max_memory_mb": 172.0, "width_ratios": [0.33], "heal_minutes": 3.0, "formats": ["gguf"]}


def ladder(model_dir: Path, calib: Path, work: Path, cmp, prompt: list[int], threads: int) -> dict:
    """llama.cpp's ladder with an importance matrix: each type's file, size, quality and measured footprint."""
    import reference_tools as rt
    from edgetailor.engine.benchmark import benchmark_variant
    f16 = work / "f16.gguf"
    t_convert = rt.run_convert(model_dir, f16, "f16", log_path=work / "convert.log")
    imat = work / "imatrix.gguf"
    t_imatrix = rt.run_imatrix(f16, calib, imat, ctx=512, chunks=100, threads=threads, extra_args=["--no-ppl"],
                               log_path=work / "imatrix.log")
    out = {"convert_s": t_convert, "imatrix_s": t_imatrix, "types": {}}
    for t in LADDER:
        path = work / f"llama-imatrix-{t}.gguf"
        secs = rt.run_quantize(f16, path, t, imatrix=imat, threads=threads)
        res = cmp.score("gguf", path)
        bench = benchmark_variant("gguf", path, prompt, gen_tokens=32, repeats=2, threads=threads,
                                  n_ctx=CONTEXT)
        out["types"][t] = {"path": str(path), "size_bytes": path.stat().st_size, "quantize_s": secs,
                           "perplexity": res.perplexity, "kl": res.kl, "kl_p999": res.kl_p999, "top1": res.top1,
                           "memory_bytes": bench["peak_rss_os_bytes"], "decode_tps_here": bench["decode_tps"]}
        print(f"  llama.cpp {t}: {path.stat().st_size / 1e6:.1f} MB, KL {res.kl:.5f}, "
              f"peak {bench['peak_rss_os_bytes'] / 1e6:.0f} MB", flush=True)
    return out



def builder_int4(model_dir: Path, work: Path, cmp, prompt: list[int], threads: int) -> dict:
    """onnxruntime-genai's model builder's int4 folder (its CPU recipe: RTN, block 32, accuracy level 4), scored
    and benchmarked as the planner's ONNX candidates are."""
    from edgetailor.engine.benchmark import benchmark_variant
    from edgetailor.engine.projection import kv_cache_bytes, onnx_info
    from edgetailor.exporters.onnx import export_with_builder, parse_options

    out = work / "builder-int4"
    t0 = time.perf_counter()
    if not (out / "model.onnx").exists():
        export_with_builder(None, model_dir, out, parse_options({"type": "int4", "block_size": 32}), model_dir,
                            lambda f, m: None, None)
    seconds = time.perf_counter() - t0
    res = cmp.score("onnx", out)
    bench = benchmark_variant("onnx", out, prompt, gen_tokens=32, repeats=2, threads=threads, n_ctx=CONTEXT)
    growth = kv_cache_bytes(onnx_info(out), CONTEXT - len(prompt) - 32, 4)
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    print(f"  builder int4: {size / 1e6:.1f} MB, KL {res.kl:.5f}, memory {(bench['peak_rss_os_bytes'] + growth) / 1e6:.0f} MB",
          flush=True)
    return {"path": str(out), "size_bytes": size, "seconds": seconds, "perplexity": res.perplexity, "kl": res.kl,
            "kl_p999": res.kl_p999, "top1": res.top1, "memory_bytes": bench["peak_rss_os_bytes"] + growth,
            "kv_growth_bytes": growth, "decode_tps_here": bench["decode_tps"]}


def baseline(model_dir: Path, work: Path, windows: list, threads: int):
    """The source in torch on the windows, its log-probs kept in work/reference as the ladder's KL reference."""
    from edgetailor.engine.evaluate import Comparison
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve

    return Comparison(load_model(resolve(str(model_dir))).model, windows, threads=threads, folder=work / "reference")


def device_tps(device, here_tps: float, path) -> float:
    """The ladder file's decode on the device as the planner projects it (``projection.device_speed``)."""
    from edgetailor.engine.devices import host_profile
    from edgetailor.engine.projection import device_speed, variant_info

    onnx = Path(path).is_dir()
    return device_speed(here_tps, variant_info("onnx" if onnx else "gguf", path, tokens_used=96), device, host_profile(),
                        96, 4 if onnx else 2)[0]


def make_budget(spec: dict, lad: dict, builder: dict | None = None) -> dict:
    from edgetailor.engine.devices import get_device

    dev = get_device(spec["device"])
    params = {"device": spec["device"], **({"formats": spec["formats"]} if "formats" in spec else {})}
    if spec.get("memory_of_builder"):         # rounded up: the builder's folder is within its own limit
        params["max_memory_mb"] = math.ceil(builder["memory_bytes"] / 1e5) / 10
    if "memory_between" in spec:
        a, b = (lad["types"][t]["memory_bytes"] for t in spec["memory_between"])
        params["max_memory_mb"] = round((a + b) / 2 / 1e6, 1)
    if "speed_between" in spec:
        a, b = (device_tps(dev, lad["types"][t]["decode_tps_here"], lad["types"][t]["path"])
                for t in spec["speed_between"])
        params["min_decode_tps"] = round((a + b) / 2, 2)
    for k in ("max_ppl_increase_pct", "max_kl", "max_memory_mb", "width_ratios", "heal_minutes"):
        if k in spec:
            params[k] = spec[k]
    return params


def ladder_answer(params: dict, lad: dict, base_ppl: float, builder: dict | None = None) -> dict | None:
    """The reference tool's best answer under the budget: llama.cpp's ladder, or for an onnxruntime app the
    builder's int4 folder (when it meets the budget)."""
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.planner import violations

    dev = get_device(params["device"])
    budget = Budget(dev, max_memory_bytes=params.get("max_memory_mb", 0) * 1e6 or None,
                    min_decode_tps=params.get("min_decode_tps"), max_ppl_increase_pct=params.get("max_ppl_increase_pct"),
                    max_kl=params.get("max_kl"))
    fits = []
    files = {"onnxruntime-genai builder int4": builder} if params.get("formats") == ["onnx"] else lad["types"]
    for t, m in files.items():
        tps = device_tps(dev, m["decode_tps_here"], m["path"])
        row = {"memory_bytes": m["memory_bytes"], "decode_tps": tps, "j_per_token": dev.power_typical_w / tps,
               "kl": m["kl"], "ppl_increase_pct": 100 * (m["perplexity"] / base_ppl - 1)}
        if not violations(budget, row):
            fits.append((m["kl"], t, row))
    if not fits:
        return None
    kl, t, row = min(fits)
    return {"type": t, **files[t], **row}


def run_fit(model_dir: Path, params: dict, calib: Path, runs: Path, windows: int) -> tuple[dict, float]:
    from edgetailor.engine import JobSpec, run_job

    t0 = time.perf_counter()
    rec = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": {
        **params, "context": CONTEXT, "candidates": 2, "rounds": 2, "trials": 80}}]}, source=str(model_dir),
        options={"threads": 2, "eval_windows": windows, "eval_ctx": 512, "eval_text": str(WIKITEXT),
                 "calibration_text": str(calib)}, runs_root=str(runs)))
    seconds = time.perf_counter() - t0
    if rec.manifest["status"] != "succeeded":
        raise SystemExit(f"fit failed: {rec.manifest.get('error')}")
    return json.loads((rec.artifacts_dir / "plan.json").read_text()), seconds


def one_calibrated_export(model_dir: Path, calib: Path, runs: Path) -> float:
    from edgetailor.engine import JobSpec, run_job

    t0 = time.perf_counter()
    rec = run_job(JobSpec(recipe={"name": "q4", "steps": [{"step": "quant.gguf_calibrated",
                                                           "params": {"types": ["Q4_K_M"]}}]},
                          source=str(model_dir), options={"threads": 2, "calibration_text": str(calib)},
                          runs_root=str(runs)))
    assert rec.manifest["status"] == "succeeded", rec.manifest.get("error")
    return time.perf_counter() - t0


def suite(name: str, model_dir: Path, calib: Path, work: Path, windows_n: int, budgets: list) -> dict:
    from edgetailor.engine.evaluate import make_windows
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.text import read_text

    work.mkdir(parents=True, exist_ok=True)
    print(f"== {name}", flush=True)
    tok = load_tokenizer(resolve(str(model_dir)))
    windows = make_windows(tok, read_text(str(WIKITEXT)), 512, windows_n)
    prompt = list(tok(read_text(str(WIKITEXT))[:3000]).input_ids)[:64]
    cmp = baseline(model_dir, work, windows, 2)
    base_ppl = cmp.baseline.perplexity
    lad = ladder(model_dir, calib, work, cmp, prompt, 2)
    builder = builder_int4(model_dir, work, cmp, prompt, 2) if any(s.get("formats") == ["onnx"] for s in budgets) else None
    export_s = one_calibrated_export(model_dir, calib, work / "runs")
    from edgetailor.engine import measured_cache

    measured_cache.clear()        # the suite's first fit measures the model; later budgets reuse it, as a user's would
    rows = []
    for spec in budgets:
        params = make_budget(spec, lad, builder)
        print(f"-- {spec['name']}: {params}", flush=True)
        plan, seconds = run_fit(model_dir, params, calib, work / "runs", windows_n)
        rec = plan["recommendation"]
        ours = next((m for m in plan["measured"] if m["name"] == rec.get("variant")), None)
        ref = ladder_answer(params, lad, base_ppl, builder)
        rows.append({"budget": spec["name"], "params": params, "ours": ours, "recommendation": rec,
                     "llama_cpp": ref, "planner_seconds": seconds,
                     "decode_model_seconds": plan.get("decode_model_seconds", 0.0),
                     "reused": plan.get("reused", []), "candidates": [
                         {"name": m["name"], "memory": m["memory_bytes"], "memory_predicted": m["predicted"]["memory_bytes"],
                          "decode_here": m["decode_tps_measured"], "decode_here_predicted": m["predicted"]["decode_tps_here"],
                          "kl": m["kl"], "kl_predicted": m["predicted"]["kl"], "screened": m.get("screened"),
                          "scores_reused": m.get("scores_reused", False),
                          "wait_share": m.get("decode_wait_share")} for m in plan["measured"]],
                     "calibration": plan["calibration"]})
    return {"name": name, "model": model_dir.name, "baseline_perplexity": base_ppl, "ladder": lad, "builder_int4": builder,
            "calibrated_q4_k_m_export_s": export_s, "rows": rows}


def planner_s(row: dict) -> str:
    once = row.get("decode_model_seconds", 0)
    return f"{row['planner_seconds']:.0f}" + (f" ({once:.0f})" if once >= 1 else "")


def model_measured(row: dict) -> str:
    return "reused" if row.get("reused") else "measured"


def markdown(results: dict) -> str:
    m = results["machine"]
    out = ["# The planner (`edgetailor fit`) vs llama.cpp's ladder under the same budgets", "",
           f"Machine: {m['cpu']}, {m['logical_cores']} cores, {m['ram_gb']} GB, load average at start {m['load_average_at_start'][0]:.2f}. Context {CONTEXT} "
           f"tokens; evaluation on wikitext-2 test (ctx 512, {results['windows']} windows), KL to the fp32 model; "
           "calibration on the bundled calibration text (never the evaluation text). Memory: peak RSS measured here "
           "at that context; decode on the device: projected from the speed measured here. llama.cpp: imatrix on the "
           "same calibration text, `llama-quantize --imatrix`, f16 KV cache. ONNX (an app that ships onnxruntime): "
           "onnxruntime-genai's model builder, int4 (its CPU recipe), float32 cache; an ONNX folder's memory at the "
           "context is its measured peak plus the cache grown from the benchmark's 96 tokens to the context.", "",
           f"Command: `python bench/planner.py{results.get('args', '')}`", ""]
    for s in results["suites"]:
        out += [f"## {s['name']}", "", f"Baseline perplexity {s['baseline_perplexity']:.4f}. One calibrated Q4_K_M "
                f"export (quant.gguf_calibrated, GPTQ): {s['calibrated_q4_k_m_export_s']:.0f} s.", "",
                "Planner s: the whole `fit` run; in brackets the part spent measuring llama.cpp's decode costs on "
                "probes (once per machine and model, cached for later runs). Time ratio: the run without that part / "
                "the calibrated export. Model: *measured* where the run measured the model itself (the suite's first "
                "budget starts from an empty cache), *reused* where it took what the suite's first fit of the model "
                "measured (tensor prices, depth, the baseline's log-probs, encoded tensors: `engine.measured_cache`; "
                "another budget on the same model, as a user's second fit).", "",
                "| budget | answer | file MB | KV | memory MB | ppl increase | KL mean | KL p99.9 | planner s | model | time ratio |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
        base = s["baseline_perplexity"]
        for r in s["rows"]:
            o, l = r["ours"], r["llama_cpp"]
            limits = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            if o:
                out.append(f"| {r['budget']} ({limits}) | EdgeTailor {o['name']} | {o['file_bytes'] / 1e6:.1f} | "
                           f"{o['kv_type']} | {o['memory_bytes'] / 1e6:.0f} | {o['ppl_increase_pct']:+.2f}% | "
                           f"{o['kl']:.5f} | {o['kl_p999']:.4f} | {planner_s(r)} | {model_measured(r)} | "
                           f"{(r['planner_seconds'] - r.get('decode_model_seconds', 0)) / s['calibrated_q4_k_m_export_s']:.1f} |")
            else:
                out.append(f"| {r['budget']} ({limits}) | EdgeTailor: nothing fits — {r['recommendation']['reason']} | | | | | | | "
                           f"{planner_s(r)} | {model_measured(r)} | |")
            onnx = r["params"].get("formats") == ["onnx"]
            if onnx and not l:         # the builder's folder, shown with the limit it misses
                b = s["builder_int4"]
                over = (b["memory_bytes"] - r["params"]["max_memory_mb"] * 1e6) / 1e3
                out.append(f"| | onnxruntime-genai builder int4 (RTN, block 32): {over:.0f} kB past the limit (its own "
                           f"memory rounded down to 0.1 MB) | {b['size_bytes'] / 1e6:.1f} | f32 | "
                           f"{b['memory_bytes'] / 1e6:.0f} | {100 * (b['perplexity'] / base - 1):+.2f}% | {b['kl']:.5f} | "
                           f"{b['kl_p999']:.4f} | | | |")
            elif l:
                what = l["type"] + " (RTN, block 32)" if onnx else f"llama.cpp+imatrix {l['type']}"
                out.append(f"| | {what} | {l['size_bytes'] / 1e6:.1f} | {'f32' if onnx else 'f16'} | "
                           f"{l['memory_bytes'] / 1e6:.0f} | {100 * (l['perplexity'] / base - 1):+.2f}% | {l['kl']:.5f} | "
                           f"{l['kl_p999']:.4f} | | | |")
            else:
                out.append("| | llama.cpp+imatrix: no ladder type meets the budget | | | | | | | | | |")
        out += ["", "Predictions for every built candidate (after the predictors were refitted on the points measured "
                "before it was chosen, the first of each run on theory and probes alone: for GGUF files llama.cpp's decode "
                "cost model measured on probes):", "",
                "| budget | candidate | memory MB measured / predicted | error | decode here tok/s measured / predicted | error | run-queue wait | KL measured / predicted |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            for c in r["candidates"]:
                out.append(f"| {r['budget']} | {c['name']} | {c['memory'] / 1e6:.0f} / {c['memory_predicted'] / 1e6:.0f} | "
                           f"{100 * (c['memory_predicted'] / c['memory'] - 1):+.1f}% | {c['decode_here']:.1f} / "
                           f"{c['decode_here_predicted']:.1f} | {100 * (c['decode_here_predicted'] / c['decode_here'] - 1):+.1f}% | "
                           f"{'' if c.get('wait_share') is None else format(c['wait_share'], '.1%')} | "
                           f"{c['kl']:.5f}{'*' if c.get('screened') else ''}{' (r)' if c.get('scores_reused') else ''} / "
                           f"{c['kl_predicted']:.5f} |")
        cands = [c for r in s["rows"] for c in r["candidates"]]
        if any(c.get("screened") for c in cands):
            out += ["", "\\* screened: evaluated on the first windows only (every file after the run's first, and the "
                    "first file's quantized KV caches), its KL the first file's (f16 cache) on all windows plus "
                    "their difference on those windows (it was not recommended; a recommended one is evaluated on "
                    "the rest of the windows first)."]
        if any(c.get("scores_reused") for c in cands):
            out += ["", "(r): a file with the same bytes as one the suite's first fit built and scored on the same "
                    "windows: its quality figures are that fit's (`plan_tasks.score_file`); memory and speed measured "
                    "again."]
        near = sum(abs(c["decode_here_predicted"] / c["decode_here"] - 1) <= 0.25 for c in cands)
        mem = sum(abs(c["memory_predicted"] / c["memory"] - 1) <= 0.10 for c in cands)
        out += ["", f"Decode speed predicted within 25%: {near} of {len(cands)} candidates; memory within 10%: {mem} of "
                f"{len(cands)}. Run-queue wait: the share of the benchmark threads' time spent waiting for a CPU "
                "(other processes; a benchmark past 10% is measured again)."]
        failing = [r for r in s["rows"] if r["ours"] and r["recommendation"].get("variant") is None]
        out += ["", f"Recommendations that fail a limit when measured: {len(failing)} (the recommendation is chosen "
                "from measured figures only).", ""]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--models", default="dithered,demo")
    ap.add_argument("--demo-budgets", type=int, default=1, help="budgets run on the demo model (first N)")
    ap.add_argument("--width-budget", action="store_true", help="only the budget with a narrower model (WIDTH_BUDGET)")
    ap.add_argument("--work", default="/tmp/edgetailor-bench-planner")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the committed .json")
    ap.add_argument("--out", default=str(HERE / "results" / "planner"), help="results path without suffix")
    args = ap.parse_args()
    from edgetailor.engine import resolve
    from machine import machine, write_results

    if args.markdown_only:
        results = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_results(Path(args.out), results, markdown(results))
        return

    work = Path(args.work)
    calib = REPO / "assets" / "text" / "calibration.txt"
    given = " ".join(a for a in sys.argv[1:])
    results = {"machine": machine(), "windows": args.windows, "suites": [], "args": f" {given}" if given else ""}
    for name in args.models.split(","):
        if name == "dithered":
            model = Path("/tmp/smollm2-dithered")
            if not model.exists():
                subprocess.run([sys.executable, str(SHARED / "tools" / "make_smollm2_dithered.py"), str(model)], check=True)
            budgets = BUDGETS
        else:
            model = resolve("demo").path
            budgets = BUDGETS[: args.demo_budgets]
        if args.width_budget:
            budgets = [WIDTH_BUDGET]
        results["suites"].append(suite(f"{name} ({model.name})", Path(model), calib, work / name, args.windows, budgets))
        write_results(Path(args.out), results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

"""EdgeTailor's calibrated GGUF quantizer against llama.cpp's, side by side in one run.

For each model / calibration text / type it makes three files and scores them all with the same evaluator
(EdgeTailor's llama-perplexity windowing run by llama.cpp through llama-cpp-python, wikitext-2 test,
ctx 512, first N windows; KL to the F16 file's log-probs):

* llama.cpp: convert_hf_to_gguf.py -> F16, llama-quantize TYPE (no importance matrix)
* llama.cpp + imatrix: llama-imatrix on the calibration text (ctx 512, every chunk the text has), then
  llama-quantize --imatrix TYPE
* EdgeTailor: quant.gguf_calibrated's writer (GPTQ, llama.cpp's type mix) on the same calibration text
  (ctx 512, every sequence the text has), which measures each decoder block's input statistics and
  Hessians as it walks the model block by block - in a child process, so its wall time and peak memory
  are its own.
* EdgeTailor measured (``--mixes``): the same writer, each tensor's type chosen by its measured effect on
  the loss (``mix: measured``: a forward/backward sensitivity pass on the calibration text, then a plan
  under the byte count of llama.cpp's file of the type), so the file is never larger than llama.cpp's.
  Its time includes the sensitivity pass for every type, as a user making one file pays it.
* AWQ + llama.cpp (``--awq-types``): EdgeTailor's ``awq.scale`` transform (the same statistics, stand-in
  quantizer at the type's bits) folded into the weights, then the *plain* llama.cpp quantizer (no
  importance matrix): what the equivalent transform alone gives a runtime's own quantizer.

The llama.cpp tools are built from the llama-cpp-python sdist into a cache outside the repo
(bench/reference_tools.py). Run under the shared lock::

    flock /tmp/edgetailor-heavy.lock .venv/bin/python bench/calibrated_quant.py

Writes bench/results/calibrated_quant.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
sys.path.insert(0, str(REPO / "bench"))

TYPES = ["Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
PIPELINES = ("llama", "llama+imatrix", "AWQ + llama", "EdgeTailor", "EdgeTailor measured")
OURS = ("EdgeTailor", "EdgeTailor measured")
TARGET_RATIO = {"Q5_K_M": 0.85, "Q4_K_M": 0.75, "Q3_K_M": 0.75, "Q2_K": 0.75}


AWQ_BITS = {"Q6_K": (6, 16), "Q5_K_M": (5, 32), "Q4_K_M": (4, 32), "Q3_K_M": (3, 16), "Q2_K": (2, 16)}


def peak_rss_mb() -> float:
    """This process's own peak resident size: VmHWM, the high-water mark of its address space since exec.
    (getrusage's ru_maxrss is not it for a child: Linux carries the forked copy of the parent's size into it,
    which made a child of this script report the parent's 1252 MB.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(model_dir: str, calib: str, types: list[str], outdir: str, method: str, awq_types: list[str],
         mixes: list[str]) -> dict:
    """Child process: EdgeTailor's pipeline, timed, from loading the model to the last file."""
    import copy

    import psutil
    import torch

    torch.set_num_threads(2)
    from edgetailor.engine import imatrix
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.engine.sensitivity import measure_sensitivity
    from edgetailor.exporters.gguf_calibrated import export_calibrated, export_to_target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = token_sequences(tok, Path(calib).read_text(encoding="utf-8"), 512)
    rss_before_model = psutil.Process().memory_info().rss / 2**20      # Python, torch, transformers, tokenizer
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    res = {"load_s": t_load, "calibration_s": 0.0, "calibration_sequences": int(len(seqs)), "types": {},
           "rss_before_model_mb": rss_before_model, "rss_after_load_mb": rss_loaded,
           "fp32_weights_mb": sum(p.numel() * 4 for p in model.parameters()) / 2**20}
    for t in types if "llama.cpp" in mixes else []:   # calibration is inside: the writer walks the model block by block
        t0 = time.perf_counter()
        export_calibrated(model, tok, model_dir, Path(outdir) / f"et-{t}.gguf", t, seqs, method)
        res["types"][t] = time.perf_counter() - t0
        res.setdefault("rss_after_type_mb", {})[t] = psutil.Process().memory_info().rss / 2**20
        res.setdefault("peak_after_type_mb", {})[t] = peak_rss_mb()
    if "measured" in mixes:
        t0 = time.perf_counter()
        sens = measure_sensitivity(model, seqs)
        res["sensitivity_s"] = time.perf_counter() - t0
        res["peak_after_sensitivity_mb"] = peak_rss_mb()
        res["measured_types"], res["measured_mix"] = {}, {}
        for t in types:
            t0 = time.perf_counter()
            info = export_to_target(model, tok, model_dir, Path(outdir) / f"et-measured-{t}.gguf", None, seqs, method,
                                    like=t, sensitivity=sens)
            res["measured_types"][t] = time.perf_counter() - t0 + res["sensitivity_s"]
            res["measured_mix"][t] = {k: sum(1 for v in info["tensor_types"].values() if v == k)
                                      for k in sorted(set(info["tensor_types"].values()))}
            res.setdefault("peak_after_type_mb", {})[f"measured {t}"] = peak_rss_mb()
    res["peak_rss_mb"] = peak_rss_mb()
    res["awq_types"] = {}
    if awq_types:
        from edgetailor.engine.steps.awq import AwqConfig, apply_awq
        from edgetailor.exporters.gguf import llama_quantize, write_gguf

        t0 = time.perf_counter()
        stats = imatrix.collect(model, seqs, hessians=True)
        res["calibration_s"] = time.perf_counter() - t0
        for t in awq_types:
            t0 = time.perf_counter()
            bits, group = AWQ_BITS[t]
            scaled, scaled_stats = copy.deepcopy(model), copy.deepcopy(stats)
            apply_awq(scaled, scaled_stats, AwqConfig(bits=bits, group_size=group))
            f16 = Path(outdir) / f"awq-{t}-F16.gguf"
            write_gguf(scaled, tok, model_dir, f16, "F16")
            llama_quantize(f16, Path(outdir) / f"awq-llama-{t}.gguf", t)
            f16.unlink()
            res["awq_types"][t] = time.perf_counter() - t0
            del scaled, scaled_stats
    return res


def evaluate_files(model_dir: str, files: dict[str, Path], f16: Path, windows: int) -> dict:
    from edgetailor.engine.evaluate import Comparison, make_windows
    from edgetailor.engine.runtimes import open_runtime
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    win = make_windows(tok, WIKI.read_bytes().decode("utf-8"), 512, windows)
    with open_runtime("gguf", f16, n_ctx=512, threads=2) as rt:        # llama.cpp's F16 is the reference
        cmp = Comparison(rt, win, threads=2, folder=f16.parent / "reference")
    out = {}
    for label, path in [("F16", f16)] + list(files.items()):
        r = cmp.baseline if label == "F16" else cmp.score("gguf", path)
        out[label] = {"perplexity": r.perplexity, "kl": r.kl, "kl_p999": r.kl_p999, "top1": r.top1, "size_mb": path.stat().st_size / 1e6,
                      "size_bytes": path.stat().st_size,
                      "eval_windows": r.windows}
        print(f"  {label}: ppl {r.perplexity:.4f}" + (f" KL {r.kl:.5f}" if r.kl is not None else ""), flush=True)
    return out


def suite(name: str, model_dir: Path, calib: Path, types: list[str], windows: int, work: Path, method: str,
          awq_types: list[str], plain: bool = True, mixes: tuple = ("llama.cpp", "measured")) -> dict:
    import reference_tools as rt

    work.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {model_dir.name}, calibration {calib.name}, {windows} windows", flush=True)
    f16 = work / "f16.gguf"
    t_convert = rt.run_convert(model_dir, f16, "f16", log_path=work / "convert.log")
    imat = work / "imatrix.gguf"
    t_imatrix = rt.run_imatrix(f16, calib, imat, ctx=512, chunks=100, threads=2, extra_args=["--no-ppl"],
                               log_path=work / "imatrix.log")
    chunks = next((int(l.split("computing over ")[1].split()[0]) for l in (work / "imatrix.log").read_text().splitlines()
                   if "computing over" in l), None)
    times, files = {}, {}
    for t in types:
        if plain:
            files[f"llama {t}"] = work / f"llama-{t}.gguf"
            times[f"llama {t}"] = rt.run_quantize(f16, files[f"llama {t}"], t, threads=2)
        files[f"llama+imatrix {t}"] = work / f"llama-imatrix-{t}.gguf"
        times[f"llama+imatrix {t}"] = rt.run_quantize(f16, files[f"llama+imatrix {t}"], t, imatrix=imat, threads=2)
    t0 = time.perf_counter()
    awq_types = [t for t in awq_types if t in types]
    child = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(calib), ",".join(types), str(work),
                            method, ",".join(awq_types), ",".join(mixes)], capture_output=True, text=True)
    t_ours_total = time.perf_counter() - t0
    if child.returncode:
        raise SystemExit(child.stderr[-4000:])
    our = json.loads(child.stdout.strip().splitlines()[-1])
    for t in types:
        if "llama.cpp" in mixes:
            files[f"EdgeTailor {t}"] = work / f"et-{t}.gguf"
        if "measured" in mixes:
            files[f"EdgeTailor measured {t}"] = work / f"et-measured-{t}.gguf"
    for t in awq_types:
        files[f"AWQ + llama {t}"] = work / f"awq-llama-{t}.gguf"
    scores = evaluate_files(str(model_dir), files, f16, windows)
    base = scores["F16"]["perplexity"]
    rows = []
    for t in types:
        row = {"type": t}
        for who in PIPELINES:
            if f"{who} {t}" in scores:
                s = scores[f"{who} {t}"]
                row[who] = {**s, "increase_pct": 100 * (s["perplexity"] / base - 1)}
        if "AWQ + llama" in row:
            row["AWQ + llama"]["seconds"] = our["load_s"] + our["calibration_s"] + our["awq_types"][t]
        if plain:
            row["llama"]["seconds"] = t_convert + times[f"llama {t}"]
        row["llama+imatrix"]["seconds"] = t_convert + t_imatrix + times[f"llama+imatrix {t}"]
        if "EdgeTailor" in row:
            row["EdgeTailor"]["seconds"] = our["load_s"] + our["types"][t]
        if "EdgeTailor measured" in row:
            row["EdgeTailor measured"]["seconds"] = our["load_s"] + our["measured_types"][t]
            row["EdgeTailor measured"]["mix"] = our["measured_mix"][t]
        ref = row["llama+imatrix"]
        for who in OURS:
            if who in row:
                row[who]["ratio_to_imatrix"] = row[who]["increase_pct"] / ref["increase_pct"]
                row[who]["time_ratio_to_imatrix"] = row[who]["seconds"] / ref["seconds"]
                row[who]["not_larger"] = row[who]["size_bytes"] <= ref["size_bytes"]
        rows.append(row)
    return {"name": name, "model": model_dir.name, "calibration": calib.name, "windows": windows,
            "f16_perplexity": base, "imatrix_chunks": chunks, "ours": our, "ours_child_seconds": t_ours_total,
            "convert_s": t_convert, "imatrix_s": t_imatrix, "rows": rows, "method": method}


def memory_line(our: dict) -> str:
    if "rss_before_model_mb" not in our:
        return f"Its process's peak RSS {our['peak_rss_mb']:.0f} MB."
    net = our["peak_rss_mb"] - our["rss_before_model_mb"]
    limit = 1.2 * our["fp32_weights_mb"]
    return (f"Memory of its process (every type in turn): peak RSS {our['peak_rss_mb']:.0f} MB; before the model loaded "
            f"(Python, torch, transformers, the tokenizer) {our['rss_before_model_mb']:.0f} MB, after loading "
            f"{our['rss_after_load_mb']:.0f} MB (weights mapped, not yet read); so the quantization took "
            f"**{net:.0f} MB** over the process without the model, against fp32 weights of "
            f"{our['fp32_weights_mb']:.0f} MB + 20% = {limit:.0f} MB ({'met' if net <= limit else 'not met'}).")


def markdown(results: dict) -> str:
    lines = ["# Calibrated GGUF quantization: EdgeTailor vs llama.cpp", "",
             f"Machine: {results['machine']}. llama.cpp {results['llama_cpp']} (tools built from the llama-cpp-python "
             "sdist). Evaluation: wikitext-2 test, ctx 512, first N windows, EdgeTailor's evaluator running each file "
             "in llama.cpp; KL to the F16 file (llama.cpp's converter). Calibration text never the evaluation text; "
             "llama-imatrix and EdgeTailor use the same text, ctx 512, every chunk it has. Times are wall seconds on "
             "2 threads: llama.cpp = convert + [imatrix] + quantize; EdgeTailor = load + its writer, which walks the "
             "calibration text through the model block by block for each type.", "",
             f"Command: `{results['command']}`", ""]
    for s in results["suites"]:
        lines += [f"## {s['name']}", "",
                  f"Model {s['model']}, calibration {s['calibration']} ({s['imatrix_chunks']} chunks of 512 for "
                  f"llama-imatrix, {s['ours']['calibration_sequences']} sequences of 512 for EdgeTailor), {s['windows']} "
                  f"windows. F16 perplexity {s['f16_perplexity']:.4f}. EdgeTailor method: {s['method']}. " + memory_line(s['ours']), "",
                  "| type | pipeline | size MB | perplexity | increase | KL | seconds |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            for who in PIPELINES:
                if who not in r:
                    continue
                x = r[who]
                lines.append(f"| {r['type']} | {who} | {x['size_mb']:.1f} | {x['perplexity']:.4f} | "
                             f"{x['increase_pct']:+.2f}% | {x['kl']:.5f} | {x['seconds']:.1f} |")
        lines += ["", "Ratios to llama+imatrix (increase over F16; wall time). Met: ratio at most the target and the file "
                  "no larger than llama.cpp's.", "",
                  "| type | target | EdgeTailor, llama.cpp's mix | met | time | EdgeTailor, measured mix | met | time |",
                  "|---|---:|---:|---|---:|---:|---|---:|"]
        for r in s["rows"]:
            tgt = TARGET_RATIO.get(r["type"])
            cells = []
            for who in OURS:
                x = r.get(who)
                if x is None:
                    cells += ["-", "", "-"]
                    continue
                met = "" if tgt is None else ("yes" if x["ratio_to_imatrix"] <= tgt and x["not_larger"] else "no")
                cells += [f"{x['ratio_to_imatrix']:.3f}", met, f"{x['time_ratio_to_imatrix']:.2f}"]
            lines.append(f"| {r['type']} | {tgt or '-'} | " + " | ".join(cells) + " |")
        if any("EdgeTailor measured" in r for r in s["rows"]):
            lines += ["", f"Measured mixes (sensitivity pass {s['ours'].get('sensitivity_s', 0):.1f} s, counted in every "
                      "type's time): tensors per type"]
            for r in s["rows"]:
                if "EdgeTailor measured" in r:
                    mix = r["EdgeTailor measured"]["mix"]
                    lines.append(f"- {r['type']}: " + ", ".join(f"{k} {v}" for k, v in mix.items()))
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model_dir, calib, types, outdir, method, awq, mixes = sys.argv
        print(json.dumps(ours(model_dir, calib, types.split(","), outdir, method, [t for t in awq.split(",") if t],
                              mixes.split(","))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--model", default="/tmp/smollm2-dithered", help="benchmark model (built if missing)")
    ap.add_argument("--check-windows", type=int, default=40, help="windows for the ordering checks")
    ap.add_argument("--check-types", default="Q4_K_M,Q3_K_M", help="types for the ordering checks ('' = skip)")
    ap.add_argument("--checks", default="alt,demo", help="which ordering checks: alt (second calibration text), demo")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--awq-types", default="Q4_K_M,Q3_K_M", help="types that also get the AWQ + llama.cpp row ('' = none)")
    ap.add_argument("--no-plain", action="store_true", help="leave out llama.cpp without an importance matrix")
    ap.add_argument("--mixes", default="llama.cpp,measured", help="EdgeTailor's type mixes: llama.cpp, measured")
    ap.add_argument("--work", default="/tmp/edgetailor-bench-calibrated")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "calibrated_quant"))
    args = ap.parse_args()
    os.environ.setdefault("EDGETAILOR_HOME", "/tmp/et-test-home")
    import reference_tools as rt

    tools = rt.ensure_tools()
    from machine import machine, write_results

    m = machine()
    model = Path(args.model)
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_smollm2_dithered.py"), str(model)], check=True)
    work = Path(args.work)
    calib = REPO / "assets" / "text" / "calibration.txt"
    awq = [t for t in args.awq_types.split(",") if t]
    mixes = tuple(m for m in args.mixes.split(",") if m)
    suites = [suite(f"Benchmark model ({model.name}), calibration.txt", model, calib,
                    args.types.split(","), args.windows, work / "main", args.method, awq, not args.no_plain, mixes)]
    if args.check_types:
        check = args.check_types.split(",")
        checks = args.checks.split(",")
        if "alt" in checks:
            suites.append(suite("Ordering check: benchmark model, second calibration text", model,
                                REPO / "assets" / "text" / "calibration_alt.txt", check, args.check_windows,
                                work / "alt", args.method, awq, not args.no_plain, mixes))
    if args.check_types and "demo" in checks:
        from edgetailor.engine import resolve

        suites.append(suite("Ordering check: the demo model itself", Path(resolve("demo").path), calib, check,
                            args.check_windows, work / "demo", args.method, awq, not args.no_plain, mixes))
    results = {"machine": f"{m['cpu']}, {m['logical_cores']} cores, {m['ram_gb']} GB RAM, load average at start "
                          f"{m['load_average_at_start'][0]:.2f}",
               "machine_info": m, "llama_cpp": tools["version"], "command": " ".join(["python"] + sys.argv),
               "suites": suites}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

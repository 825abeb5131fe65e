#!/usr/bin/env python3
"""ONNX int4 and int8: EdgeTailor's exporter against onnxruntime-genai's model builder, in one run, on one model.

  builder-T    python -m onnxruntime_genai.models.builder -i <HF folder> -o <out> -p T -e cpu   (T: int4, int8)
  ours-T       edgetailor.exporters.onnx, type T, rtn, block 32 (the builder's settings, our graph writer), from
               the model's files read lazily, as the export step writes an untouched source
  ours-T-gptq  the same, GPTQ calibrated on EdgeTailor's bundled calibration text (not wikitext), symmetric

Each export runs in its own subprocess (model loading included), timed, its peak memory sampled with psutil
(the whole process tree, every 50 ms). Both folders are then scored the same way:
  perplexity, KL and top-1 against the fp32 torch baseline: EdgeTailor's evaluator on wikitext-2 test
      (context 512, first N windows), both folders run by EdgeTailor's OnnxRuntime (plain onnxruntime);
  decode tokens/s: onnxruntime-genai for both (greedy, same prompt, same thread count), median of R runs,
      the two folders alternating; prefill excluded (timed apart).

Usage: python bench/onnx_vs_builder.py [--model demo] [--types int4,int8] [--windows 20] [--repeats 5] [--threads 2]
Writes bench/results/onnx_vs_builder.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPT = "The history of the city begins in the early Middle Ages, when"


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and peak resident memory of its process tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1e6, 1)}


def export_ours(model_spec: str, out: str, qtype: str, method: str, block_size: int, threads: int) -> None:
    """Runs in the subprocess: export the model as EdgeTailor's export step does an untouched source (its files
    read lazily when it has safetensors, else loaded)."""
    import torch

    torch.set_num_threads(threads)
    from edgetailor.engine import resolve
    from edgetailor.engine.lazy import LazyModel, can_read_lazily
    from edgetailor.engine.modeling import load_model, load_tokenizer
    from edgetailor.engine.text import read_text
    from edgetailor.exporters import get_exporter

    src = resolve(model_spec)
    if can_read_lazily(src.path):
        model, tokenizer = LazyModel(src.path), load_tokenizer(src)
    else:
        lm = load_model(src)
        model, tokenizer = lm.model, lm.tokenizer
    opts = {"type": qtype, "method": method, "block_size": block_size, "threads": threads}
    if method == "gptq":
        opts["calibration_text"] = read_text(None)
    Path(out).mkdir(parents=True)
    get_exporter("onnx").export(model, tokenizer, src.path, Path(out), opts)


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 2)


def genai_decode(folder: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> dict:
    """Greedy decoding of ``new_tokens`` tokens in onnxruntime-genai (its KV cache), timed apart from the prefill."""
    import numpy as np
    from edgetailor.engine.runtimes import OnnxGenaiRuntime

    with OnnxGenaiRuntime(folder, n_ctx=len(prompt_ids) + new_tokens, threads=threads) as rt:
        t0 = time.perf_counter()
        tokens = [int(np.argmax(rt.prefill(prompt_ids)))]
        t1 = time.perf_counter()
        while len(tokens) < new_tokens:
            tokens.append(int(np.argmax(rt.decode_one(tokens[-1]))))
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tokens": len(tokens) - 1, "decode_tps": (len(tokens) - 1) / (t2 - t1),
            "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--types", default="int4,int8", help="precisions, each: the builder and our methods")
    ap.add_argument("--methods", default="rtn,gptq", help="our methods, one row each per type")
    ap.add_argument("--type", default="int4", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="rtn", help=argparse.SUPPRESS)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--text", default=str(HERE.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--out", default=str(HERE / "results" / "onnx_vs_builder"))
    ap.add_argument("--export-ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_ours:
        export_ours(args.model, args.export_ours, args.type, args.method, args.block_size, args.threads)
        return 0

    import onnxruntime
    import onnxruntime_genai as og
    from edgetailor.engine import resolve
    from edgetailor.engine.evaluate import Comparison, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.text import read_text
    from machine import machine, write_results

    src = resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="edgetailor-onnx-bench-"))
    methods, types = args.methods.split(","), args.types.split(",")
    ours = {f"ours-{t}" + ("" if m == "rtn" else f"-{m}"): (t, m) for t in types for m in methods}
    folders = {**{f"builder-{t}": work / f"builder-{t}" for t in types}, **{name: work / name for name in ours}}
    rows: dict = {name: {} for name in folders}

    for t in types:
        print(f"exporting: builder-{t}", file=sys.stderr)
        rows[f"builder-{t}"].update(run_measured([
            sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src.path), "-o",
            str(folders[f"builder-{t}"]), "-p", t, "-e", "cpu", "-c", str(work / f"builder-cache-{t}")]))
    for name, (t, method) in ours.items():
        print(f"exporting: {name}", file=sys.stderr)
        rows[name].update(run_measured([sys.executable, str(Path(__file__).resolve()), "--model", args.model,
                                        "--export-ours", str(folders[name]), "--type", t, "--method", method,
                                        "--block-size", str(args.block_size), "--threads", str(args.threads)]))
    for name, folder in folders.items():
        rows[name]["folder_mb"] = folder_mb(folder)

    lm = load_model(src)
    windows = make_windows(lm.tokenizer, read_text(args.text), args.ctx, args.windows)
    print(f"baseline: {len(windows)} windows x {args.ctx}", file=sys.stderr)
    cmp = Comparison(lm.model, windows, threads=args.threads, folder=work / "reference")
    base = cmp.baseline
    for name, folder in folders.items():
        print(f"evaluating {name}", file=sys.stderr)
        r = cmp.score("onnx", folder)
        rows[name].update(perplexity=round(r.perplexity, 4), kl=round(r.kl, 5), kl_p999=round(r.kl_p999, 5),
                          top1=round(r.top1, 4))

    prompt_ids = list(lm.tokenizer(PROMPT)["input_ids"])
    runs = {name: [] for name in folders}
    for i in range(args.repeats):
        for name, folder in (list(folders.items()) if i % 2 == 0 else list(reversed(folders.items()))):
            print(f"decode {name} {i + 1}/{args.repeats}", file=sys.stderr)
            runs[name].append(genai_decode(folder, prompt_ids, args.new_tokens, args.threads))
    for name in folders:
        rows[name]["decode_tps_median"] = round(statistics.median(r["decode_tps"] for r in runs[name]), 2)
        rows[name]["decode_tps_runs"] = [round(r["decode_tps"], 2) for r in runs[name]]
        rows[name]["prefill_s_median"] = round(statistics.median(r["prefill_s"] for r in runs[name]), 4)
        rows[name]["decode_tokens"] = runs[name][0]["decode_tokens"]
        rows[name]["sample"] = lm.tokenizer.decode(runs[name][0]["tokens"][:24])

    ratios, targets = {}, {}
    for name, (t, _) in ours.items():
        o, b = rows[name], rows[f"builder-{t}"]
        ratios[name] = {"decode_tps": round(o["decode_tps_median"] / b["decode_tps_median"], 3),
                        "folder_size": round(o["folder_mb"] / b["folder_mb"], 4),
                        "perplexity": round(o["perplexity"] / b["perplexity"], 4),
                        "export_seconds": round(o["seconds"] / b["seconds"], 3),
                        "peak_memory": round(o["peak_rss_mb"] / b["peak_rss_mb"], 3)}
        targets[name] = {"decode_at_least_builder": ratios[name]["decode_tps"] >= 1.0,
                         "file_no_larger": o["folder_mb"] <= b["folder_mb"],
                         # equal within float summation noise (0.01%) counts as no worse
                         "perplexity_no_worse": o["perplexity"] <= b["perplexity"] * 1.0001}
    result = {"model": args.model, "source": str(src.path), "machine": machine(), "threads": args.threads,
              "windows": len(windows), "ctx": args.ctx, "text": Path(args.text).name, "repeats": args.repeats,
              "new_tokens": args.new_tokens, "prompt": PROMPT, "ours_options": {"types": types, "methods": methods,
                                                                                "block_size": args.block_size},
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
              "baseline_perplexity": round(base.perplexity, 4), "rows": rows, "ratios_ours_over_builder": ratios,
              "targets_met": targets, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# ONNX {' and '.join(types)}: EdgeTailor vs onnxruntime-genai model builder ({args.model})", "",
          (f"{result['date']}; {result['machine']['cpu']}, {result['machine']['logical_cores']} logical cores, "
           f"{args.threads} threads; onnxruntime {onnxruntime.__version__}, onnxruntime-genai {og.__version__}."),
          (f"Ours: {', '.join(types)} block {args.block_size}, methods {', '.join(methods)} (gptq calibrated on the "
           "bundled calibration text), written from the model's files read lazily (one decoder layer at a time). "
           f"Builder: `-p {'/'.join(types)} -e cpu` (its defaults: symmetric, block 32; it loads the model in torch)."),
          ("Export time and peak memory: each export in its own process, model loading included (psutil, process "
           "tree, every 50 ms)."), "",
          (f"Quality: wikitext-2 test, {len(windows)} windows x {args.ctx} (EdgeTailor evaluator, every folder in "
           f"plain onnxruntime); fp32 torch baseline perplexity {base.perplexity:.4f}."),
          (f"Decode: onnxruntime-genai, greedy, {args.new_tokens} tokens after a {len(prompt_ids)}-token prompt, "
           f"median of {args.repeats} runs (order alternating)."), "",
          "| | export s | peak MB | folder MB | perplexity | KL | top-1 | decode tok/s (median) | prefill s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['seconds']} | {r['peak_rss_mb']} | {r['folder_mb']} | {r['perplexity']} | {r['kl']} | "
                  f"{r['top1']} | {r['decode_tps_median']} | {r['prefill_s_median']} |")
    md.append("")
    for name, (t, _) in ours.items():
        md.append(f"{name} / builder-{t}: " + ", ".join(f"{k} {v}" for k, v in ratios[name].items()) + ". Targets: "
                  + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in targets[name].items()) + ".")
    md += ["",
           "Reproduce: `flock /tmp/edgetailor-heavy.lock .venv/bin/python bench/onnx_vs_builder.py`", ""]
    write_results(out, result, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

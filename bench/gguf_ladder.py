#!/usr/bin/env python3
"""GGUF ladder: EdgeTailor's exporter against llama.cpp's own pipeline, in one run, on one model.

For each type (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K):
  ours      engine exporter (gguf-py writer; llama.cpp's quantizer on an F32 intermediate for k-quants)
  llama.cpp convert_hf_to_gguf.py -> F16, then llama-quantize (built from the llama-cpp-python sdist)
Both files are scored by the same evaluator (EdgeTailor's, running the files in llama.cpp through
llama-cpp-python): wikitext-2 test, context 512, first N windows; perplexity, KL and top-1 against the fp32
torch baseline. llama.cpp's own llama-perplexity is also run on our F16 and Q4_K_M files, and on its own
F16, to check that our evaluator agrees with it within 1%.

Usage: python bench/gguf_ladder.py [--model demo] [--windows 100] [--text ../shared/data/wikitext-2-raw/wiki.test.raw]
Writes bench/results/gguf_ladder.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


from machine import machine, write_results  # noqa: E402  (bench/ is on sys.path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(HERE.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--out", default=str(HERE / "results" / "gguf_ladder"))
    args = ap.parse_args()
    types = args.types.split(",")

    import reference_tools as ref
    from edgetailor.engine import resolve
    from edgetailor.engine.evaluate import Comparison, evaluate, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.engine.text import read_text
    from edgetailor.exporters import get_exporter

    tools = ref.ensure_tools()
    src = resolve(args.model)
    lm = load_model(src)
    text = read_text(args.text)
    windows = make_windows(lm.tokenizer, text, args.ctx, args.windows)
    work = Path(tempfile.mkdtemp(prefix="edgetailor-ladder-"))
    print(f"baseline: {len(windows)} windows x {args.ctx}", file=sys.stderr)
    cmp = Comparison(lm.model, windows, threads=args.threads, folder=work / "reference")
    base = cmp.baseline

    def score(path: Path) -> dict:
        r = cmp.score("gguf", path)
        return {"perplexity": r.perplexity, "kl": r.kl, "kl_p999": r.kl_p999, "top1": r.top1,
                "size_mb": path.stat().st_size / 1e6}

    exporter = get_exporter("gguf")
    results = []
    # llama.cpp: convert once to F16 (its default pipeline), then quantize.
    ll_f16 = work / "llama-F16.gguf"
    t_convert = ref.run_convert(src.path, ll_f16, outtype="f16")
    for t in types:
        ours = work / f"ours-{t}.gguf"
        t0 = time.perf_counter()
        exporter.export(lm.model, lm.tokenizer, src.path, ours, {"type": t, "threads": args.threads})
        t_ours = time.perf_counter() - t0
        if t == "F16":
            theirs, t_theirs = ll_f16, t_convert
        else:
            theirs = work / f"llama-{t}.gguf"
            t_theirs = t_convert + ref.run_quantize(ll_f16, theirs, t, threads=args.threads)
        row = {"type": t, "ours": {**score(ours), "export_seconds": t_ours},
               "llama_cpp": {**score(theirs), "export_seconds": t_theirs}}
        row["ppl_ratio_ours_over_llama_cpp"] = row["ours"]["perplexity"] / row["llama_cpp"]["perplexity"]
        results.append(row)
        print(json.dumps(row), file=sys.stderr)

    agreement = []
    for label, path in [("ours F16", work / "ours-F16.gguf"), ("ours Q4_K_M", work / "ours-Q4_K_M.gguf"),
                        ("llama.cpp F16", ll_f16)]:
        if not path.exists():
            continue
        ppl_tool, secs = ref.run_perplexity(path, args.text, ctx=args.ctx, chunks=args.windows, threads=args.threads)
        with LlamaCppRuntime(path, n_ctx=args.ctx, threads=args.threads) as rt:
            ours_eval = evaluate(rt, windows).perplexity
        agreement.append({"file": label, "llama_perplexity": ppl_tool, "edgetailor_evaluator": ours_eval,
                          "relative_difference": ours_eval / ppl_tool - 1})

    out = {"model": src.display_name, "text": Path(args.text).name, "ctx": args.ctx, "windows": len(windows),
           "threads": args.threads, "baseline_perplexity": base.perplexity, "rows": results,
           "evaluator_agreement": agreement, "machine": machine(), "llama_cpp_version": tools["version"],
           "note": "export_seconds: ours includes writing the F32 intermediate for k-quants; llama.cpp's "
                   "includes convert_hf_to_gguf (F16) + llama-quantize. Timings on a shared 2-core machine."}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, out, render(out))
    print(render(out))
    import shutil

    shutil.rmtree(work, ignore_errors=True)     # ~2.5 GB of reference log-probs and 14 GGUF files
    return 0


def render(o: dict) -> str:
    m = o["machine"]
    lines = [f"# GGUF ladder: EdgeTailor vs llama.cpp's pipeline ({o['model']})", "",
             f"Text {o['text']}, context {o['ctx']}, first {o['windows']} windows, {o['threads']} threads. "
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gb']} GB RAM. "
             f"llama.cpp {o['llama_cpp_version']} (from the llama-cpp-python sdist).", "",
             f"Baseline (fp32 torch, dequantized demo weights): perplexity {o['baseline_perplexity']:.4f}", "",
             "| type | ours MB | ours ppl | ours KL | ours s | llama.cpp MB | llama.cpp ppl | llama.cpp KL | llama.cpp s | ppl ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in o["rows"]:
        a, b = r["ours"], r["llama_cpp"]
        lines.append(f"| {r['type']} | {a['size_mb']:.1f} | {a['perplexity']:.4f} | {a['kl']:.5f} | {a['export_seconds']:.1f} "
                     f"| {b['size_mb']:.1f} | {b['perplexity']:.4f} | {b['kl']:.5f} | {b['export_seconds']:.1f} "
                     f"| {r['ppl_ratio_ours_over_llama_cpp']:.4f} |")
    lines += ["", "Evaluator agreement with llama.cpp's own `llama-perplexity` (same file, text, context, windows):", "",
              "| file | llama-perplexity | EdgeTailor evaluator | difference |", "| --- | --- | --- | --- |"]
    for a in o["evaluator_agreement"]:
        lines.append(f"| {a['file']} | {a['llama_perplexity']:.4f} | {a['edgetailor_evaluator']:.4f} | "
                     f"{100 * a['relative_difference']:+.3f}% |")
    lines += ["", o["note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Predicted against measured peak memory of the baseline and every GGUF of a model, in one run.

predicted = weights + KV cache at the context + runtime overhead measured on a one-layer probe of the same
            architecture and vocabulary (engine.projection; the probe is not the model being predicted)
measured  = the kernel's peak (VmHWM) of a fresh process that loads the variant and runs a prefill and a
            greedy decode (engine.benchmark), and the peak of psutil's samples at 25 Hz

Memory only: no timing from this script is reported. Usage:
    python bench/memory_prediction.py [--model demo] [--gguf-dir DIR | --run RUN_ID] [--types F16,Q8_0,...]
Writes bench/results/memory_prediction.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_roofline import TYPES, gguf_files
from machine import machine, write_results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--run")
    ap.add_argument("--gguf-dir")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results" / "memory_prediction"))
    args = ap.parse_args()

    from edgetailor.engine import resolve
    from edgetailor.engine.benchmark import benchmark_variant
    from edgetailor.engine.energy import EnergyMeter
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.probes import measure_overhead
    from edgetailor.engine.projection import predict_memory, variant_info
    from edgetailor.engine.text import default_evaluation_path, read_text

    src = resolve(args.model)
    files = gguf_files(args, Path(tempfile.mkdtemp(prefix="edgetailor-mem-")))
    tok = load_tokenizer(src)
    prompt = list(tok(read_text(default_evaluation_path())[: args.prompt_tokens * 20]).input_ids)[: args.prompt_tokens]
    meter = EnergyMeter.detect()
    used = args.prompt_tokens + args.gen_tokens
    todo = [("baseline (torch fp32)", "torch", src.path)] + [(t, "gguf", p) for t, p in files.items()]
    rows, overheads = [], {}
    for name, fmt, path in todo:
        if fmt not in overheads:
            overheads[fmt] = measure_overhead(fmt, src.path, prompt, args.gen_tokens, args.n_ctx, args.threads,
                                              meter=meter)
        print(f"measuring {name}", file=sys.stderr)
        pred = predict_memory(variant_info(fmt, path, tokens_used=used), args.n_ctx, used,
                              overheads[fmt]["overhead_bytes"])
        res = benchmark_variant(fmt, path, prompt, gen_tokens=args.gen_tokens, repeats=1, warmup=0,
                                threads=args.threads, n_ctx=args.n_ctx, meter=meter)
        rows.append({"variant": name, "runtime": fmt, **pred, "peak_rss_os_bytes": res["peak_rss_os_bytes"],
                     "peak_rss_sampled_bytes": res["peak_rss_bytes"], "rss_sample_hz": res["rss_sample_hz"],
                     "error_pct": 100 * (pred["predicted_memory_bytes"] / res["peak_rss_os_bytes"] - 1)})
    out = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": args.model,
           "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "n_ctx": args.n_ctx,
           "threads": args.threads, "overheads": overheads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Predicted against measured peak memory ({args.model})", "",
          (f"Machine: {out['machine']['cpu']}, {out['machine']['usable_cores']} usable cores; {out['when']}. "
           f"{args.prompt_tokens}-token prompt + {args.gen_tokens} generated, context {args.n_ctx}, "
           f"{args.threads} threads, a fresh process per variant."), "",
          "Runtime overhead (measured on a one-layer probe with the model's vocabulary): "
          + ", ".join(f"{k} {v['overhead_bytes'] / 1e6:.1f} MB" for k, v in overheads.items()) + ".", "",
          ("| variant | weights MB | KV MB | overhead MB | predicted MB | measured peak MB (VmHWM) | sampled peak MB "
           "| error |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['predicted_weights_bytes'] / 1e6:.1f} | {r['predicted_kv_bytes'] / 1e6:.1f} "
                  f"| {r['predicted_overhead_bytes'] / 1e6:.1f} | {r['predicted_memory_bytes'] / 1e6:.1f} | "
                  f"{r['peak_rss_os_bytes'] / 1e6:.1f} | {r['peak_rss_sampled_bytes'] / 1e6:.1f} | "
                  f"{r['error_pct']:+.1f}% |")
    write_results(args.out, out, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

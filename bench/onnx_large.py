#!/usr/bin/env python3
"""ONNX export of a model over 2 GB (protobuf's limit for one file): fp32 and int4, each folder loaded and run.

A random Llama (demo tokenizer and vocabulary, hidden 2048, 10 layers, 552M parameters, 2.21 GB in fp32) is
exported by EdgeTailor's ONNX exporter; each folder is then loaded by onnxruntime and onnxruntime-genai (the
exporter's own verify step) and its fp32 logits are compared with torch's on a fixed prompt. Records export
time, peak RSS of this process, file sizes and the logit difference.

Usage: python bench/onnx_large.py [--layers 10] [--types fp32,int4]
Writes bench/results/onnx_large.{json,md}.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--types", default="fp32,int4")
    ap.add_argument("--out", default=str(HERE / "results" / "onnx_large"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from edgetailor.engine import resolve
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.runtimes import OnnxRuntime, TorchRuntime
    from edgetailor.exporters import get_exporter
    from transformers import AutoConfig, AutoModelForCausalLM

    demo = resolve("demo")
    tok = load_tokenizer(demo)
    cfg = AutoConfig.from_pretrained(str(demo.path))
    cfg.update({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": args.layers,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="edgetailor-onnx-large-"))
    ids = list(tok("The history of the city begins in the early Middle Ages, when")["input_ids"])
    ref = TorchRuntime(model, 2).logits(ids)
    rows = []
    try:
        for t in args.types.split(","):
            out = work / t
            t0 = time.perf_counter()
            ex = get_exporter("onnx")
            ex.export(model, tok, demo.path, out, {"type": t})
            seconds = time.perf_counter() - t0
            checked = ex.verify(out)
            with OnnxRuntime(out, threads=2) as rt:
                logits = rt.logits(ids)
            files = {p.name: p.stat().st_size for p in out.iterdir()}
            rows.append({"type": t, "export_seconds": round(seconds, 1), "files": files,
                         "total_bytes": sum(files.values()), "loaded_by": checked["loaded_by"],
                         "max_abs_logit_diff": float(np.abs(logits - ref).max()),
                         "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                         "peak_rss_mb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
            print(rows[-1], file=sys.stderr)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parameters": params,
              "fp32_bytes": params * 4, "config": {k: getattr(cfg, k) for k in (
                  "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "tie_word_embeddings")}, "rows": rows}
    m = result["machine"]
    md = ["# ONNX export of a model over 2 GB", "",
          (f"{result['when']}; {m['cpu']}, {m['logical_cores']} cores. A random Llama with the demo's vocabulary: "
           f"{params / 1e6:.0f}M parameters, {params * 4 / 1e9:.2f} GB in fp32 (protobuf cannot hold over 2 GB in "
           "one file; the weights go to model.onnx.data)."), "",
          "| type | export s | model.onnx MB | model.onnx.data MB | loaded by | max abs logit diff vs torch | top-1 agreement |",
          "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        md.append(f"| {r['type']} | {r['export_seconds']} | {r['files'].get('model.onnx', 0) / 1e6:.2f} | "
                  f"{r['files'].get('model.onnx.data', 0) / 1e6:.1f} | {r['loaded_by']} | "
                  f"{r['max_abs_logit_diff']:.2e} | {r['top1_agreement']:.3f} |")
    md += ["", ("The weights are random, so int4's logit difference and top-1 only show that the quantized graph "
                "runs; quality figures of int4 are in onnx_vs_builder.md."),
           "", "Reproduce: `.venv/bin/python bench/onnx_large.py`"]
    write_results(args.out, result, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

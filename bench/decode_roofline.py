#!/usr/bin/env python3
"""Decode speed of each GGUF against this machine's physical limit, in one run.

limit (tok/s) = measured memory bandwidth / bytes read per generated token
  bandwidth: STREAM-style numpy copy with the benchmark's thread count (engine.devices.measure_bandwidth),
             median of repeats, measured in this run
  bytes/token: every tensor byte of the file that a token's forward pass reads (all weights; of the token
             embedding only one row, unless it doubles as the output matrix) + the KV cache read at the
             position (engine.projection.gguf_info)
achieved: decode tok/s measured by EdgeTailor's benchmark (engine.benchmark: llama.cpp through llama-cpp-python,
          a fresh process per file, one warm-up, median of the repeats)

Beside each file: the engine's projected decode speed on this machine (engine.projection), the baseline (torch)
for reference, and with --windows N the perplexity, energy per token and the optimization score table.

Usage: python bench/decode_roofline.py [--model demo] [--run RUN_ID | --gguf-dir DIR] [--types F16,Q8_0,...]
Without --run/--gguf-dir the GGUFs are exported with the engine's exporter into a temporary folder.
Writes bench/results/decode_roofline.{json,md}. Run it under the shared lock: flock /tmp/edgetailor-heavy.lock ...
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results  # noqa: E402  (bench/ is on sys.path)

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def gguf_files(args, work: Path) -> dict[str, Path]:
    types = args.types.split(",")
    if args.gguf_dir or args.run:
        if args.run:
            from edgetailor.engine import find_run
            from edgetailor.engine.paths import runs_dir

            folder = find_run(runs_dir(), args.run).folder / "artifacts"
        else:
            folder = Path(args.gguf_dir)
        found = {}
        for t in types:
            hits = sorted(folder.glob(f"*-{t}.gguf"))
            if hits:
                found[t] = hits[0]
        return found
    from edgetailor.engine import resolve
    from edgetailor.engine.modeling import load_model
    from edgetailor.exporters import get_exporter

    src = resolve(args.model)
    lm = load_model(src)
    out = {}
    for t in types:
        path = work / f"model-{t}.gguf"
        print(f"exporting {t}", file=sys.stderr)
        get_exporter("gguf").export(lm.model, lm.tokenizer, src.path, path, {"type": t, "threads": args.threads})
        out[t] = path
    return out


def quality(src, files: dict, windows: int, ctx: int, threads: int) -> dict:
    """Perplexity (and KL to the baseline) of the baseline and each file on the bundled evaluation text."""
    from edgetailor.engine.evaluate import Comparison, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.text import default_evaluation_path, read_text

    lm = load_model(src)
    wins = make_windows(lm.tokenizer, read_text(default_evaluation_path()), ctx, windows)
    with Comparison(lm.model, wins, threads=threads) as cmp:
        del lm
        out = {"baseline": {"perplexity": cmp.baseline.perplexity}}
        for t, path in files.items():
            row = cmp.row(cmp.score("gguf", path))
            out[t] = {k: row[k] for k in ("perplexity", "kl", "kl_p999", "ppl_increase_pct")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--run", help="take the GGUFs of this run")
    ap.add_argument("--gguf-dir", help="take the GGUFs (*-TYPE.gguf) from this folder")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows for the opt score (0: skip)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_roofline"))
    args = ap.parse_args()

    from edgetailor.engine import resolve
    from edgetailor.engine.benchmark import benchmark_variant
    from edgetailor.engine.devices import host_profile, measure_bandwidth
    from edgetailor.engine.energy import EnergyMeter
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.probes import measure_decode_model, measure_overhead
    from edgetailor.engine.projection import kv_cache_bytes, project, variant_info
    from edgetailor.engine.scoring import score_variants
    from edgetailor.engine.text import default_evaluation_path, read_text

    work = Path(tempfile.mkdtemp(prefix="edgetailor-roofline-"))
    files = gguf_files(args, work)
    src = resolve(args.model)
    tok = load_tokenizer(src)
    prompt = list(tok(read_text(default_evaluation_path())[: args.prompt_tokens * 20]).input_ids)[: args.prompt_tokens]
    host = host_profile(refresh=True)
    meter = EnergyMeter.detect(host)
    bw_before = measure_bandwidth(args.threads)
    used = args.prompt_tokens + args.gen_tokens
    position = args.prompt_tokens + args.gen_tokens // 2            # mean position while decoding
    rows = []
    todo = [("baseline", "torch", Path(src.path))] + [(t, "gguf", p) for t, p in files.items()]
    overheads = {}
    infos = {t: variant_info(fmt, path, tokens_used=used) for t, fmt, path in todo}
    decode_models = {}
    t0 = time.perf_counter()
    for fmt in sorted({f for _, f, _ in todo}):
        types = {k for t, f, _ in todo if f == fmt for k in infos[t].storage_types()}
        decode_models[fmt] = measure_decode_model(fmt, src.path, types, prompt, args.gen_tokens, args.n_ctx,
                                                  args.threads, meter=meter, refresh=True,
                                                  log=lambda m: print(m, file=sys.stderr))
    decode_model_seconds = time.perf_counter() - t0
    for t, fmt, path in todo:
        if fmt not in overheads:
            overheads[fmt] = measure_overhead(fmt, src.path, prompt, args.gen_tokens, args.n_ctx, args.threads,
                                              meter=meter, refresh=True)
        print(f"benchmarking {t}", file=sys.stderr)
        res = benchmark_variant(fmt, path, prompt, gen_tokens=args.gen_tokens, repeats=args.repeats,
                                threads=args.threads, n_ctx=args.n_ctx, meter=meter)
        info = infos[t]
        proj = project(host, info, args.n_ctx, used, overheads[fmt], decode_model=decode_models[fmt])
        roof_only = project(host, info, args.n_ctx, used, overheads[fmt])
        kv_bpe = 2 if fmt == "gguf" else 4
        bytes_tok = info.bytes_per_token + kv_cache_bytes(info, position, kv_bpe)
        rows.append({"type": t, "runtime": fmt, "file_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
                     if fmt == "torch" else path.stat().st_size, "bytes_per_token": bytes_tok,
                     "decode_tps": res["decode_tps"], "decode_tps_runs": res["decode_tps_runs"],
                     "achieved_gbs": res["decode_tps"] * bytes_tok / 1e9, "projected_tps": proj["decode_tps"],
                     "projected_bound": proj["bound"], "projected_error_pct": 100 * (proj["decode_tps"] / res["decode_tps"] - 1),
                     "projected_method": proj["decode_method"], "type_elements": info.type_elements,
                     "head": [info.head_type, info.head_elements],
                     "roofline_only_tps": roof_only["decode_tps"],
                     "roofline_only_error_pct": 100 * (roof_only["decode_tps"] / res["decode_tps"] - 1),
                     "predicted_memory_bytes": proj["memory_bytes"], "peak_rss_os_bytes": res["peak_rss_os_bytes"],
                     "ttft_seconds": res["ttft_seconds"], "prefill_tps": res["prefill_tps"],
                     "load_seconds": res["load_seconds"], "energy_j_per_token": res["energy_j_per_token"],
                     "energy_j": res["energy_j"], "energy_provenance": res["energy_provenance"]})
    bw_after = measure_bandwidth(args.threads)
    bw = statistics.median(bw_before["runs_gbs"] + bw_after["runs_gbs"])
    for r in rows:
        r["limit_tps"] = bw * 1e9 / r["bytes_per_token"]
        r["achieved_over_limit"] = r["decode_tps"] / r["limit_tps"]
    scores = None
    if args.windows:
        q = quality(src, files, args.windows, 512, args.threads)
        for r in rows:
            r.update(q[r["type"]])
        variants = [{"name": r["type"], "metrics": {**r, "size_bytes": r["file_bytes"]}} for r in rows]
        scores = score_variants(variants)
    out = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "gen_tokens": args.gen_tokens, "repeats": args.repeats, "bandwidth_gbs": bw,
           "bandwidth_method": bw_before["method"] + "; measured before and after the decode runs, median of both",
           "bandwidth_runs_gbs": bw_before["runs_gbs"] + bw_after["runs_gbs"], "host_profile": host.to_dict(),
           "overheads": overheads, "decode_models": decode_models, "decode_model_seconds": decode_model_seconds,
           "eval_windows": args.windows, "rows": rows, "scores": scores}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Decode speed against the memory-bandwidth limit ({args.model})", "",
          (f"Machine: {out['machine']['cpu']}, {out['machine']['usable_cores']} usable cores, "
           f"{out['machine']['ram_gb']} GB RAM; {args.threads} threads; {out['when']}."),
          f"Bandwidth: {bw:.2f} GB/s ({out['bandwidth_method']}).",
          (f"Decode: {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens greedy, median of {args.repeats} "
           "runs after a warm-up, in a fresh process per variant (GGUF: llama.cpp via llama-cpp-python; baseline: "
           "torch fp32 with its KV cache)."),
          (f"Projected: the engine's decode cost model (engine.probes.measure_decode_model, measured in this run "
           f"in {decode_model_seconds:.0f} s on probes, never on the variants themselves): per token, the runtime's "
           "fixed and per-layer cost (1- and 5-layer 64-wide probes) + max(roofline on this machine's profile "
           f"({host.memory_bandwidth_gbs:g} GB/s, {host.compute_gflops:g} GFLOP/s), weights / kernel rate of "
           "their storage type (1- and 30-layer probes at the demo's own shapes, one pair per type, every matrix in "
           "that type where its rows allow)). Roofline only: the "
           "previous projection (roofline + a one-layer probe's latency), for comparison."), "",
          ("| variant | file MB | MB read / token | limit tok/s | measured tok/s | achieved / limit | effective GB/s "
           "| projected tok/s | projection error | roofline-only error |"),
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['type']} | {r['file_bytes'] / 1e6:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
                  f"{r['limit_tps']:.1f} | {r['decode_tps']:.1f} | {100 * r['achieved_over_limit']:.0f}% | "
                  f"{r['achieved_gbs']:.2f} | {r['projected_tps']:.1f} ({r['projected_bound']}) | "
                  f"{r['projected_error_pct']:+.0f}% | {r['roofline_only_error_pct']:+.0f}% |")
    md += ["", ("The limit assumes every weight byte crosses the memory bus once per token at the copy bandwidth "
                "measured here; a ratio far below 100% means the runtime is compute- or overhead-bound on this "
                "machine (the machine is shared, so figures vary between runs).")]
    if scores:
        md += ["", f"## Optimization score ({scores['formula']}; α = β = 0.5)", "",
               f"Energy: {rows[0]['energy_provenance']}",
               f"Perplexity: {args.windows} windows x 512 of the bundled evaluation text.", "",
               "| variant | perplexity | Δppl % | J/token | TTFT ms | prefill tok/s | P_c | T_c | E_c | opt | Pareto |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        srow = {x["name"]: x for x in scores["rows"]}
        for r in rows:
            x = srow[r["type"]]
            fronts = ",".join(f for f, d in scores["pareto"].items() if r["type"] in d["members"]) or "-"
            md.append(f"| {r['type']} | {r['perplexity']:.3f} | {r.get('ppl_increase_pct', 0.0):+.2f} | "
                      f"{r['energy_j_per_token']:.4f} | {1000 * r['ttft_seconds']:.0f} | {r['prefill_tps']:.0f} | "
                      f"{x['p_c']:.3f} | {x['t_c']:.3f} | {x['e_c']:.3f} | {x['opt_score']:.3f} | {fronts} |")
    write_results(args.out, out, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

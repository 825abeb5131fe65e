#!/usr/bin/env python3
"""Low-rank, weight clustering, layer sharing and early exit on the demo model, in one run.

Quality: wikitext-2 test, context 512, the first N windows (as llama-perplexity cuts them).
  * Plain-weight variants (low-rank multiplied back, k-means, shared layers) are exported to GGUF F16 by
    the project's exporter and scored in llama.cpp (llama-cpp-python) on ``--windows`` windows, with KL
    and top-1 against the untouched model's F16 GGUF (the reference every row shares).
  * Early exit has no GGUF form; it is scored in torch on ``--exit-windows`` windows (fewer: a torch pass
    is slower), with KL against the same torch model without exits (threshold 1.0).
Size: torch parameters (what the in-memory model holds: low-rank factors, shared blocks counted once),
  GGUF file bytes (what llama.cpp loads), and for k-means the palette file (packed indices + float16
  codebooks; other tensors float16) that the cluster step writes.
Speed: greedy decoding of ``--decode-tokens`` tokens after a 32-token prompt, tokens/s, median of
  ``--repeats``, ``--threads`` threads: in torch with a KV cache for the factored / shared / early-exit
  models (their real form), and in llama.cpp for the GGUF files.

Usage: flock /tmp/edgetailor-heavy.lock python bench/techniques.py [--windows 100] [--exit-windows 16]
Writes bench/results/techniques.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


from machine import machine, write_results  # noqa: E402  (bench/ is on sys.path)


def torch_decode_tps(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Greedy decoding with the model's own forward and its KV cache (the torch runtime); median tokens/s."""
    from edgetailor.engine.runtimes import TorchRuntime, decode_tokens_per_second

    return decode_tokens_per_second(TorchRuntime(model), prompt, new_tokens, repeats)["decode_tps"]


def llama_decode_tps(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float:
    """Greedy decoding in llama.cpp, one token per eval; median tokens/s."""
    from edgetailor.engine.runtimes import decode_tokens_per_second, open_runtime

    with open_runtime("gguf", path, n_ctx=512, threads=threads, all_logits=False) as rt:
        return decode_tokens_per_second(rt, prompt, new_tokens, repeats)["decode_tps"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--plain-svd-windows", type=int, default=25,
                    help="windows for plain (not activation-aware) SVD, a control row")
    ap.add_argument("--exit-windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--share-pairs", type=int, default=3)
    ap.add_argument("--heal-steps", type=int, default=16)
    ap.add_argument("--text", default=str(HERE.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--out", default=str(HERE / "results" / "techniques"))
    args = ap.parse_args()

    import copy

    import torch

    torch.set_num_threads(args.threads)
    from edgetailor.engine import resolve, text
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.engine.distill import mean_kl
    from edgetailor.engine.evaluate import Comparison, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.plain import plain_weights
    from edgetailor.engine.runtimes import EarlyExitRuntime, LlamaCppRuntime
    from edgetailor.engine.steps import cluster, early_exit, lowrank, share
    from edgetailor.exporters.gguf import verify_gguf, write_gguf

    t_start = time.perf_counter()
    src = resolve(args.model)
    loaded = load_model(src)
    tok = loaded.tokenizer
    windows = make_windows(tok, text.read_text(args.text), args.ctx, args.windows)
    prompt = windows[0][:32]
    calibration = text.read_text(None)            # the bundled calibration text, never wikitext
    seqs = token_sequences(tok, calibration, 256, 16)
    work = Path(tempfile.mkdtemp(prefix="edgetailor-techniques-"))
    rows = []

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def params(model) -> int:
        return sum(p.numel() for p in model.parameters())

    def f16_gguf(name: str, model) -> tuple[Path, float]:
        path = work / f"{name}-F16.gguf"
        t = time.perf_counter()
        write_gguf(plain_weights(model), tok, src.path, path, "F16")
        verify_gguf(path)
        return path, time.perf_counter() - t

    def gguf_row(name: str, model, path: Path, export_s: float, res, **extra) -> dict:
        row = {"variant": name, "perplexity": round(res.perplexity, 4), "eval_windows": res.windows,
               "eval_runtime": "llama.cpp (GGUF F16)", "kl_vs_base_f16": None if res.kl is None else round(res.kl, 5),
               "top1_vs_base_f16": None if res.top1 is None else round(res.top1, 4),
               "gguf_f16_bytes": path.stat().st_size, "torch_parameters": params(model),
               "torch_fp32_bytes": 4 * params(model),
               "llama_cpp_decode_tps": llama_decode_tps(path, prompt, args.decode_tokens, args.repeats, args.threads),
               "export_seconds": round(export_s, 2), **extra}
        path.unlink()
        log(f"{name}: ppl {row['perplexity']} ({res.windows} windows), {res.seconds:.0f} s eval")
        return row

    # --- baseline: its F16 GGUF in llama.cpp is the reference every variant is compared with -------------
    base_model = loaded.model
    base_path, base_export_s = f16_gguf("baseline", base_model)
    base_rt = LlamaCppRuntime(base_path, n_ctx=args.ctx, threads=args.threads)
    try:
        cmp = Comparison(base_rt, windows, threads=args.threads, folder=work / "reference-gguf")
    finally:
        base_rt.close()
    base_row = gguf_row("baseline", base_model, base_path, base_export_s, cmp.baseline,
                        torch_decode_tps=torch_decode_tps(base_model, prompt, args.decode_tokens, args.repeats))
    rows.append(base_row)

    def variant_row(name: str, model, n_windows: int, **extra) -> dict:
        path, export_s = f16_gguf(name, model)
        res = cmp.score("gguf", path, windows=n_windows)
        return gguf_row(name, model, path, export_s, res,
                        baseline_perplexity_same_windows=round(cmp.baseline_perplexity(n_windows), 4), **extra)

    # --- low-rank: activation-aware (SVD-LLM whitening) and plain SVD at 70% of the linear parameters ----
    for aware, n_win in ((True, args.windows), (False, args.plain_svd_windows)):
        model = load_model(src).model
        t = time.perf_counter()
        rep = lowrank.factorize(model, lowrank.LowRankConfig(keep=0.7, activation_aware=aware), seqs)
        secs = time.perf_counter() - t
        name = "asvd70" if aware else "svd70"
        row = variant_row(name, model, n_win, technique_seconds=round(secs, 1),
                          linear_params_before=rep["linear_params_before"],
                          linear_params_after=rep["linear_params_after"], layers_factored=rep["layers_factored"],
                          torch_decode_tps=torch_decode_tps(model, prompt, args.decode_tokens, args.repeats))
        rows.append(row)
        del model

    # --- k-means clustering, 16 centroids per tensor ------------------------------------------------------
    model = load_model(src).model
    t = time.perf_counter()
    palette = cluster.cluster_model(model, cluster.ClusterConfig(clusters=16))
    secs = time.perf_counter() - t
    pal_path = work / "palette.safetensors"
    cluster.write_palette(model, palette, 16, pal_path, work / "palette-scratch")
    clustered = sum(idx.numel() for _, idx in palette.values())
    row = variant_row("km16", model, args.windows, technique_seconds=round(secs, 1),
                      palette_file_bytes=pal_path.stat().st_size, clustered_weights=clustered,
                      bits_per_clustered_weight=round((clustered * 4 + 16 * sum(len(c) for c, _ in palette.values()))
                                                      / clustered, 4))
    rows.append(row)
    pal_path.unlink()
    del model, palette

    # --- layer sharing, healed by distillation ----------------------------------------------------------
    model = load_model(src).model
    t = time.perf_counter()
    errors = share.substitution_errors(model, seqs[:4])
    chosen = share.choose_pairs(errors, args.share_pairs)
    teacher = copy.deepcopy(model)
    for i in chosen:
        share.tie(model, i)
    held_out, train = seqs[12:], seqs[:12]
    kl_before = mean_kl(model, teacher, held_out)
    from edgetailor.engine.calibration import decoder_layers

    layers = decoder_layers(model)
    share.heal(model, teacher, train, [p for i in chosen for p in layers[i].parameters()], args.heal_steps,
               5e-5, 2)
    kl_after = mean_kl(model, teacher, held_out)
    secs = time.perf_counter() - t
    del teacher
    row = variant_row(f"share{args.share_pairs}", model, args.windows, technique_seconds=round(secs, 1),
                      tied_blocks=[[i, i + 1] for i in chosen], heal_steps=args.heal_steps,
                      heldout_kl_to_untied_before_heal=round(kl_before, 5),
                      heldout_kl_to_untied_after_heal=round(kl_after, 5),
                      torch_decode_tps=torch_decode_tps(model, prompt, args.decode_tokens, args.repeats))
    rows.append(row)
    del model

    # --- early exit ---------------------------------------------------------------------------------------
    t = time.perf_counter()
    exit_layers = early_exit.exit_layers_for(len(decoder_layers(base_model)), [0.5, 0.75])
    heads = early_exit.fit_heads(base_model, seqs, exit_layers, distill_steps=30)
    fit_s = time.perf_counter() - t
    ee = early_exit.EarlyExitModel(base_model, heads)
    no_exit = EarlyExitRuntime(ee, 1.0)            # the model itself: the reference of the thresholds below
    exits = Comparison(no_exit, windows[:args.exit_windows], threads=args.threads, folder=work / "reference-torch")
    exit_rows = []
    for threshold in (1.0, 0.9, 0.8, 0.6):
        rt = no_exit if threshold == 1.0 else EarlyExitRuntime(ee, threshold)
        res = exits.baseline if threshold == 1.0 else exits.score_runtime(rt)
        speed = early_exit.decode_speed(ee, prompt, args.decode_tokens, threshold, args.repeats)
        exit_rows.append({"threshold": threshold, "perplexity": round(res.perplexity, 4), "eval_windows": res.windows,
                          "kl_vs_no_exit": None if res.kl is None else round(res.kl, 5),
                          "top1_vs_no_exit": None if res.top1 is None else round(res.top1, 4),
                          "exit_shares": {k: round(v, 4) for k, v in rt.exit_shares().items()},
                          "exited_share": round(sum(rt.exit_shares().values()), 4),
                          "mean_blocks": round(rt.mean_blocks(), 3), **speed})
        log(f"exit {threshold}: ppl {res.perplexity:.3f}, exited {exit_rows[-1]['exited_share']}, "
            f"{speed['decode_tps']} tok/s")
    for r in exit_rows[1:]:
        r["decode_speedup_vs_no_exit"] = round(r["decode_tps"] / exit_rows[0]["decode_tps"], 4)

    out = {"model": src.display_name, "text": Path(args.text).name, "ctx": args.ctx, "threads": args.threads,
           "windows": args.windows, "plain_svd_windows": args.plain_svd_windows, "exit_windows": args.exit_windows,
           "decode_tokens": args.decode_tokens, "repeats": args.repeats, "machine": machine(),
           "rows": rows,
           "early_exit": {"exit_layers": exit_layers, "blocks": ee.n_layers, "fit_seconds": round(fit_s, 1),
                          "head_parameters": sum(p.numel() for h in heads.values() for p in h.parameters()),
                          "torch_decode_tps_hf_forward": base_row["torch_decode_tps"], "rows": exit_rows},
           "total_seconds": round(time.perf_counter() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, out, render(out))
    print(render(out))
    return 0


def _mb(b):
    return f"{b / 1e6:.1f}" if b else "-"


def _num(x, digits):
    return "reference" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "reference" if x is None else f"{100 * x:.1f}%"


def render(o: dict) -> str:
    m = o["machine"]
    base = o["rows"][0]
    lines = [
        "# Techniques: low-rank, k-means clustering, layer sharing, early exit",
        "",
        f"Model {o['model']}; {o['text']}, context {o['ctx']}; {o['threads']} threads; {m['cpu']}, "
        f"{m['logical_cores']} logical cores, {m['ram_gb']} GB RAM (shared machine; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}). Generated by `bench/techniques.py`; "
        f"total {o['total_seconds'] / 60:.1f} min.",
        "",
        "Perplexity of plain-weight variants: their GGUF F16 export run by llama.cpp; KL and top-1 against the "
        "untouched model's GGUF F16 on the same windows. Sizes: torch parameters (factors and shared blocks as the "
        "in-memory model holds them), torch fp32 bytes, GGUF F16 file, palette file (k-means). Decode: greedy "
        f"tokens/s, {o['decode_tokens']} tokens after a 32-token prompt, median of {o['repeats']}.",
        "",
        "| variant | windows | perplexity | baseline ppl, same windows | KL | top-1 | torch params | torch fp32 MB "
        "| GGUF F16 MB | other size | torch decode tok/s | llama.cpp decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in o["rows"]:
        other = f"palette {_mb(r['palette_file_bytes'])} MB" if "palette_file_bytes" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['eval_windows']} | {r['perplexity']:.3f} | "
            f"{r.get('baseline_perplexity_same_windows', base['perplexity']):.3f} | {_num(r['kl_vs_base_f16'], 4)} | "
            f"{_pct(r['top1_vs_base_f16'])} | {r['torch_parameters']:,} | {_mb(r['torch_fp32_bytes'])} | "
            f"{_mb(r['gguf_f16_bytes'])} | {other} | {r.get('torch_decode_tps', '-')} | {r['llama_cpp_decode_tps']} |")
    lines += ["", "Notes per row:", ""]
    for r in o["rows"][1:]:
        if r["variant"].endswith("svd70"):
            lines.append(f"- {r['variant']}: linear parameters {r['linear_params_before']:,} -> "
                         f"{r['linear_params_after']:,} ({100 * r['linear_params_after'] / r['linear_params_before']:.1f}%), "
                         f"{r['layers_factored']} layers factored, {r['technique_seconds']} s. The GGUF holds B @ A "
                         "multiplied back (same file size as dense); the torch model stays factored.")
        elif r["variant"] == "km16":
            lines.append(f"- km16: {r['clustered_weights']:,} decoder weights at {r['bits_per_clustered_weight']} bits "
                         "each in the palette file (4-bit index + float16 codebook); GGUF F16 stores the 16 values "
                         f"per tensor as ordinary F16 weights; {r['technique_seconds']} s.")
        elif r["variant"].startswith("share"):
            lines.append(f"- {r['variant']}: blocks tied {r['tied_blocks']} (block i+1 reuses block i); healing "
                         f"{r['heal_steps']} distillation steps moved held-out KL to the untied model "
                         f"{r['heldout_kl_to_untied_before_heal']} -> {r['heldout_kl_to_untied_after_heal']}; the GGUF "
                         f"writes each use separately; {r['technique_seconds']} s.")
    e = o["early_exit"]
    lines += [
        "", f"## Early exit (torch, {o['exit_windows']} windows)", "",
        f"Heads after blocks {e['exit_layers']} of {e['blocks']} ({e['head_parameters']:,} head parameters; the output "
        f"head is shared), fitted in {e['fit_seconds']} s. A token exits at the first head whose max softmax "
        "probability >= threshold; skipped blocks get its keys/values from the exited state (CALM state "
        "propagation). Decode speed in the early-exit loop; the model's own forward with a KV cache decodes at "
        f"{e['torch_decode_tps_hf_forward']} tok/s for comparison.",
        "",
        "| threshold | perplexity | KL vs no exit | top-1 | tokens exiting early (per head) | mean blocks run "
        "| decode tok/s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in e["rows"]:
        shares = ", ".join(f"{100 * v:.1f}% @ {k}" for k, v in r["exit_shares"].items())
        lines.append(f"| {r['threshold']} | {r['perplexity']:.3f} | {_num(r['kl_vs_no_exit'], 4)} | "
                     f"{_pct(r['top1_vs_no_exit'])} | {100 * r['exited_share']:.1f}% ({shares}) | "
                     f"{r['mean_blocks']} | {r['decode_tps']} | {r.get('decode_speedup_vs_no_exit', 1.0)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

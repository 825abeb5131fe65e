"""A mixture of experts' importance matrix: EdgeTailor's (walked one block at a time from the files) against
``llama-imatrix`` (the F32 GGUF of the same model in llama.cpp), on the same calibration tokens, side by side.

  ours       ``engine.imatrix.collect`` on the lazy model: each block's experts see the tokens the router sends
             them (``InputCollector.add_experts``); saved in llama.cpp's imatrix GGUF (``ffn_*_exps``: per expert
             the sums of x^2 and its own token count)
  llama.cpp  ``llama-imatrix -c CTX --chunks N`` on an F32 GGUF written by EdgeTailor (bit for bit the converter's)

Tiny random Qwen3-MoE and Mixtral from their transformers configs (tests/family_models.py): random weights, so the
figures say whether the two count the same tokens per expert and the same sums, not anything about quality.
Tokens: the bundled calibration text tokenized by llama.cpp and cut as llama-imatrix cuts it (BOS first where the
vocabulary adds one), so both sides see the same token ids.

At real size (``--shaped``, the Qwen3-30B-A3B-shaped model of ``bench/streaming_export.py --shapes moe``: 8 of its
48 blocks, 5.0B parameters in bf16): ``edgetailor compress MODEL`` with the imatrix step (the files walked one
block at a time) against ``llama-imatrix`` on an F16 GGUF of the model, on the bundled calibration text, 512-token
chunks; peak RSS and wall time of each whole command from GNU time.

Usage: python bench/moe_imatrix.py [--chunks 32] [--ctx 64] [--shaped]
Writes bench/results/moe_imatrix.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from machine import machine, write_results  # noqa: E402

FAMILIES = {"qwen3_moe": 0, "mixtral": 1}     # seeds as the tests use them


def chunks_as_llama_imatrix(gguf_file: Path, text: str, ctx: int, n: int) -> list[list[int]]:
    """llama-imatrix's chunks, from llama.cpp's own tokenizer (its pre-tokenizer may split a text otherwise than the
    model's tokenizer.json; here both sides must see the same tokens): the whole text tokenized (BOS first if the
    vocabulary adds it), cut every ``ctx`` tokens, each chunk's first token replaced by BOS."""
    from edgetailor.engine.runtimes import LlamaCppRuntime

    with LlamaCppRuntime(gguf_file, n_ctx=64, threads=1) as rt:
        ids = rt.tokenize(text, add_bos=True, special=True)
        bos = rt.llm.token_bos() if ids and ids[0] == rt.llm.token_bos() else None
    out = [ids[i * ctx:(i + 1) * ctx] for i in range(min(n, len(ids) // ctx))]
    for c in out:
        if bos is not None:
            c[0] = bos
    return out


def compare(ours: Path, theirs: Path) -> dict:
    """Per kind of tensor (experts or dense): the largest difference of token counts and of sums (relative to the
    tensor's largest sum), over every tensor both files hold."""
    import gguf
    import numpy as np

    a = {t.name: np.asarray(t.data, dtype=np.float64) for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: np.asarray(t.data, dtype=np.float64) for t in gguf.GGUFReader(str(theirs)).tensors}
    shapes = [n for n in b if n in a and a[n].shape != b[n].shape]
    if shapes:
        raise SystemExit(f"the two files shape {shapes[0]} differently: {a[shapes[0]].shape} vs {b[shapes[0]].shape}")
    rows: dict[str, dict] = {}
    for name in sorted(n for n in b if n.endswith(".in_sum2") and n in a):
        kind = "experts" if "_exps." in name else "dense"
        base = name[:-len(".in_sum2")]
        r = rows.setdefault(kind, {"tensors": 0, "max_count_diff": 0.0, "tokens_routed": 0.0, "max_rel_sum_diff": 0.0})
        r["tensors"] += 1
        r["max_count_diff"] = max(r["max_count_diff"], float(np.abs(a[base + ".counts"] - b[base + ".counts"]).max()))
        r["tokens_routed"] = max(r["tokens_routed"], float(b[base + ".counts"].sum()))
        r["max_rel_sum_diff"] = max(r["max_rel_sum_diff"],
                                    float(np.abs(a[name] - b[name]).max() / max(np.abs(b[name]).max(), 1e-30)))
    rows["only_llama_cpp"] = sorted({n.rsplit(".", 1)[0] for n in b} - {n.rsplit(".", 1)[0] for n in a})
    return rows


def run_family(family: str, work: Path, ctx: int, n: int, threads: int) -> dict:
    import time

    import torch
    from family_models import make_family_model
    from reference_tools import run_imatrix

    from edgetailor.engine import resolve, text
    from edgetailor.engine.imatrix import collect, save_llama_imatrix
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.exporters.gguf import write_gguf

    shared = REPO.parent / "shared" / "models" / "stories260K"
    folder = make_family_model(work / family, family, shared, resolve("demo").path, seed=FAMILIES[family])
    tokenizer = load_tokenizer(resolve(str(folder)))
    calibration = text.read_text(None)
    (work / "calibration.txt").write_text(calibration)
    lazy = LazyModel(folder)
    write_gguf(lazy, tokenizer, folder, work / "f32.gguf", "F32")
    chunks = chunks_as_llama_imatrix(work / "f32.gguf", calibration, ctx, n)
    t0 = time.perf_counter()
    save_llama_imatrix(collect(lazy, torch.tensor(chunks), hessians=False), lazy, work / "ours.gguf", chunk_size=ctx)
    ours_s = time.perf_counter() - t0
    theirs_s = run_imatrix(str(work / "f32.gguf"), str(work / "calibration.txt"), str(work / "theirs.gguf"), ctx=ctx,
                           chunks=len(chunks), threads=threads, extra_args=["--no-ppl"])
    return {"chunks": len(chunks), "ctx": ctx, "seconds": {"ours": round(ours_s, 2), "llama-imatrix": round(theirs_s, 2)},
            "comparison": compare(work / "ours.gguf", work / "theirs.gguf")}


def run_shaped(cache: Path, threads: int) -> dict:
    """The imatrix of the MoE-shaped model: ours from the files against llama-imatrix on its F16 GGUF."""
    import json

    from reference_tools import _tools
    from streaming_export import SHAPES, make_shaped_model, step_memory, timed

    from edgetailor.engine import resolve, text
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.exporters.gguf import write_gguf

    folder = make_shaped_model(cache / "qwen3_moe-moe-shaped", SHAPES["moe"], resolve("demo").path)
    with tempfile.TemporaryDirectory(prefix="edgetailor-moe-imatrix-", dir=cache) as tmp:
        work = Path(tmp)
        (work / "calibration.txt").write_text(text.read_text(None))
        recipe = work / "recipe.json"
        recipe.write_text(json.dumps({"name": "imatrix", "steps": [{"step": "imatrix", "params": {}}]}))
        ours = timed([str(Path(sys.executable).with_name("edgetailor")), "--home", str(work / "home"), "compress",
                      str(folder), "--recipe", str(recipe), "--quiet", "--threads", str(threads)], source=folder)
        ours["steps"] = step_memory(work / "home")
        f16 = work / "f16.gguf"
        tokenizer = load_tokenizer(resolve(str(folder)))
        write_gguf(LazyModel(folder), tokenizer, folder, f16, "F16")
        sequences = len(token_sequences(tokenizer, text.read_text(None), 512, None))     # as many chunks as ours
        theirs = timed([str(_tools()["imatrix"]), "-m", str(f16), "-f", str(work / "calibration.txt"), "-o",
                        str(work / "theirs.gguf"), "-c", "512", "--chunks", str(sequences), "-t", str(threads),
                        "--no-ppl"], source=None)
        f16_bytes = f16.stat().st_size
    return {"ours": ours, "llama-imatrix": theirs, "f16_gguf_bytes": f16_bytes, "chunks": sequences,
            "ratios": {"peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                       "seconds": round(ours["seconds"] / theirs["seconds"], 3)}}


def markdown(results: dict) -> str:
    m = results["machine"]
    md = ["# A mixture of experts' importance matrix: EdgeTailor vs llama-imatrix, same tokens", "",
          f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gb']} GB. Tiny random models from their "
          "transformers configs (4 experts, 2 per token, 4 blocks); the bundled calibration text tokenized by "
          "llama.cpp and cut as llama-imatrix cuts it (the same token ids on both sides).", "",
          "| family | tensors | how many | largest count difference (tokens) | tokens per tensor | largest sum difference |",
          "|---|---|---:|---:|---:|---:|"]
    for fam, r in results["families"].items():
        for kind in ("experts", "dense"):
            c = r["comparison"].get(kind)
            if c:
                md.append(f"| {fam} | {kind} | {c['tensors']} | {c['max_count_diff']:.0f} | {c['tokens_routed']:.0f} | "
                          f"{100 * c['max_rel_sum_diff']:.2f}% |")
    md += ["", "Experts: per expert, the tokens the router sent it and their sums of x^2 (llama.cpp's `ffn_*_exps` "
           "entries, [experts, inputs] and [experts, 1]). A difference of a token or two is a near-tie in routing "
           "(fp32 torch against llama.cpp's F32 kernels), which then moves that token's sums too. "
           "Only llama.cpp's file has the routers' inputs (`ffn_gate_inp`, which its quantizer keeps in F32): "
           + "; ".join(f"{f}: {len(r['comparison']['only_llama_cpp'])} tensors" for f, r in results["families"].items())
           + ".",
           "", f"Command: `python bench/moe_imatrix.py --chunks {results['chunks']} --ctx {results['ctx']}"
           + (" --shaped`" if "shaped" in results else "`")]
    if "shaped" in results:
        r = results["shaped"]
        step = next((x for x in r["ours"].get("steps", []) if x["step"] == "imatrix"), {})
        md += ["", "## At real size: Qwen3-30B-A3B's blocks (8 of 48, 5.0B parameters, bf16 files)", "",
               "| pipeline | wall s | peak RSS MB |", "|---|---:|---:|",
               f"| EdgeTailor (`compress` with the imatrix step) | {r['ours']['seconds']:.1f} | {r['ours']['peak_rss_mb']:.0f} |",
               f"| llama-imatrix on the F16 GGUF ({r['f16_gguf_bytes'] / 1e9:.1f} GB, mapped) | "
               f"{r['llama-imatrix']['seconds']:.1f} | {r['llama-imatrix']['peak_rss_mb']:.0f} |",
               f"| **ratio ours / llama.cpp** | {r['ratios']['seconds']} | {r['ratios']['peak_rss']} |", "",
               f"Pre-flight said {step.get('preflight_mb', 0):.0f} MB for the imatrix step; its worker's measured peak "
               f"{step.get('peak_rss_mb', 0):.0f} MB. llama-imatrix: {r['chunks']} chunks of 512 tokens of the same text "
               "(its own tokenizer; ours takes the text's 512-token sequences). llama.cpp's F16 file is not counted in "
               "its time (written beforehand). Random weights: memory and time, not quality."]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shaped", action="store_true", help="also the Qwen3-30B-A3B-shaped model at real size")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgetailor-bench" / "shaped"))
    ap.add_argument("--out", default=str(HERE / "results" / "moe_imatrix"))
    args = ap.parse_args()
    results = {"machine": machine(), "chunks": args.chunks, "ctx": args.ctx, "families": {}}
    for family in FAMILIES:
        with tempfile.TemporaryDirectory(prefix="edgetailor-moe-imatrix-") as work:
            results["families"][family] = run_family(family, Path(work), args.ctx, args.chunks, args.threads)
        print(family, results["families"][family], file=sys.stderr)
    if args.shaped:
        results["shaped"] = run_shaped(Path(args.cache), args.threads)
        print("shaped", results["shaped"], file=sys.stderr)
    write_results(Path(args.out), results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

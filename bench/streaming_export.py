"""HF (bf16 safetensors) -> Q4_K_M GGUF on models of real size: EdgeTailor's export against llama.cpp's pipeline,
side by side in one run.

  ours       edgetailor compress MODEL --recipe (export gguf Q4_K_M): the source read lazily, tensor by tensor,
             a BF16 intermediate, llama.cpp's quantizer in process; once without and once with the check of the
             file against the source (which writes a BF16 reference GGUF and runs both files in llama.cpp)
  llama.cpp  convert_hf_to_gguf.py --outtype f16 (the converter of the same llama-cpp-python source), then
             llama_model_quantize Q4_K_M (the library call behind llama-quantize) in a fresh process

The models are random-initialised at real shapes (Llama-3.2-1B, -3B) with the demo's 49152-token vocabulary,
written on the fly as one bf16 safetensors shard per decoder block; random weights measure memory and time,
not quality. Peak RSS and wall time come from GNU time for each whole command (RSS includes the file pages
a process has mapped, for both sides).

A mixture of experts (``--shapes moe``): Qwen3-30B-A3B's blocks, 8 of its 48, with one tensor per expert in the
files as Qwen ships them; both sides stack the experts into llama.cpp's 3-D tensors.

Other families at real shapes: ``--shapes gemma3-1b`` (Gemma 3 1B), ``phi4-mini`` (Phi-4-mini, long-rope).

Usage: python bench/streaming_export.py [--shapes 1b,3b,moe,gemma3-1b,phi4-mini] [--threads 2] [--out PATH]
Writes bench/results/streaming_export.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results  # noqa: E402

SHAPES = {   # Llama-3.2 shapes (vocabulary: the demo tokenizer's 49152)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # Qwen3-30B-A3B's blocks (128 experts of width 768, 8 per token, QK norms), 8 of its 48: 5.0B parameters,
    # each block 0.62B (the dense 3B's are 0.11B); the files keep one tensor per expert, as Qwen's do
    "moe": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_experts=128, num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, norm_topk_prob=True, tie_word_embeddings=False),
}


#: Gemma 3 1B's and Phi-4-mini's shapes (the demo's 49152-token vocabulary): a family with local/global blocks, QK
#: norms and four norms a block; one with fused QKV and gate-up, partial rotary and long-rope factors
PHI4_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
             "original_max_position_embeddings": 4096, "long_factor": [1.0 + 0.1 * i for i in range(48)],
             "short_factor": [1.0] * 48}
SHAPES.update({
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=512, tie_word_embeddings=True),
    "phi4-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75, tie_word_embeddings=True,
                      max_position_embeddings=131072, original_max_position_embeddings=4096, rope_parameters=PHI4_ROPE,
                      pad_token_id=0, tokenizer_class="GPT2Tokenizer"),
})


def make_shaped_model(folder: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A random model of ``shape`` (its ``model_type``, Llama by default) in bf16, one safetensors shard per block
    (never the whole model in memory): every tensor the family's modules hold (read off an empty skeleton), a
    mixture of experts' with one tensor per expert as its checkpoints keep them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from edgetailor.engine.architectures import arch_spec
    from edgetailor.engine.walker import skeleton

    shape = dict(shape)
    tokenizer_class = shape.pop("tokenizer_class", None)
    if (folder / "model.safetensors.index.json").exists():
        return _with_tokenizer_class(folder, tokenizer_class)
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    model_type = shape.pop("model_type", "llama")
    cfg = AutoConfig.for_model(model_type, **{"max_position_embeddings": 8192, "rms_norm_eps": 1e-5, **shape},
                               vocab_size=tok_cfg["vocab_size"], bos_token_id=tok_cfg.get("bos_token_id"),
                               eos_token_id=tok_cfg.get("eos_token_id"), dtype="bfloat16")
    model = skeleton(cfg)
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    norm = 1.0 - arch_spec(model_type).gguf_norm_shift     # Gemma's norms scale by 1 + w: w = 0 is a unit scale

    def value(name: str, size: tuple):
        return torch.full(size, norm, dtype=torch.bfloat16) if len(size) == 1 and "norm" in name else rnd(*size)

    # an empty skeleton does not tie its head: a tied model's checkpoint holds the embedding only (with a head of
    # its own beside it, transformers would use that head and llama.cpp's converter would drop it)
    state = {n: tuple(p.shape) for n, p in model.named_parameters()
             if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    n = cfg.num_hidden_layers
    names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
    index = {}
    for i in range(n + 1):
        p = f"model.layers.{i}."
        mine = {k: v for k, v in state.items() if k.startswith(p)} if i < n else \
            {k: v for k, v in state.items() if not k.startswith("model.layers.")}
        t = {k: value(k, v) for k, v in mine.items() if ".experts." not in k}
        if any(".experts." in k for k in mine):
            t.update(_experts(cfg, p, rnd))
        save_file(t, tmp / names[i], metadata={"format": "pt"})
        index.update({k: names[i] for k in t})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "edgetailor.json"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return _with_tokenizer_class(folder, tokenizer_class)


def _with_tokenizer_class(folder: Path, tokenizer_class: str | None) -> Path:
    """The tokenizer class the family's checkpoints declare (Phi-4-mini: GPT2Tokenizer, which tells llama.cpp's
    converter to read the BPE vocabulary instead of looking for a SentencePiece model)."""
    if tokenizer_class:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": tokenizer_class}))
    return folder


def _experts(cfg, p: str, rnd) -> dict:
    """A block's experts as their checkpoints store them: each expert's three matrices apart."""
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    out = {}
    for e in range(cfg.num_experts):
        out.update({f"{p}mlp.experts.{e}.gate_proj.weight": rnd(inter, h), f"{p}mlp.experts.{e}.up_proj.weight": rnd(inter, h),
                    f"{p}mlp.experts.{e}.down_proj.weight": rnd(h, inter)})
    return out


def warm(folder: Path | None) -> None:
    """Read the source's files once, so every measured command starts with them in the page cache (the first
    command of a run would otherwise pay for the disk alone)."""
    for f in sorted(Path(folder).glob("*.safetensors")) if folder else ():
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def timed(cmd: list[str], env: dict | None = None, source: Path | None = None) -> dict:
    """Wall seconds and peak RSS (MB) of a whole command, from GNU time; ``source``: the model's folder, read into
    the page cache first (``warm``)."""
    warm(source)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as fh:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", fh.name, *cmd], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        wall, kb = fh.read().split()[-2:]
    return {"seconds": float(wall), "peak_rss_mb": round(int(kb) / 1024, 1)}


def step_memory(home: Path) -> list[dict]:
    """Each step of the newest run under ``home``: its worker's measured peak RSS and pre-flight's figures (MB)."""
    newest = max((home / "runs").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    mb = 2 ** 20
    return [{"step": s["name"], "peak_rss_mb": round((s.get("ram_peak_bytes") or 0) / mb, 1),
             "peak_anon_mb": round((s.get("ram_peak_anon_bytes") or 0) / mb, 1),
             "preflight_mb": round((s.get("ram_preflight_bytes") or 0) / mb, 1),
             "preflight_mapped_mb": round((s.get("ram_preflight_mapped_bytes") or 0) / mb, 1)}
            for s in json.loads(newest.read_text())["steps"]]


def preflight_rows(rows: dict) -> list[str]:
    """Markdown rows: pre-flight's figure (held + mapped) against the step's measured peak, per run and step, and
    what it must keep resident against the peak not file-backed (where the run recorded it)."""
    out = []
    for label, r in rows.items():
        for s in r.get("steps", []):
            predicted = s["preflight_mb"] + s["preflight_mapped_mb"]
            mapped = f" + {s['preflight_mapped_mb']:.0f} mapped" if s["preflight_mapped_mb"] else ""
            anon = s.get("peak_anon_mb")
            resident = f"{anon:.0f} | {(s['preflight_mb'] / anon - 1) * 100:+.0f}%" if anon else "- | -"
            out.append(f"| {label} | {s['step']} | {s['preflight_mb']:.0f}{mapped} | {s['peak_rss_mb']:.0f} | "
                       f"{(predicted / s['peak_rss_mb'] - 1) * 100:+.0f}% | {resident} |")
    return out


QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def run_shape(name: str, folder: Path, work: Path, threads: int) -> dict:
    from edgetailor.exporters.hf_converter import SCRIPT, converter_dir

    py = sys.executable
    rows = {}
    for verify in (False, True):
        recipe = work / f"recipe-{verify}.json"
        recipe.write_text(json.dumps({"name": "q4", "steps": [
            {"step": "export", "params": {"format": "gguf", "types": ["Q4_K_M"], "verify": verify}}]}))
        cmd = [str(Path(py).with_name("edgetailor")), "--home", str(work / "home"), "compress", str(folder),
               "--recipe", str(recipe), "--quiet", "--threads", str(threads)]
        label = "edgetailor" + (" + check" if verify else "")
        rows[label] = timed(cmd, source=folder)
        rows[label]["steps"] = step_memory(work / "home")
    f16 = work / "llama-f16.gguf"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    conv = timed([py, str(converter_dir() / SCRIPT), str(folder), "--outfile", str(f16), "--outtype", "f16"], env, source=folder)
    quant = timed([py, "-c", QUANTIZE, str(f16), str(work / "llama-q4.gguf"), str(threads)])
    rows["llama.cpp"] = {"seconds": round(conv["seconds"] + quant["seconds"], 2),
                         "peak_rss_mb": max(conv["peak_rss_mb"], quant["peak_rss_mb"]),
                         "convert": conv, "quantize": quant}
    f16.unlink(missing_ok=True)
    ours, ref = rows["edgetailor"], rows["llama.cpp"]
    return {"rows": rows, "ratios": {"peak_rss": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3),
                                     "seconds": round(ours["seconds"] / ref["seconds"], 3)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgetailor-bench" / "shaped"))
    ap.add_argument("--out", default=str(HERE / "results" / "streaming_export"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    if args.markdown_only:
        results = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_results(Path(args.out), results, markdown(results, ",".join(results["shapes"]), args.out))
        return 0
    from edgetailor.engine import resolve

    tokenizer_dir = resolve("demo").path
    results = {"machine": machine(), "threads": args.threads, "shapes": {}}
    for name in args.shapes.split(","):
        family = SHAPES[name].get("model_type", "llama")
        folder = make_shaped_model(Path(args.cache) / f"{family}-{name}-shaped", SHAPES[name], tokenizer_dir)
        with tempfile.TemporaryDirectory(prefix="edgetailor-stream-", dir=Path(args.cache)) as work:
            print(f"{name}: measuring", file=sys.stderr)
            results["shapes"][name] = run_shape(name, folder, Path(work), args.threads)
        print(json.dumps(results["shapes"][name]), file=sys.stderr)
    write_results(Path(args.out), results, markdown(results, args.shapes, args.out))
    return 0


def markdown(results: dict, shapes: str, out: str) -> str:
    """The results as the committed .md (``--markdown-only`` rewrites it from the .json)."""
    threads = results["threads"]
    load = results["machine"].get("load_average_at_start")
    md = ["# HF (bf16) -> Q4_K_M GGUF: EdgeTailor vs llama.cpp's pipeline", "",
          f"Machine: {results['machine']['cpu']}, {results['machine']['logical_cores']} logical cores, "
          f"{results['machine']['ram_gb']} GB; threads {threads}. Random weights at real shapes.", "",
          "| shape | pipeline | wall s | peak RSS MB |", "|---|---|---|---|"]
    for name, r in results["shapes"].items():
        for k, v in r["rows"].items():
            md.append(f"| {name} | {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} |")
        md.append(f"| {name} | **ratio ours / llama.cpp** | {r['ratios']['seconds']} | {r['ratios']['peak_rss']} |")
    md += [""] + [f"{name}: llama.cpp's parts: convert {r['rows']['llama.cpp']['convert']['seconds']:.1f} s / "
                  f"{r['rows']['llama.cpp']['convert']['peak_rss_mb']:.0f} MB, quantize "
                  f"{r['rows']['llama.cpp']['quantize']['seconds']:.1f} s / "
                  f"{r['rows']['llama.cpp']['quantize']['peak_rss_mb']:.0f} MB." for name, r in results["shapes"].items()]
    md += ["", "Pre-flight (`edgetailor inspect`) against the measured peak of each step in the run's worker (VmHWM "
           "from the step's start, recorded in the run's manifest; mapped: the check's 16-bit reference GGUF, whose "
           "pages count in RSS while llama.cpp runs it):", "",
           "| shape, pipeline | step | pre-flight MB | measured peak MB | error | of it not file-backed | "
           "pre-flight's held figure against it |", "|---|---|---:|---:|---:|---:|---:|"]
    md += [row for name, r in results["shapes"].items()
           for row in preflight_rows({f"{name} {k}": v for k, v in r["rows"].items()})]
    md += ["", "Ours is one process (Python, torch and transformers imported, ~0.4 GB before any weight): llama.cpp's "
           "quantizer types a probe of the model (32 zero rows per matrix), then each tensor is read from the "
           "safetensors a slice of rows at a time and encoded by llama.cpp's own `ggml_quantize_chunk` (2 threads) "
           "as it is written: no intermediate file, no tensor whole in float32 (llama-quantize converts each whole). "
           "\"+ check\" adds writing a 16-bit reference GGUF and running it and the Q4_K_M file in llama.cpp (both "
           "mapped: their file pages count in RSS).", "",
           "Every command starts with the source's files in the page cache (read once before it).", "",
           f"Load average at start {load[0]:.2f}." if load else "Load average at start: not recorded.", "",
           *([results["machine"]["note"] + ".", ""] if results["machine"].get("note") else []),
           "Targets (issue 14): peak RSS <= 0.8x, wall time <= 1.2x llama.cpp's convert + quantize.",
           "Reproduce: `.venv/bin/python bench/streaming_export.py"
           + ("" if shapes == "1b,3b" else f" --shapes {shapes} --out {Path(out).resolve().relative_to(REPO)}") + "`", ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())

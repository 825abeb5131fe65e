#!/usr/bin/env python3
"""Pruning and distillation on the demo model: Wanda vs magnitude, and the Minitron preset.

Part "pruning": the demo model pruned by prune.magnitude and prune.wanda at 50% unstructured sparsity and
with the 2:4 pattern (per output row, the same comparison group for both), each exported as GGUF F16 by
the engine's exporter and scored in llama.cpp (llama-cpp-python) by the engine's evaluator: wikitext-2
test, context 512, first N windows. The baseline is the unpruned model's GGUF F16, scored the same way;
KL and top-1 are against it.

Part "minitron": the bundled preset ``minitron`` (width pruning then distillation) run as a job, and the
same recipe without its distill step; both exported F16 GGUF and scored like the others. The distillation
time is the distill step's own wall time from the run record.

Usage: flock /tmp/edgetailor-heavy.lock python bench/pruning_distill.py [--part pruning|minitron|all]
       [--windows 100] [--threads 2]
Writes bench/results/pruning_distill.{json,md} (a part re-run replaces only its own rows).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Sleep, don't spin, while waiting for work: torch's OpenMP threads spinning on a shared 2-core machine
# slow every step many times over. Set before torch or llama.cpp start their thread pools.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine, write_results  # noqa: E402  (bench/ is on sys.path)

WIKITEXT = HERE.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
PRUNINGS = [("magnitude 50%", "prune.magnitude", {"sparsity": 0.5}),
            ("wanda 50%", "prune.wanda", {"sparsity": 0.5}),
            ("magnitude 2:4", "prune.magnitude", {"pattern": "2:4"}),
            ("wanda 2:4", "prune.wanda", {"pattern": "2:4"})]


class Scorer:
    """Export a model as GGUF F16 and score it in llama.cpp on the fixed windows."""

    def __init__(self, tokenizer, tokenizer_dir, windows, ctx, threads, work: Path):
        self.tokenizer, self.tokenizer_dir, self.windows = tokenizer, tokenizer_dir, windows
        self.ctx, self.threads, self.work = ctx, threads, work
        self.comparison = None

    def score_file(self, path: Path, record_reference: bool = False) -> dict:
        """A GGUF in llama.cpp against the reference (``record_reference``: this file is the reference)."""
        from edgetailor.engine.evaluate import Comparison
        from edgetailor.engine.runtimes import open_runtime

        if record_reference:
            with open_runtime("gguf", path, n_ctx=self.ctx, threads=self.threads) as rt:
                self.comparison = Comparison(rt, self.windows, self.threads, folder=self.work / "reference")
            r = self.comparison.baseline
        else:
            r = self.comparison.score("gguf", path)
        return {"perplexity": round(r.perplexity, 4), "kl": None if r.kl is None else round(r.kl, 5),
                "top1": None if r.top1 is None else round(r.top1, 4), "size_mb": round(path.stat().st_size / 1e6, 2),
                "eval_seconds": r.seconds}

    def score_model(self, model, name: str, record_reference: bool = False) -> dict:
        from edgetailor.exporters import get_exporter

        out = self.work / f"{name.replace(' ', '_').replace(':', '_').replace('%', '')}.gguf"
        get_exporter("gguf").export(model, self.tokenizer, self.tokenizer_dir, out, {"type": "F16"})
        row = self.score_file(out, record_reference)
        out.unlink()
        return row


def run_recipe(steps: list[dict], runs_root: Path, threads: int) -> dict:
    from edgetailor.engine.job import JobSpec, run_job

    rec = run_job(JobSpec(recipe={"name": "bench", "steps": steps}, source="demo",
                          options={"threads": threads}, runs_root=str(runs_root)))
    if rec.manifest["status"] != "succeeded":
        raise SystemExit(f"recipe failed: {rec.manifest.get('error')}")
    return rec.manifest | {"folder": str(rec.folder)}


def non_embedding_params(model) -> int:
    from edgetailor.engine.architectures import count_parameters

    return count_parameters(model.config.to_dict())["non_embedding"]


def part_pruning(scorer, threads, runs_root, rows: dict, save) -> dict:
    export_f16 = {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}
    for label, step, params in PRUNINGS:
        print(f"{label} ...", file=sys.stderr)
        manifest = run_recipe([{"step": step, "params": params}, export_f16], runs_root, threads)
        row = scorer.score_file(Path(manifest["folder"]) / manifest["variants"][-1]["path"])
        entry = manifest["steps"][0]
        row.update(step=step, params=params, prune_seconds=entry["seconds"], sparsity=entry["report"]["sparsity"],
                   sparsity_by_type=entry["report"]["sparsity_by_type"])
        rows[label] = row
        save()
        print(f"  {row}", file=sys.stderr)
        shutil.rmtree(manifest["folder"], ignore_errors=True)
    return rows


def part_minitron(scorer, threads, runs_root, distill_minutes: float | None, rows: dict, save) -> dict:
    from edgetailor.engine.recipe import load_preset

    preset = load_preset("minitron")
    transforms = [s.to_dict() for s in preset.steps if s.name not in ("export", "evaluate")]
    if distill_minutes is not None:       # smoke runs only; the committed figures use the preset as it is
        for s in transforms:
            if s["step"] == "distill":
                s["params"]["max_minutes"] = distill_minutes
    export_f16 = {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}
    rows["_preset"] = preset.to_dict()
    for label, steps in (("minitron without distillation", [s for s in transforms if s["step"] != "distill"]),
                         ("minitron preset (distilled)", transforms)):
        print(f"{label} ...", file=sys.stderr)
        t0 = time.perf_counter()
        manifest = run_recipe(steps + [export_f16], runs_root, threads)
        wall = round(time.perf_counter() - t0, 1)
        variant = manifest["variants"][-1]
        row = scorer.score_file(Path(manifest["folder"]) / variant["path"])
        reports = {s["name"]: s.get("report", {}) for s in manifest["steps"]}
        width = reports.get("prune.width") or reports.get("prune.depth") or {}
        distill = reports.get("distill")
        row.update(steps=[s["step"] for s in steps], job_seconds=wall,
                   non_embedding_removed=width.get("non_embedding_removed"),
                   non_embedding_after=width.get("non_embedding_after"),
                   non_embedding_before=width.get("non_embedding_before"))
        if distill:
            step_seconds = next(s["seconds"] for s in manifest["steps"] if s["name"] == "distill")
            row.update(distill_step_seconds=step_seconds, distill=distill)
        rows[label] = row
        save()
        print(f"  {row}", file=sys.stderr)
        shutil.rmtree(manifest["folder"], ignore_errors=True)
    return rows


def markdown(res: dict) -> str:
    base = res["baseline"]["perplexity"]
    lines = ["# Pruning and distillation on the demo model", "",
             (f"Model: {res['model']}; text: wikitext-2-raw test, context {res['ctx']}, first {res['windows']} windows "
              f"({res['tokens_scored']} scored tokens). Every model is exported as GGUF F16 by EdgeTailor and scored "
              f"in llama.cpp by EdgeTailor's evaluator; KL and top-1 are against the unpruned F16 model."),
             (f"Machine: {res['machine']['cpu']}, {res['machine']['logical_cores']} cores, {res['threads']} threads. "
              f"Written by `bench/pruning_distill.py` on {res['date']}.")]
    for part, when in res.get("parts_run", {}).items():
        load = when["machine"].get("load_average_at_start")
        lines.append(f"Rows of part '{part}' measured {when['date']} on {when['machine']['cpu']}"
                     + (f" (load average at start {', '.join(f'{x:.2f}' for x in load)})." if load else "."))
    lines += ["",
             "| variant | sparsity / params removed | perplexity | ratio to baseline | KL | top-1 |",
             "|---|---|---|---|---|---|",
             f"| baseline (F16) | 0 | {base:.3f} | 1.000 | | |"]
    for label, row in res.get("pruning", {}).items():
        lines.append(f"| {label} | {row['sparsity']:.3f} of linear weights | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / base:.3f} | {row['kl']:.4f} | {row['top1']:.3f} |")
    mini = res.get("minitron", {})
    for label, row in mini.items():
        if label.startswith("_"):
            continue
        lines.append(f"| {label} | {row['non_embedding_removed']:.3f} of non-embedding params | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / base:.3f} | {row['kl']:.4f} | {row['top1']:.3f} |")
    if "minitron preset (distilled)" in mini and "minitron without distillation" in mini:
        dist = mini["minitron preset (distilled)"]
        undist = mini["minitron without distillation"]
        ratio = dist["perplexity"] / base
        half = dist["perplexity"] / undist["perplexity"]
        d = dist["distill"]
        lines += ["", "## Minitron target", "",
                  (f"- Non-embedding parameters: {dist['non_embedding_before']:,} -> {dist['non_embedding_after']:,} "
                   f"({100 * dist['non_embedding_removed']:.1f}% removed)."),
                  (f"- Distillation: {d['steps']} steps, {d['tokens_trained']:,} tokens, training {d['seconds']:.0f} s; "
                   f"the whole distill step (teacher load, held-out KL) took {dist['distill_step_seconds']:.0f} s wall. "
                   f"Held-out KL to the teacher (calibration-text tail): {d['heldout_kl_before']} -> "
                   f"{d['heldout_kl_after']}."),
                  f"- Perplexity ratio to baseline: {ratio:.3f} (target <= 1.35: {'met' if ratio <= 1.35 else 'NOT met'}).",
                  f"- Distilled / undistilled perplexity: {half:.3f} (target <= 0.5: {'met' if half <= 0.5 else 'NOT met'}).",
                  "", "Preset steps: " + ", ".join(f"`{s['step']}` {json.dumps(s['params'])}"
                                                   for s in mini["_preset"]["steps"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("pruning", "minitron", "all"), default="all")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(WIKITEXT))
    ap.add_argument("--out", default=str(HERE / "results" / "pruning_distill"))
    ap.add_argument("--distill-minutes", type=float, default=None, help="override the preset (smoke runs only)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from edgetailor.engine import resolve
    from edgetailor.engine.evaluate import make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.text import read_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    res = json.loads(json_path.read_text()) if json_path.exists() else {}
    src = resolve("demo")
    lm = load_model(src)
    windows = make_windows(lm.tokenizer, read_text(args.text), args.ctx, args.windows)
    work = Path(tempfile.mkdtemp(prefix="edgetailor-prune-bench-"))
    try:
        scorer = Scorer(lm.tokenizer, src.path, windows, args.ctx, args.threads, work)
        print("baseline ...", file=sys.stderr)
        baseline = scorer.score_model(lm.model, "baseline", record_reference=True)
        non_embedding = non_embedding_params(lm.model)
        del lm
        res.update(model=src.display_name, ctx=args.ctx, windows=len(windows),
                   tokens_scored=len(windows) * (args.ctx - args.ctx // 2 - 1), threads=args.threads,
                   machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   baseline=baseline | {"non_embedding_params": non_embedding})
        runs_root = work / "runs"

        def save():
            write_results(out, res, markdown(res))

        parts = res.setdefault("parts_run", {})
        for part in (("pruning", "minitron") if args.part == "all" else (args.part,)):
            parts[part] = {"date": res["date"], "machine": res["machine"]}
        if args.part in ("pruning", "all"):
            part_pruning(scorer, args.threads, runs_root, res.setdefault("pruning", {}), save)
        if args.part in ("minitron", "all"):
            part_minitron(scorer, args.threads, runs_root, args.distill_minutes, res.setdefault("minitron", {}), save)
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

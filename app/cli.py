"""The ``edgetailor`` command line.

    edgetailor inspect [MODEL]                     what the model is, what works on it, what a job needs
    edgetailor compress [MODEL] --preset NAME      run a recipe in a worker process, with progress bars
    edgetailor compress [MODEL] --recipe FILE
    edgetailor evaluate VARIANT [--baseline MODEL] perplexity / KL / top-1 of one GGUF (or ONNX) file
    edgetailor runs [ID]                           list runs, or show one
    edgetailor steps | presets                     what recipes can use
    edgetailor report RUN_ID [--device NAME]       measured/projected figures, fit, opt score, Pareto fronts
    edgetailor devices                             the device profiles (bundled, yours, this machine)

MODEL is "demo" (default), a Hugging Face folder, a .gguf file, or a hub id (with --online).

Exit codes: 0 success, 1 the run failed, 2 bad input (the message says what to fix), 3 the job does not
fit this machine, 4 not supported yet (a model family, or a step for it), 130 cancelled (Ctrl-C, a closed
terminal, SIGTERM).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_FIT, EXIT_UNSUPPORTED, EXIT_CANCELLED = 0, 1, 2, 3, 4, 130


def _add_source_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default="demo",
                       help="'demo' (default), a Hugging Face folder, a .gguf file, or a hub id")
    p.add_argument("--online", action="store_true", help="allow downloading a hub id (no network use otherwise)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a model folder run its own Python code (off by default)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--eval-text", help="evaluation text file (default: the bundled evaluation text)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")


# Long by design: the CLI's whole surface (every subcommand and flag) as one declarative table.
def build_parser() -> argparse.ArgumentParser:
    # long: one declarative table of every command and option, read top to bottom like --help
    ap = argparse.ArgumentParser(prog="edgetailor", description="Tailor language models to edge devices.")
    ap.add_argument("--home", help="data folder (default: the platform's user data folder, or $EDGETAILOR_HOME)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="pre-flight check of a model")
    _add_source_args(p)
    p.add_argument("--preset", help="also estimate what this preset needs")
    p.add_argument("--recipe", help="also estimate what this recipe file needs")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("compress", aliases=["run"], help="run a recipe or preset on a model")
    _add_source_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="a bundled recipe (edgetailor presets); default gguf-ladder")
    g.add_argument("--recipe", help="a recipe file (.yaml or .json)")
    _add_eval_args(p)
    p.add_argument("--calibration-text", help="calibration text file (default: the bundled calibration text)")
    p.add_argument("--runs-dir", help="where run folders go (default: <data folder>/runs)")
    p.add_argument("--json", action="store_true", help="print the final manifest as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("fit", help="search under a device budget, build the best candidates, recommend one")
    _add_source_args(p)
    p.add_argument("--device", default="this-machine", help="device profile (edgetailor devices)")
    p.add_argument("--context", type=int, default=2048, help="the app's context length, tokens (default 2048)")
    p.add_argument("--max-memory", help="memory limit at that context, e.g. 1.5GB or 800MB (default: the device's)")
    p.add_argument("--min-tps", type=float, help="slowest acceptable decode on the device, tok/s")
    p.add_argument("--max-j-per-token", type=float, help="energy limit, J/token (estimated)")
    p.add_argument("--max-ppl-increase", type=float, help="max perplexity increase, percent")
    p.add_argument("--max-kl", type=float, help="max mean KL to the source model")
    p.add_argument("--kv-types", default="f16,q8_0,q4_0", help="KV-cache types to consider (default f16,q8_0,q4_0)")
    p.add_argument("--formats", default="gguf,onnx", help="file formats to consider: gguf (llama.cpp, Ollama, LM "
                                                          "Studio), onnx (onnxruntime) (default gguf,onnx)")
    p.add_argument("--onnx-schemes", help="ONNX quantizations to consider, e.g. int4-32,int4-32-head8,int8 "
                                           "(int4 at a block size of 32/64/128, -head8 for an 8-bit output head; "
                                           "default: all)")
    p.add_argument("--width", help="also consider narrower models: shares of every block's MLP channels removed, "
                                    "each healed by distillation before it is quantized, e.g. 0.25 or 0.125,0.25")
    p.add_argument("--heal-minutes", type=float, help="distillation time healing each narrower model (default 3)")
    p.add_argument("--fresh", action="store_true", help="measure the model again instead of reusing what an earlier "
                                                      "fit of it measured with the same calibration")
    p.add_argument("--candidates", type=int, default=3, help="files built and measured (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="search / build / refit rounds (default 2)")
    p.add_argument("--trials", type=int, default=120, help="predicted points per round (default 120)")
    p.add_argument("--max-sequences", type=int, help="calibration sequences (default: all the text gives)")
    p.add_argument("--workers", type=int, help="build and measure candidates in this many local worker processes")
    p.add_argument("--ray", metavar="ADDRESS", help="build and measure candidates as Ray tasks on this cluster "
                                                   "('auto', host:6379, ray://host:10001, or 'local' for a new one)")
    p.add_argument("--out", default=".", help="where the recommended bundle is written (default: here)")
    _add_eval_args(p)
    p.add_argument("--calibration-text", help="calibration text file (default: the bundled calibration text)")
    p.add_argument("--runs-dir", help="where run folders go (default: <data folder>/runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="evaluate one variant file against a baseline model")
    p.add_argument("variant", help="a .gguf file (or an ONNX folder)")
    p.add_argument("--baseline", default="demo", help="the model it came from (default: demo)")
    _add_source_args(p, positional=False)
    _add_eval_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("runs", help="list runs, or show one")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--runs-dir")
    p.add_argument("--json", action="store_true")

    sub.add_parser("steps", help="list the recipe steps and their parameters")
    sub.add_parser("presets", help="list the bundled recipes")

    p = sub.add_parser("report", help="a run's variants against a device budget: fit, opt score, Pareto fronts")
    p.add_argument("run_id")
    p.add_argument("--runs-dir")
    p.add_argument("--device", default="this-machine", help="device profile (edgetailor devices)")
    p.add_argument("--max-memory-mb", type=float, help="memory limit (default: the device's memory for apps)")
    p.add_argument("--min-decode-tps", type=float)
    p.add_argument("--max-j-per-token", type=float)
    p.add_argument("--max-ppl-increase", type=float, help="max perplexity increase, percent")
    p.add_argument("--max-kl", type=float)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of time in the optimization score")
    p.add_argument("--beta", type=float, default=0.5, help="weight of energy in the optimization score")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("devices", help="list the device profiles")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.home:
        os.environ["EDGETAILOR_HOME"] = str(Path(args.home).expanduser().resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from edgetailor.engine.atomic import sweep_stale_temp
    from edgetailor.engine.errors import EdgeTailorError

    sweep_stale_temp()          # temporary folders of EdgeTailor processes that were killed
    try:
        return COMMANDS[args.command](args)
    except EdgeTailorError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:                     # a full disk or a read-only folder in this process, else a bug
        from edgetailor.engine.job import machine_error

        found = machine_error(exc)
        if found is None:
            raise
        print(f"error: {found['problem']}\nfix: {found['fix']}", file=sys.stderr)
        return found["exit_code"]


def _recipe(args):
    from edgetailor.engine import Recipe, load_preset

    if getattr(args, "recipe", None):
        return Recipe.load(args.recipe)
    return load_preset(getattr(args, "preset", None) or "gguf-ladder")


def cmd_inspect(args) -> int:
    from edgetailor.engine import preflight, resolve

    src = resolve(args.model, trust_remote_code=args.trust_remote_code, allow_network=args.online,
                  progress=lambda m: print(m, file=sys.stderr))
    recipe = _recipe(args) if (args.preset or args.recipe) else None
    rep = preflight(src, recipe)
    if args.json:
        print(json.dumps({"source": src.to_dict(), **rep.to_dict()}, indent=2))
        return _inspect_exit(rep)
    gb = 1e9          # decimal, as the GUI and the device profiles' bandwidths
    print(f"model        {src.display_name}  ({src.kind}: {src.path})")
    print(f"architecture {rep.model_type}  {'supported' if rep.supported else 'NOT supported'}  {rep.architecture_note}")
    p = rep.parameters
    print(f"parameters   {p['total'] / 1e6:.1f} M  (non-embedding {p.get('non_embedding', 0) / 1e6:.1f} M)")
    print(f"weights      {rep.weights_bytes / 1e6:.1f} MB  {rep.dtype}   context {rep.context_length}")
    print("techniques   " + ", ".join(f"{k}" if v == "yes" else f"{k} (no)" for k, v in rep.techniques.items()))
    print("exporters    " + ", ".join(f"{k}" if v == "yes" else f"{k} (no)" for k, v in rep.exporters.items()))
    print(f"RAM          needs ~{rep.ram_needed_bytes / gb:.2f} GB, {rep.ram_available_bytes / gb:.1f} GB available")
    print(f"disk         needs ~{rep.disk_needed_bytes / gb:.2f} GB, {rep.disk_available_bytes / gb:.1f} GB free")
    for i, need in enumerate(rep.steps, 1):
        mapped = f" + {need['mapped_bytes'] / gb:.2f} GB mapped" if need.get("mapped_bytes") else ""
        print(f"{'RAM per step' if i == 1 else '':12s} {i}. {need['step']:24s} "
              f"~{need['ram_bytes'] / gb:.2f} GB{mapped}  {need['how']}")
    if any(n.get("mapped_bytes") for n in rep.steps):
        print(f"{'':12s} mapped: a file llama.cpp runs to check, evaluate or benchmark (resident while it runs; "
              "read from disk again when RAM is short, slower)")
    for note in rep.warnings:
        print(f"note         {note}")
    if rep.features:
        print("family       " + ", ".join(rep.features))
    for refusal in rep.refusals:
        print(f"NOT SUPPORTED: {refusal}")
    for prob in rep.problems:
        print(f"DOES NOT FIT: {prob}")
    if not rep.fits:
        from edgetailor.engine.errors import EdgeTailorError

        try:
            rep.raise_if_not_fits()
        except EdgeTailorError as exc:
            print(f"error: {exc.problem}\nfix: {exc.fix}", file=sys.stderr)
    return _inspect_exit(rep)


def _inspect_exit(rep) -> int:
    if rep.refusals:
        return EXIT_UNSUPPORTED
    return EXIT_OK if rep.fits else EXIT_NO_FIT


def cmd_compress(args) -> int:
    recipe = _recipe(args)
    rec = _run(args, recipe)
    if args.json:
        print(json.dumps(rec.manifest, indent=2))
    else:
        print_steps(rec.manifest)
        print_variants(rec.manifest)
    return _exit_code(rec.manifest)


def _run(args, recipe):
    """Start the recipe as a job, show its progress until it ends (Ctrl-C, SIGHUP, SIGTERM cancel it)."""
    from edgetailor.engine import JobSpec, start_job
    from edgetailor.engine.runs import RunRecord

    options = {"eval_ctx": args.ctx, "eval_windows": args.windows, "eval_text": args.eval_text,
               "calibration_text": args.calibration_text, "threads": args.threads}
    job = JobSpec(recipe=recipe.to_dict(), source=args.model, options=options, runs_root=args.runs_dir,
                  trust_remote_code=args.trust_remote_code, allow_network=args.online)
    view = _ProgressView(quiet=args.quiet)
    with _interrupts_cancel():       # Ctrl-C, a closed terminal (SIGHUP) and SIGTERM all cancel the run
        handle = start_job(job)
        try:
            _say(f"run {handle.run_id}: {recipe.name} on {args.model}  ->  {handle.folder}")
            for ev in handle.events():
                view.show(ev)
        except KeyboardInterrupt:
            _say("\ncancelling...")
            handle.cancel()
            for ev in handle.events():
                view.show(ev)
    view.close()
    if not (handle.folder / "manifest.json").exists() and handle.error:      # the run folder could not be made
        from edgetailor.engine.errors import EdgeTailorError

        err = EdgeTailorError(handle.error["problem"], handle.error.get("fix", ""))
        err.exit_code = handle.error.get("exit_code", EXIT_FAILED)
        raise err
    return RunRecord.open(handle.folder)


def _exit_code(manifest: dict) -> int:
    status = manifest["status"]
    if status == "succeeded":
        return EXIT_OK
    err = manifest.get("error") or {}
    print(f"{status}: {err.get('problem', '')}", file=sys.stderr)
    if err.get("fix"):
        print(f"fix: {err['fix']}", file=sys.stderr)
    if status == "cancelled":
        return EXIT_CANCELLED
    if isinstance(err.get("exit_code"), int):
        return err["exit_code"]
    return EXIT_NO_FIT if err.get("type") == "DoesNotFitError" else (
        EXIT_BAD_INPUT if err.get("type") == "EdgeTailorError" else EXIT_FAILED)


def cmd_fit(args) -> int:
    """Search under the budget, build and measure the best candidates, print the recommendation, write its bundle."""
    from edgetailor.engine import Recipe
    from edgetailor.engine.errors import EdgeTailorError

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise EdgeTailorError(f"{out} is a file, not a folder to write the bundle into.", "Give a folder with --out.")
    if not out.parent.is_dir():
        raise EdgeTailorError(f"{out.parent} does not exist, so the bundle's folder {out.name} cannot be made there.",
                              "Give a folder in an existing one with --out.")
    try:
        out.mkdir(exist_ok=True)        # before the plan runs: a folder that cannot be made is said at once
    except OSError as exc:
        raise EdgeTailorError(f"The bundle's folder {out} cannot be made: {exc.strerror}.",
                              "Give a folder you can write to with --out.") from exc
    params = {"device": args.device, "context": args.context, "candidates": args.candidates, "rounds": args.rounds,
              "trials": args.trials, "kv_types": args.kv_types.split(","), "formats": args.formats.split(","),
              "onnx_schemes": args.onnx_schemes.split(",") if args.onnx_schemes else None,
              "max_memory_mb": parse_bytes(args.max_memory) / 1e6 if args.max_memory else None,
              "min_decode_tps": args.min_tps, "max_j_per_token": args.max_j_per_token,
              "max_ppl_increase_pct": args.max_ppl_increase, "max_kl": args.max_kl,
              "width_ratios": _shares(args.width) if args.width else None, "heal_minutes": args.heal_minutes,
              "reuse_measured": False if args.fresh else None}
    if args.max_sequences:
        params["max_sequences"] = args.max_sequences
    if args.ray:
        params.update(executor="ray", ray_address=args.ray)
    elif args.workers:
        params.update(executor="processes", workers=args.workers)
    recipe = Recipe.from_dict({"name": "fit", "steps": [{"step": "fit", "params": {k: v for k, v in params.items()
                                                                                   if v is not None}}]})
    rec = _run(args, recipe)
    code = _exit_code(rec.manifest)
    if code != EXIT_OK:
        return code
    print(format_plan(rec))
    chosen = (rec.manifest.get("recommendation") or {}).get("variant")
    if not chosen:
        return EXIT_NO_FIT
    from edgetailor.engine.bundle import plan_bundle, write_bundle

    folder = write_bundle(plan_bundle(rec.folder, chosen), out)
    print(f"\nbundle: {folder}")
    return EXIT_OK


def parse_bytes(text: str) -> float:
    """'1.5GB', '800MB', '2GiB', '512MiB' or a number of MB."""
    import re

    from edgetailor.engine.errors import EdgeTailorError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|mib|gb|mb|g|m)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise EdgeTailorError(f"'{text}' is not a memory size.", "Write it as 1.5GB, 800MB, 2GiB or 512MiB.")
    unit = {"gib": 1024**3, "mib": 1024**2, "gb": 1e9, "g": 1e9, "mb": 1e6, "m": 1e6, None: 1e6}[m.group(2)]
    return float(m.group(1)) * unit


def _shares(text: str) -> list[float]:
    from edgetailor.engine.errors import EdgeTailorError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise EdgeTailorError(f"'{text}' is not a list of shares.", "Write them as 0.25 or 0.125,0.25.") from exc


def format_plan(rec) -> str:
    """The search's frontier (predicted), the measured candidates and the recommendation, as text."""
    plan = json.loads((rec.artifacts_dir / "plan.json").read_text())
    last = plan["rounds"][-1]
    by_label = {p["label"]: p for p in last["points"]}
    lines = [f"Plan for {plan['device']['name']} at {plan['context']} tokens of context "
             f"({len(plan['rounds'])} rounds, {sum(len(r['points']) for r in plan['rounds'])} predicted points)",
             "", "Frontier (predicted, last round):", "  file                     size MB  KV    memory MB  tok/s  KL        ppl %"]
    for label in last["frontier"]:
        p = by_label[label]
        what = f"onnx {p['onnx']}" if p.get("onnx") else "gguf (planned)"
        what += f" -{p['drop_blocks']} blocks" if p.get("drop_blocks") else ""
        what += f" mlp -{p['width']:.0%}" if p.get("width") else ""
        lines.append(f"  {what:<24} {p['file_bytes'] / 1e6:7.1f}  {p['kv_type']:<5} {p['memory_bytes'] / 1e6:9.0f}  "
                     f"{p['decode_tps']:5.1f}  {p['kl']:.5f}  {p['ppl_increase_pct']:+.2f}")
    lines += ["", "Built and measured:", "  variant                     memory MB (pred)  tok/s dev  KL (pred)          ppl %"]
    for m in plan["measured"]:
        lines.append(f"  {m['name']:<27} {m['memory_bytes'] / 1e6:6.0f} ({m['predicted']['memory_bytes'] / 1e6:4.0f})"
                     f"  {m['decode_tps']:9.1f}  {m['kl']:.5f} ({m['predicted']['kl']:.5f})  {m['ppl_increase_pct']:+.2f}")
    r = plan["recommendation"]
    lines += ["", ("Recommended: " + r["variant"]) if r.get("variant") else "Nothing fits.", "  " + r["reason"]]
    for limit, ru in r.get("runner_up", {}).items():
        lines.append("  runner-up: " + ru["text"])
    if r.get("shorter_context"):
        lines.append("  " + r["shorter_context"]["text"])
    return "\n".join(lines)


def _say(text: str) -> None:
    """Print to stderr unless the terminal is gone (after SIGHUP writing to it fails)."""
    try:
        print(text, file=sys.stderr)
    except OSError:
        pass


@contextlib.contextmanager
def _interrupts_cancel():
    """Within the block SIGHUP and SIGTERM raise KeyboardInterrupt, as Ctrl-C does, so the run is cancelled and
    recorded as such instead of the CLI dying and leaving its worker behind. A signal the CLI was started with
    ignored stays ignored (``nohup edgetailor ...`` runs on when its terminal closes)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGHUP, signal.SIGTERM)
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class _ProgressView:
    """tqdm bars per step, log lines above them."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def show(self, ev: dict) -> None:
        try:
            self._show(ev)
        except OSError:          # the terminal is gone (SIGHUP): the run goes on being recorded, silently
            self.quiet, self.bar = True, None

    def _show(self, ev: dict) -> None:
        from tqdm import tqdm

        t, d = ev["type"], ev["data"]
        if t == "step_started":
            self.close()
            if not self.quiet:
                self.bar = tqdm(total=1000, desc=f"[{d['index'] + 1}/{d['count']}] {ev['step']}", file=sys.stderr,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        elif t == "progress" and self.bar is not None:
            self.bar.n = int(1000 * d["fraction"])
            self.bar.set_postfix_str(d.get("message", "")[:60], refresh=False)
            self.bar.refresh()
        elif t == "log":
            (tqdm.write if self.bar is not None else (lambda m: print(m, file=sys.stderr)))(f"  {d['message']}")
        elif t == "step_finished" and self.bar is not None:
            self.bar.n = 1000
            self.bar.refresh()
            self.close()
        elif t == "run_finished":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            try:
                self.bar.close()
            except OSError:
                pass
            self.bar = None


def print_steps(manifest: dict) -> None:
    """Each finished step's time and the worker's peak memory during it, beside what pre-flight said it needs."""
    for i, s in enumerate(manifest.get("steps", []), 1):
        if s.get("seconds") is None:
            continue
        line = f"step {i} {s['name']}: {s['seconds']:.1f} s"
        if s.get("ram_peak_bytes"):
            line += f", peak RAM {s['ram_peak_bytes'] / 1e9:.2f} GB"
            if s.get("ram_peak_anon_bytes"):          # what pre-flight's figure counts (mapped files aside)
                line += f", {s['ram_peak_anon_bytes'] / 1e9:.2f} GB of it not file-backed"
            if s.get("ram_preflight_bytes"):
                mapped = s.get("ram_preflight_mapped_bytes") or 0
                line += f" (pre-flight {s['ram_preflight_bytes'] / 1e9:.2f} GB" + \
                    (f" + {mapped / 1e9:.2f} GB mapped)" if mapped else ")")
        print(line)


def print_variants(manifest: dict) -> None:
    rows = manifest.get("variants", [])
    if not rows:
        return
    cols = [("variant", "name", "{}"), ("format", "format", "{}"), ("size MB", "size_bytes", "{:.1f}"),
            ("ppl", "perplexity", "{:.4f}"), ("Δppl %", "ppl_increase_pct", "{:+.2f}"), ("KL", "kl", "{:.5f}"),
            ("top-1 %", "top1", "{:.1f}"), ("export s", "export_seconds", "{:.1f}")]
    table = []
    for v in rows:
        m = v.get("metrics", {})
        line = []
        for _, key, fmt in cols:
            val = v.get(key) if key in ("name", "format") else m.get(key)
            if val is None:
                line.append("-")
            elif key == "size_bytes":
                line.append(fmt.format(val / 1e6))
            elif key == "top1":
                line.append(fmt.format(100 * val))
            else:
                line.append(fmt.format(val))
            if key in ("perplexity", "ppl_increase_pct", "kl", "top1") and val is not None and m.get("screened_windows"):
                line[-1] = "≈" + line[-1]
        table.append(line)
    widths = [max(len(c[0]), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    print("  ".join(c[0].ljust(w) for c, w in zip(cols, widths)))
    for r in table:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    if any(v.get("metrics", {}).get("screened_windows") for v in rows):
        print("≈: estimated by the planner from a few evaluation windows (a file is scored on all of them before "
              "it is recommended)")


def cmd_evaluate(args) -> int:
    from edgetailor.engine import resolve
    from edgetailor.engine.evaluate import Comparison, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.text import default_evaluation_path, read_text

    variant = Path(args.variant)
    fmt = "gguf" if variant.suffix.lower() == ".gguf" else "onnx" if variant.is_dir() else None
    if fmt is None or not variant.exists():
        from edgetailor.engine.errors import EdgeTailorError

        raise EdgeTailorError(f"{variant} is not a .gguf file or an ONNX folder.", "Pass a variant a run wrote.")
    src = resolve(args.baseline, trust_remote_code=args.trust_remote_code, allow_network=args.online)
    loaded = load_model(src)
    windows = make_windows(loaded.tokenizer, read_text(args.eval_text or default_evaluation_path()), args.ctx,
                           args.windows)
    with Comparison(loaded.model, windows, threads=args.threads) as cmp:
        del loaded
        res = cmp.score(fmt, variant)
        base = cmp.baseline
        out = {"variant": str(variant), "baseline_perplexity": base.perplexity, **res.to_dict(),
               "ppl_increase_pct": cmp.row(res)["ppl_increase_pct"]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"baseline perplexity {base.perplexity:.4f}")
        print(f"{variant.name}: perplexity {res.perplexity:.4f} ({out['ppl_increase_pct']:+.2f}%), "
              f"KL {res.kl:.5f}, top-1 {100 * res.top1:.1f}%  ({res.windows} windows x {res.ctx}, {res.seconds:.1f} s)")
    return EXIT_OK


def cmd_runs(args) -> int:
    from edgetailor.engine import find_run, list_runs
    from edgetailor.engine.paths import runs_dir

    root = Path(args.runs_dir) if args.runs_dir else runs_dir()
    if args.run_id:
        m = find_run(root, args.run_id).manifest
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            print(f"{m['id']}  {m['status']}  recipe {m['recipe']['name']}  source {m['source'].get('spec')}")
            if m.get("error"):
                print(f"  {m['error'].get('problem')}")
            print_steps(m)
            print_variants(m)
        return EXIT_OK
    unreadable: list = []
    runs = list_runs(root, unreadable)
    for exc in unreadable:
        print(f"skipped: {exc.problem} {exc.fix}", file=sys.stderr)
    if args.json:
        print(json.dumps(runs, indent=2))
    for m in runs:
        print(f"{m['id']:48s} {m['status']:10s} {len(m.get('variants', [])):3d} variants  {m['source'].get('spec')}")
    if not runs:
        print(f"no runs in {root}")
    return EXIT_OK


def cmd_steps(args) -> int:
    from edgetailor.engine import all_steps

    for name, info in sorted(all_steps().items()):
        d = info.describe()
        print(f"{name}  ({d['kind']})  {d['summary']}")
        if d["exports"]:
            print(f"    exports: {d['exports']}")
        for f in d["params"]:
            print(f"    {f['name']}: {f['type']} = {f['default']!r}  {f['help']}")
    return EXIT_OK


def cmd_presets(args) -> int:
    from edgetailor.engine import list_presets

    for name, r in list_presets().items():
        print(f"{name}: {' -> '.join(s.name for s in r.steps)}\n    {r.description}")
    return EXIT_OK


def cmd_report(args) -> int:
    from edgetailor.engine import find_run
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.paths import runs_dir
    from edgetailor.engine.report import format_report, run_report

    root = Path(args.runs_dir) if args.runs_dir else runs_dir()
    rec = find_run(root, args.run_id)
    budget = Budget(get_device(args.device), max_memory_bytes=args.max_memory_mb * 1e6 if args.max_memory_mb else None,
                    min_decode_tps=args.min_decode_tps, max_j_per_token=args.max_j_per_token,
                    max_ppl_increase_pct=args.max_ppl_increase, max_kl=args.max_kl)
    rep = run_report(rec.manifest, budget, args.alpha, args.beta, folder=rec.folder)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return EXIT_OK


def cmd_devices(args) -> int:
    from edgetailor.engine.devices import list_devices

    unreadable: list = []
    devices = list_devices(unreadable=unreadable)
    for exc in unreadable:
        print(f"skipped: {exc.problem} {exc.fix}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: d.to_dict() for k, d in devices.items()}, indent=2))
        return EXIT_OK
    print(f"{'id':28s} {'memory for apps':>15s} {'bandwidth':>10s} {'cores':>5s} {'GFLOP/s':>8s} {'power W':>9s}  origin")
    for d in devices.values():
        print(f"{d.id:28s} {d.memory_available_gib:11.1f} GiB {d.memory_bandwidth_gbs:6.1f} GB/s {d.cpu_cores:5d} "
              f"{d.compute_gflops:8.1f} {d.power_typical_w:4.0f}/{d.power_peak_w:<4.0f}  {d.origin}")
    return EXIT_OK


COMMANDS = {"inspect": cmd_inspect, "compress": cmd_compress, "run": cmd_compress, "fit": cmd_fit, "evaluate": cmd_evaluate,
            "runs": cmd_runs, "steps": cmd_steps, "presets": cmd_presets, "report": cmd_report,
            "devices": cmd_devices}

if __name__ == "__main__":
    raise SystemExit(main())

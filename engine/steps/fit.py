"""Fit a device budget: search GGUF files with KV-cache types and ONNX folders on predictions, build and measure the
best, recommend one.

One pass of the calibration text (the sensitivity of every tensor, ``engine.sensitivity``) prices every tensor's
types; the runtime's overhead is measured once at the app's context. ``engine.planner`` then predicts memory,
speed, energy and KL for any (file size, KV type) or ONNX scheme, optuna searches that space under the budget,
and the best feasible candidates are built for real (EdgeTailor's calibrated blocks, GPTQ; ONNX int4 GPTQ onto
MatMulNBits, int4 and int8), checked against the source, evaluated (perplexity, KL, top-1 in llama.cpp with
their KV type, or onnxruntime; after the run's first file, on a few windows first: ``planner.screened_evaluation``)
and benchmarked in a fresh process at the app's context. Each round refits the
predictors on what was measured and searches again. The recommendation comes from the measured candidates only;
``plan.json`` holds every predicted and measured point.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...exporters.onnx_plan import SCHEMES as ONNX_SCHEMES
from ..context import RunContext
from ..registry import register_step
from ..runs import Variant


@dataclass
class FitConfig:
    device: str = field(default="this-machine", metadata={"help": "the target device profile (edgetailor devices)"})
    context: int = field(default=2048, metadata={"help": "the context length the app needs (tokens); memory includes its KV cache"})
    max_memory_mb: float | None = field(default=None, metadata={"help": "memory limit at that context (default: the device's memory for apps)"})
    min_decode_tps: float | None = field(default=None, metadata={"help": "slowest acceptable decode on the device (tok/s)"})
    max_j_per_token: float | None = field(default=None, metadata={"help": "energy limit (J/token, estimated)"})
    max_ppl_increase_pct: float | None = field(default=None, metadata={"help": "quality loss limit: perplexity increase (%)"})
    max_kl: float | None = field(default=None, metadata={"help": "quality loss limit: mean KL to the source"})
    kv_types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_0"], metadata={"help": "KV-cache types to consider"})
    formats: list[str] = field(default_factory=lambda: ["gguf", "onnx"], metadata={"help": "file formats to consider: gguf (llama.cpp) and onnx (onnxruntime)"})
    onnx_schemes: list[str] = field(default_factory=lambda: list(ONNX_SCHEMES), metadata={"help": "ONNX quantizations to consider: int4-<block size>[-head8] (an 8-bit output head), int8"})
    max_drop_blocks: int = field(default=2, metadata={"help": "also consider removing up to this many decoder blocks, the least influential first (0: never)"})
    width_ratios: list[float] = field(default_factory=list, metadata={"help": "also consider models with this share of every block's MLP channels removed (e.g. 0.25), each healed by distillation from the source before it is quantized (trains: the model, its teacher and AdamW's state in memory)"})
    heal_minutes: float = field(default=3.0, metadata={"help": "distillation time healing each narrower model"})
    heal_steps: int = field(default=0, metadata={"help": "distillation steps healing each narrower model (0: heal_minutes only)"})
    decode_model: bool = field(default=True, metadata={"help": "measure llama.cpp's decode costs on probes (once per machine and model, minutes) so that even the first files' speed is predicted from their types; off: the roofline and a one-layer probe until files are measured"})
    screen_windows: int = field(default=4, metadata={"help": "every file after the first, and the first file's quantized KV caches, are scored on this many evaluation windows (their figures estimated from the first file's on the same windows) and on the rest only if one is to be recommended; 0: all on every window"})
    candidates: int = field(default=3, metadata={"help": "files built and measured in all"})
    rounds: int = field(default=2, metadata={"help": "search / build / refit rounds"})
    trials: int = field(default=120, metadata={"help": "predicted points the search tries per round"})
    method: str = field(default="gptq", metadata={"help": "how the files' blocks are fitted: gptq or imatrix"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    max_sequences: int | None = field(default=None, metadata={"help": "at most this many calibration sequences"})
    prompt_tokens: int = field(default=64, metadata={"help": "benchmark prompt length"})
    gen_tokens: int = field(default=32, metadata={"help": "benchmark tokens generated per pass"})
    repeats: int = field(default=2, metadata={"help": "benchmark timed passes"})
    seed: int = field(default=0, metadata={"help": "the search's seed"})
    reuse_measured: bool = field(default=True, metadata={"help": "reuse what an earlier fit of the same model measured with the same texts (its tensors' prices, what removing blocks costs, the baseline's log-probs, encoded tensors, the scores of files with the same bytes: ``engine.measured_cache``); off: measure again"})
    executor: str = field(default="inline", metadata={"help": "where candidates are built and measured: inline (this process), processes (local worker processes) or ray"})
    workers: int = field(default=2, metadata={"help": "worker processes (executor: processes)"})
    ray_address: str | None = field(default=None, metadata={"help": "the Ray cluster (executor: ray): an address, 'auto', or 'local' for a new local instance"})

    def __post_init__(self):
        from ..runtimes import KV_TYPES

        if self.context < 16:
            raise ValueError("context must be at least 16 tokens")
        if self.max_drop_blocks < 0:
            raise ValueError("max_drop_blocks must not be negative")
        if any(not 0.0 < w <= 0.9 for w in self.width_ratios) or len(set(self.width_ratios)) < len(self.width_ratios):
            raise ValueError("width_ratios must be distinct shares in (0, 0.9]")
        if self.width_ratios and (self.heal_minutes < 0 or self.heal_steps < 0 or not (self.heal_minutes or self.heal_steps)):
            raise ValueError("healing needs heal_minutes and/or heal_steps (not negative)")
        if self.candidates < 1 or self.rounds < 1 or self.trials < 8:
            raise ValueError("candidates >= 1, rounds >= 1 and trials >= 8 are needed")
        if not self.kv_types or any(k not in KV_TYPES for k in self.kv_types):
            raise ValueError(f"kv_types must be among {', '.join(KV_TYPES)}")
        if not self.formats or any(f not in ("gguf", "onnx") for f in self.formats):
            raise ValueError("formats must be among gguf, onnx")
        if "onnx" in self.formats and (not self.onnx_schemes or any(s not in ONNX_SCHEMES for s in self.onnx_schemes)):
            raise ValueError(f"onnx_schemes must be among {', '.join(ONNX_SCHEMES)}")
        from ..plan_tasks import EXECUTORS

        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.screen_windows < 0:
            raise ValueError("screen_windows must not be negative")
        if self.method not in ("gptq", "imatrix"):
            raise ValueError("method must be gptq or imatrix")
        for name in ("max_memory_mb", "min_decode_tps", "max_j_per_token", "max_kl"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_ppl_increase_pct is not None and self.max_ppl_increase_pct < 0:
            raise ValueError("max_ppl_increase_pct must not be negative")
        if self.prompt_tokens + self.gen_tokens > self.context:
            raise ValueError("prompt_tokens + gen_tokens exceed the context")

    def budget(self):
        from ..devices import Budget, get_device

        return Budget(get_device(self.device), max_memory_bytes=self.max_memory_mb * 1e6 if self.max_memory_mb else None,
                      min_decode_tps=self.min_decode_tps, max_j_per_token=self.max_j_per_token,
                      max_ppl_increase_pct=self.max_ppl_increase_pct, max_kl=self.max_kl)


def _fit_ram(cfg: FitConfig, shape):
    """The calibrated GGUF candidates' block walk and sensitivity pass; with ONNX in the formats, also an ONNX
    candidate's export (written layer by layer, GPTQ's statistics from its own walk): the larger of the two."""
    from ..footprint import calibrated_need, calibration_tokens, decode_probe_bytes, export_need

    need = calibrated_need("fit", shape, calibration_tokens(cfg.max_sequences, cfg.seq_len), cfg.seq_len,
                           gptq=cfg.method == "gptq", measured=True)
    types = sorted({ONNX_SCHEMES[n].type for n in cfg.onnx_schemes}) if "onnx" in cfg.formats else []
    windows = calibration_tokens(cfg.max_sequences, cfg.seq_len) // cfg.seq_len
    onnx = export_need("fit", shape, "onnx", types, {"method": cfg.method, "calibration_ctx": cfg.seq_len,
                                                       "calibration_windows": windows}) if types else None
    others = {"an ONNX candidate's export": onnx.ram_bytes if onnx else 0,
              "healing a narrower model (distillation)": healing_need(cfg, shape).ram_bytes if cfg.width_ratios else 0,
              "llama.cpp's decode cost probes (float32, the model's shapes)":
                  decode_probe_bytes(shape) if cfg.decode_model and "gguf" in cfg.formats else 0}
    largest = ""
    for what, ram in others.items():
        if not ram:
            continue
        need.parts[what] = ram
        if ram > need.ram_bytes:
            need.ram_bytes, largest = ram, what
    need.how += f"; largest: {largest}" if largest else ""
    return need


def healing_need(cfg: FitConfig, shape):
    """Healing a narrower model trains it against the source: both in fp32, AdamW's state for its blocks."""
    from ..footprint import training_need
    from .distill import resolved_bf16

    return training_need("fit", shape, max(shape.params - shape.embedding_params, 0), HEAL_SEQ_LEN, HEAL_SEQ_LEN,
                         teacher=True, bf16=resolved_bf16(None))


#: tokens per healing sequence (a batch is one sequence)
HEAL_SEQ_LEN = 256


@dataclass
class Built:
    """One file built for the plan."""
    name: str
    path: Path
    raw: dict
    seconds: float
    agreement: dict
    task_options: dict = field(default_factory=dict)      # an ONNX file's export options (its scheme, method)


@dataclass
class Prepared:
    """The planner and what its measurements ran on."""
    planner: object               # planner.Predictor
    sequences: object             # calibration token ids [n, seq_len] (torch)
    prompt: list[int]             # the benchmark prompt
    measured: object              # measured_cache.MeasuredCache: this model's entries


@dataclass
class SharedInputs:
    """What every candidate task reads: the same calibration, references and prompt."""
    sequences: list[list[int]]
    prompt: list[int]
    eval_windows: list[list[int]]
    verify: str                   # the check windows and the source's log-probs (npz in the run's scratch)
    encoded: str                  # the source's tensors encoded for earlier files (kept between fits of the model)
    scores: str                   # earlier fits' scores of files (``plan_tasks.score_file``); "" with reuse off


@register_step("fit", FitConfig, kind="export", exports="this is the export (GGUF or ONNX)", streamed_ram=_fit_ram,
               summary="Search GGUF files, KV-cache types and ONNX folders under a device budget, build the best, recommend one")
def fit(ctx: RunContext, cfg: FitConfig) -> None:
    from ..plan_tasks import run_tasks
    from ..planner import buildable, frontier, kv_types_for, pick, search

    budget = cfg.budget()
    prepared = _prepare(ctx, cfg, budget)
    planner = prepared.planner
    kv_types = kv_types_for(cfg.kv_types, planner.weights_info(planner.plan(planner.size_range()[0])[0]).head_dim)
    if "gguf" not in cfg.formats:
        kv_types = []
    elif kv_types != cfg.kv_types:
        ctx.log(f"KV-cache types {', '.join(sorted(set(cfg.kv_types) - set(kv_types)))} left out: the head size is "
                "not a multiple of 32", level="warning")
    kept = prepared.measured
    shared = SharedInputs(prepared.sequences.tolist(), prepared.prompt, _eval_windows(ctx, kept),
                          _save_verification(ctx, kept),
                          str(kept.folder("encoded", [prepared.sequences.tolist(), cfg.method])),
                          str(kept.folder("scores", [])) if cfg.reuse_measured else "")
    if kept.reused:
        ctx.log(f"Reused what an earlier fit of this model measured with the same texts "
                f"({', '.join(kept.reused)}: {kept.folder_path}); --fresh measures again")
    built: list[Built] = []
    rejected: list[dict] = []          # files that failed their check against the source (not kept)
    measured: list[dict] = []
    origins: dict[str, tuple] = {}     # measured point's name -> (its task, its file, what was measured)
    history = []
    per_round = max(1, -(-cfg.candidates // cfg.rounds))
    for r in range(cfg.rounds):
        ctx.check_cancelled()
        points = search(planner, budget, kv_types, cfg.trials, cfg.seed + r, cancelled=ctx.cancel.is_set,
                        onnx=tuple(planner.onnx_schemes))
        front = frontier(points)
        history.append({"round": r + 1, "calibration": planner.calibration.to_dict(),
                        "points": [p.to_dict() for p in points], "frontier": [p.candidate.label for p in front]})
        ctx.emit("plan", phase="predicted", round=r + 1, points=[p.to_dict() for p in points],
                 frontier=[p.candidate.label for p in front], budget=budget.to_dict(), context=cfg.context)
        n = min(per_round, cfg.candidates - len(built))
        pool = buildable(points, planner.calibration.kv_kl)
        todo = pick(pool, budget, n, [(b.raw["tensor_bytes"], b.raw["drop"], b.raw["onnx"], b.raw["speed"], b.raw["width"])
                                      for b in built]
                    + [(r["tensor_bytes"], r["drop_blocks"], r["onnx"], r["speed_weight"], r["width"]) for r in rejected])
        ctx.log(f"Round {r + 1}: {len(points)} predicted points, {sum(p.feasible for p in points)} within the budget; "
                f"building {', '.join(p.candidate.label for p in todo) or 'nothing new'}")
        tasks, raws = _tasks(ctx, cfg, planner, shared, todo, kv_types, built)
        lo, hi = (0.2 + 0.75 * min(1.0, k / cfg.candidates) for k in (len(built), len(built) + len(tasks)))
        results = run_tasks(tasks, cfg.executor, cfg.ray_address, cfg.workers,
                            progress=lambda f, m: ctx.progress(lo + (hi - lo) * f, m), cancelled=ctx.cancel.is_set)
        for task, raw, res in zip(tasks, raws, results):
            if res.get("rejected"):
                rejected.append(_rejected(ctx, planner, raw, res))
                continue
            built.append(_keep(ctx, task, raw, res))
            _take_measured(ctx, cfg, planner, budget, task, built[-1], res, measured, origins)
        if len(built) >= cfg.candidates:
            break
    rec = _recommend(ctx, cfg, planner, budget, measured, points, origins)
    _record(ctx, cfg, planner, budget, history, measured, rec, rejected, kept.reused)
    _trim_measured_cache(ctx, kept.folder_path)
    ctx.progress(1.0, "recommended" if rec.get("variant") else "nothing fits")


def _tasks(ctx: RunContext, cfg: FitConfig, planner, shared: SharedInputs, todo, kv_types: list[str],
           built: list[Built]) -> tuple[list, list[dict]]:
    """A task per point to build: the first GGUF file measured with every KV type (their own KL), later ones with
    their own; every file after the run's first screened (``_screen``)."""
    tasks, raws = [], []
    for p in todo:
        raws.append(planner.raw(p.candidate))
        first = not p.candidate.onnx and not any(t.format == "gguf" for t in tasks) \
            and not any(not b.raw["onnx"] for b in built)
        tasks.append(_task(ctx, cfg, planner, shared, raws[-1], kv_types if first else [p.candidate.kv_type],
                           {b.name for b in built} | {t.name for t in tasks}))
        _screen(cfg, tasks[-1], anchored=bool(built) or len(tasks) > 1)
    return tasks, raws


def _take_measured(ctx: RunContext, cfg: FitConfig, planner, budget, task, b: Built, res: dict, measured: list[dict],
                   origins: dict) -> None:
    """A built file's measurements into the plan (a screened one's estimated from the run's first evaluation on
    every window, ``_anchor``), then the predictors refitted."""
    from ..planner import screened_evaluation

    for kv, found in res["measured"].items():
        estimated = found
        if found.get("screened"):
            anchor = _anchor(origins)
            estimated = {**found, "evaluation": screened_evaluation(found["evaluation"], anchor) if anchor
                         else found["evaluation"]}
        measured.append(_measured(ctx, cfg, planner, budget, b, kv, estimated))
        origins[measured[-1]["name"]] = (task, b, found)
    _refit(planner, measured)


def _anchor(origins: dict) -> dict | None:
    """The run's first evaluation on every window (the first file's, with an f16 cache for a GGUF file): what the
    screened files are compared with on the windows both saw. None when no file got one (the first was rejected)."""
    return next((found["evaluation"] for _, _, found in origins.values() if not found.get("screened")), None)


def _screen(cfg: FitConfig, task, anchored: bool) -> None:
    """Which of a task's KV types are scored on the first ``screen_windows`` windows only: after the run's first
    file (``anchored``: an evaluation on every window comes before), all of them; the first file's quantized caches
    (f16 first, on every window)."""
    if not 0 < cfg.screen_windows < len(task.eval_windows):
        return
    if anchored:
        task.screened_kv = list(task.kv_types)
    elif "f16" in task.kv_types:
        task.kv_types = ["f16"] + [k for k in task.kv_types if k != "f16"]
        task.screened_kv = task.kv_types[1:]
    task.screen_windows = cfg.screen_windows


def _recommend(ctx: RunContext, cfg: FitConfig, planner, budget, measured: list[dict], points, origins) -> dict:
    """The recommendation among the measured points, a screened pick scored on the rest of the windows first."""
    from ..evaluate import joined_results
    from ..plan_tasks import score_file
    from ..planner import recommend_scored

    def rescore(m: dict) -> dict:
        task, b, found = origins[m["name"]]
        ctx.progress(0.96, f"{m['name']}: scoring it on every evaluation window before recommending it")
        rest = score_file(task, m["kv_type"], ctx.cancel.is_set, skip=m["screened"], token_kl=True)
        full = {k: v for k, v in joined_results(found["evaluation"], rest).items() if k != "token_kl"}
        ctx.log(f"{m['name']}: KL {full['kl']:.5f} on all {full['windows']} windows (estimated from {m['screened']}: "
                f"{m['kl']:.5f})")
        return _measured(ctx, cfg, planner, budget, b, m["kv_type"], {"evaluation": full, "benchmark": found["benchmark"]})

    return recommend_scored(measured, budget, cfg.context, points, rescore)


def _prepare(ctx: RunContext, cfg: FitConfig, budget) -> Prepared:
    """Sensitivities, type prices, the runtime's overhead: everything the predictions need, measured once."""

    from ...exporters.gguf_calibrated import expert_sources, tensor_sources
    from ...exporters.gguf_plan import TypePrices, metadata_bytes
    from ..architectures import gguf_writer_for
    from ..calibration import token_sequences
    from ..devices import host_profile
    from ..energy import EnergyMeter
    from ..errors import UnsupportedModelError
    from ..planner import Predictor
    from ..probes import measure_overhead
    from .benchmark import prompt_ids

    model = ctx.weights()
    if gguf_writer_for(model.config) != "edgetailor":
        raise UnsupportedModelError(
            f"The planner writes its files with EdgeTailor's GGUF writer, which does not cover this "
            f"'{model.config.model_type}' model yet.", "Use the gguf-ladder-measured preset for this model.")
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.max_sequences)
    schemes = _onnx_schemes(ctx, cfg, model)
    dense, experts = tensor_sources(model), expert_sources(model)
    measured = _measured_cache(ctx, cfg)
    prices = TypePrices.from_dict(measured.json("prices", [seqs.tolist(), [s.name for s in schemes]],
                                                lambda: _price(ctx, model, seqs, dense, experts, schemes).to_dict()))
    sources = {**dense, **experts}
    scratch = ctx.record.folder / "scratch"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fit-", dir=scratch) as tmp:
        metadata = metadata_bytes(model, ctx.tokenizer, ctx.source.path, Path(tmp))
    ctx.progress(0.15, "measuring the runtime's overhead at the app's context")
    host = host_profile()
    prompt = prompt_ids(ctx, cfg.prompt_tokens)
    overhead, onnx_overhead = (measure_overhead(fmt, ctx.source.path, prompt, cfg.gen_tokens, cfg.context,
                                                ctx.options.resolved_threads(), ctx.options.dtype,
                                                EnergyMeter.detect(host)) if fmt == "gguf" or schemes else None
                               for fmt in ("gguf", "onnx"))
    decode_model = _decode_model(ctx, cfg, prices, prompt) if cfg.decode_model and "gguf" in cfg.formats else None
    params = sum(math.prod(s.shape) for s in sources.values())
    order, kls = measured.json("depth", [seqs[:DEPTH_SEQUENCES].tolist(), cfg.max_drop_blocks],
                               lambda: _depth(ctx, cfg, model, seqs))
    ctx.log(f"Planner: {len(sources)} tensors priced in {len(set(t for o in prices.every.values() for t, _, _ in o))} "
            f"types; runtime overhead {overhead['overhead_bytes'] / 1e6:.0f} MB at {cfg.context} tokens (measured)")
    planner = Predictor(prices, sources, model.config, metadata, params, budget.device, host, cfg.context,
                        cfg.prompt_tokens + cfg.gen_tokens, overhead, order, kls, onnx_overhead, decode_model)
    if decode_model and (budget.min_decode_tps or budget.max_j_per_token):
        from ..planner import SPEED_WEIGHTS

        planner.speed_weights = SPEED_WEIGHTS      # a speed or energy limit: mixes of faster kernels are searched too
    if cfg.width_ratios:
        _narrower(ctx, cfg, planner, seqs)
    return Prepared(planner, seqs, prompt, measured)


def _measured_cache(ctx: RunContext, cfg: FitConfig):
    """This model's entries in ``engine.measured_cache`` (read only with ``reuse_measured``; always kept)."""
    from .. import measured_cache

    cache = measured_cache.MeasuredCache(ctx.source.display_name, ctx.record.manifest["source"]["sha256"],
                                         reuse=cfg.reuse_measured)
    measured_cache.prune(keep=cache.folder_path)
    return cache


def _trim_measured_cache(ctx: RunContext, folder: Path) -> None:
    """The measured cache back within its limit (this model's entries too, if they alone exceed it)."""
    from .. import measured_cache

    if folder in measured_cache.prune():
        ctx.log(f"What this fit measured is not kept: it exceeds the cache's limit ({measured_cache.limit_bytes() / 1e9:.0f} "
                "GB; EDGETAILOR_CACHE_GB sets it)", level="warning")


def _price(ctx: RunContext, model, seqs, dense: dict, experts: dict, schemes: list):
    """Every tensor's sensitivity (one pass of the calibration text), then every type's expected cost."""
    import torch

    from ...exporters.gguf_plan import price_types
    from ..sensitivity import measure_sensitivity

    ctx.progress(0.0, "sensitivity of every tensor")
    sens = measure_sensitivity(model, seqs, progress=lambda f, m: ctx.progress(0.08 * f, m), cancelled=ctx.cancel.is_set)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return price_types(dense, sens, progress=lambda f, m: ctx.progress(0.08 + 0.07 * f, m),
                           cancelled=ctx.cancel.is_set, onnx_schemes=schemes, experts=experts)
    finally:
        torch.set_num_threads(threads)


def _narrower(ctx: RunContext, cfg: FitConfig, planner, seqs) -> None:
    """Each narrower model (``width_ratios``) cut, healed and written to the run's scratch (``engine.narrowed``), its
    tensors priced by their own sensitivities, and added to the planner."""
    import torch

    from ...exporters.gguf_calibrated import tensor_sources
    from ...exporters.gguf_plan import price_types
    from ..architectures import arch_spec
    from ..calibration import token_sequences
    from ..lazy import LazyModel
    from ..modeling import load_model
    from ..narrowed import Healing, narrowed_model
    from ..planner import Predictor
    from ..sensitivity import measure_sensitivity
    from .distill import split_heldout

    spec = arch_spec(planner.config.model_type)
    why = spec.technique("prune.width", "transform") if not spec.moe else \
        "not for a mixture of experts in the plan yet (the step cuts each expert's channels; healing is not tried)"
    if why != "yes":
        ctx.log(f"Narrower models left out of the plan: width pruning is {why}", level="warning")
        return
    train_text, heldout_text = split_heldout(ctx.calibration_text(), 0.1)
    train = token_sequences(ctx.tokenizer, train_text, HEAL_SEQ_LEN, stride=64)
    heldout = token_sequences(ctx.tokenizer, heldout_text, HEAL_SEQ_LEN, max_sequences=8)
    teacher = load_model(ctx.source, ctx.options.dtype).model
    for p in teacher.parameters():
        p.requires_grad_(False)
    for width in sorted(cfg.width_ratios):
        ctx.progress(0.18, f"removing {width:.0%} of the MLP channels and healing the model")
        n = narrowed_model(ctx.source.path, teacher, width, seqs[:DEPTH_SEQUENCES], train, heldout,
                           Healing(cfg.heal_minutes, cfg.heal_steps),
                           ctx.record.folder / "scratch" / f"narrower-{width:g}",
                           progress=lambda f, m: ctx.progress(0.18, m), cancelled=ctx.cancel.is_set)
        ctx.log(f"{width:.0%} of the MLP channels removed (intermediate size {n.intermediate}): held-out KL "
                f"{n.kl_before:.4f}, healed in {n.steps} steps ({n.seconds:.0f} s) to {n.kl:.4f}")
        model = LazyModel(n.folder)
        say = lambda f, m: ctx.progress(0.19, f"the {width:.0%} narrower model: {m}")   # noqa: E731
        sens = measure_sensitivity(model, seqs, progress=say, cancelled=ctx.cancel.is_set)
        sources = tensor_sources(model)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            prices = price_types(sources, sens, progress=say, cancelled=ctx.cancel.is_set)
        finally:
            torch.set_num_threads(threads)
        child = Predictor(prices, sources, model.config, planner.metadata, sum(s.shape[0] * s.shape[1] for s in sources.values()),
                          planner.device, planner.host, planner.context, planner.tokens_used, planner.overhead,
                          decode_model=planner.decode_model)
        planner.add_width(child, width, n.kl, str(n.folder))


def _decode_model(ctx: RunContext, cfg: FitConfig, prices, prompt) -> dict | None:
    """llama.cpp's decode costs on this machine for every GGUF type the planner may choose (cached per machine
    and model: measured once, in minutes, on probes of the model's shapes); None where it cannot be measured."""
    import time

    from ..devices import host_profile
    from ..energy import EnergyMeter
    from ..errors import EdgeTailorError
    from ..probes import measure_decode_model

    types = sorted({t for options in prices.every.values() for t, _, _ in options})
    ctx.progress(0.17, "measuring llama.cpp's decode costs (once per machine and model)")
    t0 = time.perf_counter()
    try:
        model = measure_decode_model("gguf", ctx.source.path, types, prompt, cfg.gen_tokens, cfg.context,
                                     ctx.options.resolved_threads(), ctx.options.dtype,
                                     EnergyMeter.detect(host_profile()), log=ctx.log, kv_types=cfg.kv_types)
    except EdgeTailorError as exc:
        ctx.log(f"llama.cpp's decode costs: {exc.problem} Speeds are projected from the roofline.", level="warning")
        return None
    ctx.log(f"llama.cpp decode cost model: {model['method']}")
    return {**model, "seconds_here": round(time.perf_counter() - t0, 1)}     # ~0 where it was measured before


def _onnx_schemes(ctx: RunContext, cfg: FitConfig, model) -> list:
    """The ONNX schemes to price: those asked, where EdgeTailor's own ONNX graph covers the family (the builder's
    families get round-to-nearest only, from a torch load of the whole model)."""
    from ..architectures import arch_spec

    if "onnx" not in cfg.formats:
        return []
    spec = arch_spec(model.config.model_type)
    if spec is not None and spec.onnx != "edgetailor":
        ctx.log(f"ONNX files left out of the plan: EdgeTailor's ONNX graph does not cover '{model.config.model_type}' "
                "models yet", level="warning")
        return []
    return [ONNX_SCHEMES[n] for n in cfg.onnx_schemes]


#: calibration sequences the depth measurements use (block influence; the KL of removing blocks)
DEPTH_SEQUENCES = 2


def _depth(ctx: RunContext, cfg: FitConfig, model, seqs) -> tuple[list[int], list[float]]:
    """Blocks by influence (ShortGPT's, least first) and the KL of removing the first 1..k of them, measured."""
    from ..architectures import arch_spec
    from ..calibration import block_influence, depth_kl

    k = min(cfg.max_drop_blocks, int(model.config.num_hidden_layers) - 1)
    why = arch_spec(model.config.model_type).technique("prune.depth", "transform")
    if k > 0 and why != "yes":
        ctx.log(f"Removing blocks left out of the plan: depth pruning is {why}", level="warning")
        return [], []
    if k <= 0:
        return [], []
    ctx.progress(0.16, f"measuring what removing up to {k} blocks costs")
    influence = block_influence(model, seqs[:DEPTH_SEQUENCES], cancelled=ctx.cancel.is_set)
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    k = _computable_drops(ctx, model.config, order, k)
    if k <= 0:
        return [], []
    kls = depth_kl(model, seqs[:DEPTH_SEQUENCES], [order[:j] for j in range(1, k + 1)], cancelled=ctx.cancel.is_set)
    ctx.log("Removing blocks " + ", ".join(f"{sorted(order[:j + 1])}: KL {kl:.4f}" for j, kl in enumerate(kls))
            + " (measured on the calibration text)")
    return order, kls


def _computable_drops(ctx: RunContext, config, order: list[int], k: int) -> int:
    """The most blocks (least influential first, up to ``k``) whose removal leaves a model a GGUF file computes
    (SmolLM3: its blocks without rotary stay where llama.cpp's graph puts them)."""
    import copy

    from ..architectures import gguf_layout_problem, keep_layers

    for j in range(1, k + 1):
        cfg = copy.deepcopy(config)
        keep_layers(cfg, [i for i in range(int(config.num_hidden_layers)) if i not in order[:j]])
        problem = gguf_layout_problem(cfg)
        if problem:
            ctx.log(f"Removing {j} block{'s' if j > 1 else ''} left out of the plan: {problem}", level="warning")
            return j - 1
    return k


def _eval_windows(ctx: RunContext, measured) -> list[list[int]]:
    """The evaluation windows, with the baseline's log-probs on them (the KL reference of every candidate; an
    earlier fit's where it evaluated the same windows)."""
    from ..evaluate import make_windows
    from .evaluate import ensure_baseline

    windows = make_windows(ctx.tokenizer, ctx.eval_text(), ctx.options.eval_ctx, ctx.options.eval_windows)
    ensure_baseline(ctx, windows, span=(0.17, 0.2), kept=measured)
    return windows


def _save_verification(ctx: RunContext, measured) -> str:
    """The fixed check windows and the source's log-probs on them, for every candidate's check (an earlier fit's
    where it checked against the same windows)."""
    from ..measured_cache import link_or_copy
    from ..reference import choose
    from ..verification import check_windows

    windows = check_windows(ctx.tokenizer, ctx.calibration_text())
    choice = choose(ctx)
    folder = measured.made_folder("verify", [windows, choice.format, choice.type, ctx.options.dtype],
                                  lambda into: _verification(ctx, windows, into / "verify.npz"))
    path = ctx.record.folder / "scratch" / "verify.npz"
    link_or_copy(folder / "verify.npz", path)
    return str(path)


def _verification(ctx: RunContext, windows, path: Path) -> None:
    from ..evaluate import log_softmax
    from ..plan_tasks import save_verification
    from ..reference import open_reference
    from ..verification import WINDOW_TOKENS

    with open_reference(ctx, n_ctx=WINDOW_TOKENS) as rt:
        reference = [log_softmax(rt.logits(w)) for w in windows]
    save_verification(path, windows, reference)


#: llama.cpp file types a planned mix is labelled with (general.file_type), by bits per weight
LABELS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def _file_type(bpw: float) -> str:
    """The llama.cpp file type nearest the planned file's bits per weight (a label: the tensors keep their types)."""
    from ..preflight import GGUF_BITS_PER_WEIGHT

    return min(LABELS, key=lambda t: abs(GGUF_BITS_PER_WEIGHT[t] - bpw))


def _file_name(file_bytes: int, taken: set[str], suffix: str = "") -> str:
    """fit-<size>MB<suffix>, with enough digits to tell the run's files apart."""
    mb = file_bytes / 1e6
    for digits in (1, 2, 3, 4):
        name = f"fit-{mb:.{digits}f}MB{suffix}"
        if name not in taken:
            return name
    return f"fit-{file_bytes}B{suffix}"


def _task(ctx: RunContext, cfg: FitConfig, planner, shared: SharedInputs, raw: dict, kv_types: list[str],
          taken: set[str]):
    from ...exporters.onnx_plan import scheme
    from ..energy import EnergyMeter
    from ..plan_tasks import CandidateTask
    from ..planner import Candidate
    from .evaluate import reference_folder

    suffix = Candidate(raw["tensor_bytes"], "", raw["drop"], raw["onnx"], raw["speed"], raw["width"]).suffix
    name = f"fit-onnx-{raw['onnx']}{suffix}" if raw["onnx"] else _file_name(raw["file_bytes"], taken, suffix)
    onnx = {"format": "onnx", "onnx_options": {**scheme(raw["onnx"]).export_options(), "calibration_ctx": cfg.seq_len,
                                               "calibration_windows": len(shared.sequences)},
            "calibration_text": ctx.calibration_text()} if raw["onnx"] else {}
    return CandidateTask(
        name=name, source=raw["folder"] or str(ctx.source.path), trust_remote_code=ctx.source.trust_remote_code,
        narrowed=bool(raw["width"]),
        out=str(ctx.record.artifacts_dir / f"{ctx.source.display_name}-{name}{'' if onnx else '.gguf'}"), **onnx,
        types=planner.renamed(raw["types"], raw["drop"]), drop_blocks=raw["dropped"],
        file_type=_file_type(8 * raw["tensor_bytes"] / planner.params), method=cfg.method,
        sequences=shared.sequences, verify=shared.verify, eval_windows=shared.eval_windows,
        reference=str(reference_folder(ctx)), kv_types=list(kv_types), context=cfg.context, prompt=shared.prompt,
        gen_tokens=cfg.gen_tokens, repeats=cfg.repeats, scores=shared.scores,
        encoded_cache=str(ctx.record.folder / "scratch" / "encoded") if raw["width"] else shared.encoded,
        threads=ctx.options.resolved_threads(), dtype=ctx.options.dtype,
        energy=EnergyMeter.detect(planner.host).to_dict())


def _keep(ctx: RunContext, task, raw: dict, res: dict) -> Built:
    """A built file into the run's record (its task wrote it atomically into the artifacts folder)."""
    path = Path(res["path"])
    ctx.emit("artifact", **ctx.record.add_artifact(path))
    ctx.log(f"{path.name}: {raw['file_bytes'] / 1e6:.1f} MB {'predicted' if raw['onnx'] else 'planned'}, built and "
            f"checked in {res['seconds']:.0f} s (KL to the source {res['agreement']['verify_kl']:.2g} on the check windows)")
    options = {k: v for k, v in task.export_options().items() if k != "calibration_text"} if task.format == "onnx" else {}
    return Built(task.name, path, raw, res["seconds"], res["agreement"], options)


def _say_measured(ctx: RunContext, name: str, quality: dict, memory: int, bench: dict, pred, reused: bool) -> None:
    ctx.log(f"{name}: KL {quality.get('kl', 0):.5f} (predicted {pred.kl:.5f}), perplexity "
            f"{quality.get('ppl_increase_pct', 0):+.2f}%, memory {memory / 1e6:.0f} MB (predicted "
            f"{pred.memory_bytes / 1e6:.0f}), decode {bench['decode_tps']:.1f} tok/s here (projected "
            f"{pred.decode_tps_here:.1f})" + ("; its scores an earlier fit's of the same bytes" if reused else ""))


def _measured(ctx: RunContext, cfg: FitConfig, planner, budget, b: Built, kv: str, found: dict) -> dict:
    """One file with one KV-cache type, as measured: a variant of the run, and the planner's point."""
    from types import SimpleNamespace

    from ..planner import LIMIT_WORDS, Candidate, kv_element_bytes, violations
    from ..projection import device_speed, kv_cache_bytes
    from .evaluate import variant_metrics

    name = f"{b.name}-kv-{kv}"
    cand = Candidate(b.raw["tensor_bytes"], kv, b.raw["drop"], b.raw["onnx"], b.raw["speed"], b.raw["width"])
    pred = planner.predict(cand)
    raw = planner.raw(cand)
    base_ppl = ctx.record.variant("baseline")["metrics"]["perplexity"]
    quality = variant_metrics(SimpleNamespace(**found["evaluation"]), base_ppl)
    bench = found["benchmark"]
    ctx.add_variant(_variant(ctx, cfg, b, name, kv, pred))
    kv_bytes = kv_element_bytes(kv)
    # onnxruntime grows its cache as the context fills (measured at the benchmark's tokens): the rest of the app's
    # context is added; llama.cpp's cache was allocated for all of it
    growth = kv_cache_bytes(raw["info"], cfg.context - planner.tokens_used, kv_bytes) if cand.onnx else 0
    memory = bench["peak_rss_os_bytes"] + growth
    if budget.device.id == planner.host.id:
        tps_device = bench["decode_tps"]
    else:       # the device's roofline times the efficiency measured here (at most 1)
        tps_device = device_speed(bench["decode_tps"], raw["info"], budget.device, planner.host, planner.tokens_used,
                                  kv_bytes)[0]
    metrics = {**quality, **bench, "memory_at_context_bytes": memory, "kv_growth_bytes": growth,
               "predicted_memory_bytes": int(pred.memory_bytes),
               "predicted_kl": round(pred.kl, 6), "predicted_ppl_increase_pct": round(pred.ppl_increase_pct, 3),
               "projected_decode_tps_here": round(pred.decode_tps_here, 2), "projected_device": budget.device.id,
               "projected_decode_tps": round(tps_device, 2),
               "projected_j_per_token": round(budget.device.power_typical_w / tps_device, 6),
               "predicted_memory_error_pct": round(100 * (pred.memory_bytes / memory - 1), 2),
               "projected_decode_error_pct": round(100 * (pred.decode_tps_here / bench["decode_tps"] - 1), 2),
               **({"screened_windows": found["screened"]} if found.get("screened") else {}),
               **({"scores_reused": True} if found["evaluation"].get("reused") else {})}
    ctx.add_metrics(name, **metrics)
    _say_measured(ctx, name, quality, memory, bench, pred, bool(found["evaluation"].get("reused")))
    point = {"name": name, "label": cand.label, "format": cand.format, "onnx": cand.onnx, "kv_type": kv,
             "drop_blocks": cand.drop, "speed_weight": cand.speed, "width": cand.width,
             "structure_kl": raw["structure_kl"], "cost": raw["cost"], "memory_raw": raw["memory_raw"],
             "decode_tps_raw": raw["decode_tps_raw"], "decode_model": raw.get("decode_model", False),
             "memory_measured": memory,
             "decode_tps_measured": bench["decode_tps"], "contended": bench.get("contended", False),
             "decode_wait_share": bench.get("decode_wait_share"),
             "kl": quality.get("kl"), "kl_p999": quality.get("kl_p999"),
             "ppl_increase_pct": quality.get("ppl_increase_pct"), "top1": quality.get("top1"),
             "memory_bytes": memory, "kv_growth_bytes": growth, "decode_tps": tps_device,
             "j_per_token": budget.device.power_typical_w / tps_device, "file_bytes": b.raw["file_bytes"],
             "kv_bytes_per_token": kv_cache_bytes(raw["info"], 1, kv_bytes),
             "predicted": pred.to_dict(), **({"screened": found["screened"]} if found.get("screened") else {}),
             "scores_reused": bool(found["evaluation"].get("reused"))}
    missed = violations(budget, point)
    ctx.add_metrics(name, budget=budget.to_dict(), fits=not missed,
                    fit_reasons=[f"{LIMIT_WORDS[k]} {100 * x:.0f}% past its limit" for k, x in missed.items()])
    ctx.emit("plan", phase="measured", points=[point])
    return point


def _variant(ctx: RunContext, cfg: FitConfig, b: Built, name: str, kv: str, pred) -> Variant:
    from ..atomic import tree_size

    onnx = b.raw["onnx"]
    if onnx:
        options = b.task_options
        params = {"type": options["type"], **({"block_size": options["block_size"]} if "block_size" in options else {}),
                  "method": options.get("method", "rtn"), "runtime": "onnxruntime", "kv_type": "float32 (onnxruntime)"}
    else:
        params = {"type": "mixed (planned)", "kv_type": kv, "mix": "measured", "method": cfg.method,
                  "quantized_by": f"EdgeTailor {cfg.method}", **({"speed_weight": b.raw["speed"]} if b.raw["speed"] else {})}
    params.update(context=cfg.context, planned_bits_per_weight=round(pred.bits_per_weight, 3),
                  removed_blocks=b.raw["dropped"])
    if b.raw["width"]:
        params.update(mlp_channels_removed=b.raw["width"], healed="distilled from the source")
    return Variant(name=name, format="onnx" if onnx else "gguf", path=str(b.path.relative_to(ctx.record.folder)),
                   params=params, metrics={"size_bytes": tree_size(b.path), "export_seconds": round(b.seconds, 2),
                                           **b.agreement},
                   parent="baseline", steps=list(ctx.applied))


def _rejected(ctx: RunContext, planner, raw: dict, res: dict) -> dict:
    """A candidate whose file failed its check against the source: left out of the plan, and, for an ONNX scheme,
    the scheme with it (its loss is not what the weights' prices say)."""
    ctx.log(f"{res['name']} left out: {res['rejected']}", level="warning")
    if raw["onnx"]:
        planner.exclude_onnx(raw["onnx"])
    return {"name": res["name"], "onnx": raw["onnx"], "drop_blocks": raw["drop"], "speed_weight": raw["speed"],
            "width": raw["width"], "tensor_bytes": raw["tensor_bytes"],
            "problem": res["rejected"]}


def _refit(planner, measured: list[dict]) -> None:
    """The KV types' own KL (each against the same file at f16), then the scales."""
    by_file: dict[str, dict[str, float]] = {}
    for m in measured:
        if not m.get("onnx"):
            by_file.setdefault(m["label"].rsplit("-kv-", 1)[0], {})[m["kv_type"]] = m["kl"]
    for kls in by_file.values():
        if "f16" in kls:
            for kv, kl in kls.items():
                planner.calibration.kv_kl[kv] = max(0.0, kl - kls["f16"])
    planner.calibration.refit(measured)


def _record(ctx: RunContext, cfg, planner, budget, history, measured, rec, rejected: list[dict],
            reused: list[str]) -> None:
    from .. import atomic

    plan = {"budget": budget.to_dict(), "context": cfg.context, "device": budget.device.to_dict(),
            "kv_types": cfg.kv_types, "rounds": history, "measured": measured, "rejected": rejected,
            "calibration": planner.calibration.to_dict(), "recommendation": rec,
            "decode_model": planner.decode_model["method"] if planner.decode_model else None,
            "decode_speed_check": planner.decode_model.get("speed_check") if planner.decode_model else None,
            "decode_model_seconds": planner.decode_model["seconds_here"] if planner.decode_model else 0.0,
            "reused": reused,         # what an earlier fit of the model measured (``engine.measured_cache``)
            "narrower": [{"width": w, "intermediate_size": int(p.config.intermediate_size), "heldout_kl": round(p.width_kl, 6)}
                         for w, p in planner.widths.items() if w],
            "method": "predicted: memory (weights + KV + measured overhead), decode (GGUF: llama.cpp's decode cost "
                      "model measured on this machine where there is one, else the roofline; + the runtime's own "
                      "time fitted to the measured points), KL (second-order "
                      "cost of the planned types + the KV type's measured KL), each scaled to the measured points; "
                      "search: optuna NSGA-II with the budget as constraints; recommendation: measured figures "
                      "(memory and KL here, decode projected to the device from the speed measured here)"}
    with ctx.artifact("plan.json") as tmp:
        atomic.write_json(tmp, plan)
    ctx.record.manifest["recommendation"] = rec
    ctx.record.save()
    if rec.get("variant"):
        ctx.add_metrics(rec["variant"], recommended=True)
    ctx.report(recommended=rec.get("variant") or "none", candidates_built=len({m["name"].rsplit("-kv-", 1)[0]     # labels round sizes
                                                                                 for m in measured}))
    ctx.log(("Recommended: " + rec["variant"] + " — " if rec.get("variant") else "") + rec["reason"])

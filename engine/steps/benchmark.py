"""Benchmark every variant in a fresh process: memory, speed and energy, with predictions for a device."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step


@dataclass
class BenchmarkConfig:
    variants: list[str] = field(default_factory=list, metadata={"help": "names to benchmark; empty = all"})
    baseline: bool = field(default=True, metadata={"help": "also benchmark the untouched source model in torch"})
    prompt_tokens: int = field(default=128, metadata={"help": "prompt length (from the evaluation text)"})
    gen_tokens: int = field(default=64, metadata={"help": "tokens generated per pass (greedy)"})
    repeats: int = field(default=3, metadata={"help": "timed passes after one warm-up; speeds are medians"})
    n_ctx: int = field(default=512, metadata={"help": "context the runtime allocates (KV cache)"})
    device: str = field(default="this-machine", metadata={"help": "device profile for predictions and the fit "
                                                                   "check (edgetailor devices)"})
    max_memory_mb: float | None = field(default=None, metadata={"help": "budget: memory limit (default: the "
                                                                          "device's memory for apps)"})
    min_decode_tps: float | None = field(default=None, metadata={"help": "budget: slowest acceptable decode"})
    max_j_per_token: float | None = field(default=None, metadata={"help": "budget: energy limit"})
    max_ppl_increase_pct: float | None = field(default=None, metadata={"help": "budget: quality loss limit (%)"})
    max_kl: float | None = field(default=None, metadata={"help": "budget: KL limit"})
    alpha: float = field(default=0.5, metadata={"help": "weight of time in the optimization score"})
    beta: float = field(default=0.5, metadata={"help": "weight of energy in the optimization score"})
    sample_hz: float = field(default=25.0, metadata={"help": "memory sampling rate while a variant runs"})
    decode_model: bool = field(default=True, metadata={"help": "measure the runtime's decode costs on probes (once per machine, minutes) to project speed from the file alone; off: the device's speed is projected from each variant's speed measured here"})

    def __post_init__(self):
        if self.prompt_tokens < 1 or self.gen_tokens < 2 or self.repeats < 1:
            raise ValueError("prompt_tokens >= 1, gen_tokens >= 2 and repeats >= 1 are needed")
        if self.prompt_tokens + self.gen_tokens > self.n_ctx:
            raise ValueError(f"prompt_tokens + gen_tokens ({self.prompt_tokens + self.gen_tokens}) exceed n_ctx "
                             f"({self.n_ctx})")
        if self.sample_hz < 20:
            raise ValueError("sample_hz must be at least 20")


def budget_for(cfg: BenchmarkConfig):
    from ..devices import Budget, get_device

    return Budget(get_device(cfg.device), max_memory_bytes=cfg.max_memory_mb * 1e6 if cfg.max_memory_mb else None,
                  min_decode_tps=cfg.min_decode_tps, max_j_per_token=cfg.max_j_per_token,
                  max_ppl_increase_pct=cfg.max_ppl_increase_pct, max_kl=cfg.max_kl)


def prompt_ids(ctx: RunContext, n: int) -> list[int]:
    ids = list(ctx.tokenizer(ctx.eval_text()[: n * 20]).input_ids)[:n]
    if len(ids) < n:
        raise EdgeTailorError(f"The evaluation text gives only {len(ids)} prompt tokens.",
                              "Use a longer evaluation text or fewer prompt_tokens.")
    return ids


@dataclass
class Setting:
    """What every variant of one benchmark shares: the machine, its meter, the budget, the prompt."""
    host: object                  # devices.DeviceProfile of this machine, measured now
    meter: object                 # energy.EnergyMeter
    budget: object                # devices.Budget
    threads: int
    dtype: str
    prompt: list[int]
    used: int                     # tokens in the context after a pass (prompt + generated)
    decode_models: dict = field(default_factory=dict)    # format -> the runtime's measured decode costs
    overheads: dict = field(default_factory=dict)        # format -> the runtime's measured overhead (or None)


@register_step("benchmark", BenchmarkConfig, kind="measure",
               summary="Load time, peak memory, time to first token, prefill/decode tok/s and energy of every "
                       "variant, each in a fresh process; predicted memory and projected speed on a device",
               streamed_ram=lambda cfg, shape: benchmark_need(cfg, shape))     # defined below
def benchmark(ctx: RunContext, cfg: BenchmarkConfig) -> None:
    from ..devices import host_profile
    from ..energy import EnergyMeter
    from ..projection import variant_info

    host = host_profile(refresh=True)      # bandwidth and compute as they are now, beside the runs
    s = Setting(host, EnergyMeter.detect(host), budget_for(cfg), ctx.options.resolved_threads(), ctx.options.dtype,
                prompt_ids(ctx, cfg.prompt_tokens), cfg.prompt_tokens + cfg.gen_tokens)
    ctx.log(f"Energy: {s.meter.provenance}")
    ctx.log(f"This machine: {host.memory_bandwidth_gbs:g} GB/s copy bandwidth, {host.compute_gflops:g} GFLOP/s "
            f"float32 ({host.estimates['memory_bandwidth_gbs']})")
    if cfg.baseline and ctx.record.variant("baseline") is None:
        from .evaluate import record_reference_baseline

        record_reference_baseline(ctx)
    todo = _variants_to_run(ctx, cfg)
    infos = {}
    for v, fmt, path in todo:
        try:
            infos[v["name"]] = variant_info(fmt, path, s.dtype, tokens_used=s.used)
        except EdgeTailorError as exc:
            ctx.log(f"{v['name']}: no prediction ({exc.problem})", level="warning")
    if cfg.decode_model:
        _measure_decode_models(ctx, cfg, s, todo, infos)
    for k, (v, fmt, path) in enumerate(todo):
        ctx.check_cancelled()
        ctx.progress(k / len(todo), f"{v['name']}: predicting")
        _measure_overhead(ctx, cfg, s, fmt)
        _benchmark_one(ctx, cfg, s, v["name"], fmt, path, infos.get(v["name"]), k / len(todo), 1 / len(todo))
    record_scores(ctx, s.budget, cfg.alpha, cfg.beta)
    ctx.progress(1.0, "benchmarked")


def _variants_to_run(ctx: RunContext, cfg: BenchmarkConfig) -> list[tuple[dict, str, object]]:
    """(variant, format, path) of each variant to benchmark: the baseline from the source, files from the run."""
    todo = []
    for v in ctx.record.manifest["variants"]:
        if cfg.variants and v["name"] not in cfg.variants:
            continue
        if v["name"] == "baseline":
            if cfg.baseline or "baseline" in cfg.variants:
                todo.append(_baseline_to_run(ctx, v))
        elif v.get("path"):
            todo.append((v, v["format"], ctx.variant_path(v)))
        else:
            ctx.log(f"{v['name']} existed only in memory; export it to benchmark it", level="warning")
    missing = sorted(set(cfg.variants) - {v["name"] for v, _, _ in todo})
    if missing:
        raise EdgeTailorError(f"The run has no variant named {', '.join(missing)} to benchmark.",
                              f"Its variants: {', '.join(v['name'] for v in ctx.record.manifest['variants'])}.")
    return todo


def _baseline_to_run(ctx: RunContext, v: dict) -> tuple[dict, str, object]:
    """The untouched source as the run's reference runs it (``engine.reference.choose``): the torch model while it
    is small, else its 16-bit GGUF in llama.cpp (a 3B model's fp32 copy would take 12 GB)."""
    from ..reference import choose, reference_gguf

    choice = choose(ctx)
    if choice.format == "torch":
        return v, "torch", ctx.source.path
    return v, "gguf", reference_gguf(ctx, choice)


def benchmark_need(cfg: BenchmarkConfig, shape):
    """A model too large for its torch reference: the worker (and llama.cpp's decode cost probes), and one variant
    at a time in a child process, the largest being the 16-bit reference GGUF (mapped). None: small models, whose
    baseline runs in torch fp32 (the step's registered multiple)."""
    from ..footprint import PROCESS_BYTES, StepNeed, decode_probe_bytes
    from ..reference import TORCH_REFERENCE_MAX_BYTES

    if shape.fp32_bytes <= TORCH_REFERENCE_MAX_BYTES:
        return None
    worker = decode_probe_bytes(shape) if cfg.decode_model else PROCESS_BYTES
    kv = 2 * shape.layers * shape.kv_dim * cfg.n_ctx * 2
    parts = {"the worker (with llama.cpp's decode cost probes)": worker,
             "a variant's benchmark process and its KV cache": PROCESS_BYTES + kv,
             "the largest file benchmarked (at most 16-bit, mapped)": shape.params * 2}
    source = ", and the source as its 16-bit GGUF," if cfg.baseline else ""
    return StepNeed("benchmark", worker + PROCESS_BYTES + kv,
                    f"runs each variant{source} in llama.cpp, one at a time in a fresh process", parts,
                    mapped_bytes=shape.params * 2)


def _measure_decode_models(ctx: RunContext, cfg: BenchmarkConfig, s: Setting, todo, infos) -> None:
    """Each runtime's decode costs on probes of the source's shapes, for the storage types the variants use."""
    from ..probes import measure_decode_model

    for fmt in sorted({f for _, f, _ in todo}):
        types = {t for v, f, _ in todo if f == fmt and v["name"] in infos for t in infos[v["name"]].storage_types()}
        if not types:
            continue
        ctx.progress(0.0, f"{fmt}: measuring the runtime's decode costs")
        try:
            s.decode_models[fmt] = measure_decode_model(fmt, ctx.source.path, types, s.prompt, cfg.gen_tokens,
                                                        cfg.n_ctx, s.threads, s.dtype, s.meter, log=ctx.log)
            ctx.log(f"{fmt} decode cost model: {s.decode_models[fmt]['method']}")
        except EdgeTailorError as exc:
            ctx.log(f"{fmt}: {exc.problem}", level="warning")


def _measure_overhead(ctx: RunContext, cfg: BenchmarkConfig, s: Setting, fmt: str) -> None:
    from ..probes import measure_overhead

    if fmt in s.overheads:
        return
    try:
        s.overheads[fmt] = measure_overhead(fmt, ctx.source.path, s.prompt, cfg.gen_tokens, cfg.n_ctx, s.threads,
                                            s.dtype, s.meter)
        ctx.log(f"{fmt} runtime overhead {s.overheads[fmt]['overhead_bytes'] / 1e6:.1f} MB "
                f"({s.overheads[fmt]['method']})")
    except EdgeTailorError as exc:
        s.overheads[fmt] = None
        ctx.log(f"{fmt}: {exc.problem}", level="warning")


def _predictions(cfg: BenchmarkConfig, s: Setting, fmt: str, info) -> dict:
    """Memory predicted from the file, decode projected here and on the device (before it runs)."""
    from ..projection import predict_memory, project

    over, model = s.overheads.get(fmt), s.decode_models.get(fmt)
    predicted = predict_memory(info, cfg.n_ctx, s.used, over["overhead_bytes"] if over else None, s.dtype)
    here = project(s.host, info, cfg.n_ctx, s.used, over, s.dtype, model)
    there = project(s.budget.device, info, cfg.n_ctx, s.used, over, s.dtype, model)
    return {**predicted, "projected_decode_tps_here": round(here["decode_tps"], 2), "projected_bound_here": here["bound"],
            "projected_decode_method_here": here["decode_method"], "projected_device": there["device"],
            "projected_decode_tps": round(there["decode_tps"], 2),
            "projected_j_per_token": round(there["j_per_token"], 6), "projected_bound": there["bound"],
            "projected_decode_method": there["decode_method"]}


def _benchmark_one(ctx: RunContext, cfg: BenchmarkConfig, s: Setting, name: str, fmt: str, path, info,
                   start: float, share: float) -> None:
    """One variant in a fresh process, its predictions beside it; progress from ``start`` over ``share``."""
    from ..benchmark import benchmark_steady
    from ..projection import device_speed

    predicted = _predictions(cfg, s, fmt, info) if info is not None else {}
    total_tokens = (cfg.repeats + 1) * cfg.gen_tokens

    def on_sample(series, value):
        ctx.sample(series, value, name)
        if series == "tokens_done":
            ctx.progress(start + share * min(1.0, value / total_tokens), f"{name}: {int(value)} tokens")

    ctx.progress(start, f"{name}: loading")
    res = benchmark_steady(fmt, path, s.prompt, gen_tokens=cfg.gen_tokens, repeats=cfg.repeats, threads=s.threads,
                           n_ctx=cfg.n_ctx, dtype=s.dtype, meter=s.meter, sample_hz=cfg.sample_hz,
                           on_sample=on_sample, cancelled=ctx.cancel.is_set,
                           log=lambda m: ctx.log(m, level="warning"))
    metrics = {**res, **predicted}
    measured_model = s.decode_models.get(fmt) is not None
    if predicted and not measured_model and res.get("decode_tps"):
        # no decode model: the device's speed from this variant's own speed here, scaled by the two rooflines
        tps, how = device_speed(res["decode_tps"], info, s.budget.device, s.host, s.used)
        metrics.update(projected_decode_tps=round(tps, 2),
                       projected_j_per_token=round(s.budget.device.power_typical_w / tps, 6),
                       projected_decode_method=how)
    if predicted.get("predicted_memory_bytes"):
        metrics["predicted_memory_error_pct"] = round(
            100 * (predicted["predicted_memory_bytes"] / res["peak_rss_os_bytes"] - 1), 2)
    if predicted.get("projected_decode_tps_here") and res.get("decode_tps") and measured_model:
        metrics["projected_decode_error_pct"] = round(
            100 * (predicted["projected_decode_tps_here"] / res["decode_tps"] - 1), 2)
    ctx.add_metrics(name, **metrics)
    ctx.log(f"{name}: peak {res['peak_rss_os_bytes'] / 1e6:.1f} MB"
            + (f" (predicted {predicted['predicted_memory_bytes'] / 1e6:.1f})" if predicted else "")
            + f", TTFT {res['ttft_seconds'] * 1000:.0f} ms, prefill {res['prefill_tps']:.1f} tok/s, decode "
              f"{res['decode_tps']:.2f} tok/s"
            + (f" (projected {predicted['projected_decode_tps_here']:.1f})" if predicted else "")
            + f", {res['energy_j_per_token']:.4f} J/token ({'measured' if res['energy_measured'] else 'estimated'})")


def record_scores(ctx: RunContext, budget, alpha: float, beta: float) -> None:
    """Fit badge, optimization score and Pareto membership of every benchmarked variant, into the manifest."""
    from ..scoring import verdicts

    def projected_of(v: dict) -> dict | None:
        m = v.get("metrics", {})
        if budget.device.id == "this-machine" or "peak_rss_bytes" not in m:
            return None
        return {"memory_bytes": m.get("predicted_memory_bytes"), "decode_tps": m.get("projected_decode_tps"),
                "j_per_token": m.get("projected_j_per_token")}

    judged, _ = verdicts(ctx.record.manifest["variants"], budget, alpha, beta, projected_of)
    for name, j in judged.items():
        if "peak_rss_bytes" not in ctx.record.variant(name).get("metrics", {}):
            continue
        row = j["score"]
        extra = {"fits": j["fits"], "fit_reasons": j["fit_reasons"], "budget": budget.to_dict(), "pareto": j["pareto"]}
        if row["opt_score"] is not None:
            extra.update(opt_score=round(row["opt_score"], 5), opt_p_c=round(row["p_c"], 5),
                         opt_t_c=round(row["t_c"], 5), opt_e_c=round(row["e_c"], 5), opt_alpha=alpha, opt_beta=beta)
        ctx.add_metrics(name, **extra)

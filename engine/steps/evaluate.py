"""Measure quality: perplexity of every variant, KL divergence and top-1 agreement with the baseline."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..evaluate import ReferenceLogprobs, evaluate, make_windows
from ..registry import register_step
from ..runs import Variant
from ..runtimes import TorchRuntime, open_runtime


@dataclass
class EvaluateConfig:
    windows: int | None = field(default=None, metadata={"help": "windows to score (default: job option eval_windows)"})
    ctx: int | None = field(default=None, metadata={"help": "tokens per window (default: job option eval_ctx)"})
    variants: list[str] = field(default_factory=list, metadata={"help": "names to evaluate; empty = all not yet evaluated"})
    current: bool = field(default=False, metadata={"help": "also evaluate the transformed in-memory model (torch)"})

    def __post_init__(self):
        if self.windows is not None and self.windows < 1:
            raise ValueError("windows must be at least 1")


def reference_folder(ctx: RunContext):
    return ctx.record.folder / "scratch" / "reference"


def record_baseline(ctx: RunContext, fmt: str, dtype: str, reference: str | None = None) -> None:
    """The untouched source as the run's "baseline" variant (it has no file): size and parameters from headers."""
    from ..preflight import safetensors_parameter_count

    counted = safetensors_parameter_count(ctx.source.path)
    ctx.add_variant(Variant(name="baseline", format=fmt, path=None,
                            params={"dtype": dtype, "source": ctx.source.spec,
                                    **({"reference": reference} if reference else {})},
                            metrics={"size_bytes": counted[1] if counted else None,
                                     "parameters": counted[0] if counted else None}))


def record_reference_baseline(ctx: RunContext) -> None:
    """The "baseline" variant as the run's reference runs it (``engine.reference.choose``): the torch model in the
    run's dtype while it is small, else its 16-bit GGUF in llama.cpp."""
    from ..reference import choose

    choice = choose(ctx)
    record_baseline(ctx, choice.format, ctx.options.dtype if choice.format == "torch" else choice.type, choice.reason)


def ensure_baseline(ctx: RunContext, windows, span: tuple[float, float] = (0.0, 0.5), kept=None) -> dict:
    """Evaluate the untouched source model once per run; its log-probs become the KL reference. ``span``: the part
    of the calling step's progress it reports in. ``kept`` (``measured_cache.MeasuredCache``): the evaluation of
    an earlier run on the same windows with the same reference is taken from it (and this one kept there)."""
    ref = ReferenceLogprobs(reference_folder(ctx))
    base = ctx.record.variant("baseline")
    if base and "perplexity" in base.get("metrics", {}) and ref.has(len(windows)):
        return base
    record_reference_baseline(ctx)
    if kept is None:
        _measure_baseline(ctx, windows, span, ref)
        return ctx.record.variant("baseline")
    import json

    from ..measured_cache import link_or_copy
    from ..reference import choose

    choice = choose(ctx)
    folder = kept.made_folder("baseline", [windows, choice.format, choice.type, ctx.options.dtype],
                              lambda into: _measure_baseline(ctx, windows, span, ref, into))
    for i in range(len(windows)):
        link_or_copy(folder / ref.path(i).name, ref.path(i))
    if not ctx.record.variant("baseline").get("metrics", {}).get("perplexity"):
        ctx.add_metrics("baseline", **json.loads((folder / "baseline.json").read_text()))
    return ctx.record.variant("baseline")


def _measure_baseline(ctx: RunContext, windows, span: tuple[float, float], ref: ReferenceLogprobs, into=None) -> None:
    """The source evaluated on ``windows`` by its reference runtime, its log-probs into ``ref`` (and, with the
    figures, linked into the folder ``into``)."""
    from .. import atomic
    from ..measured_cache import link_or_copy
    from ..reference import open_reference

    with open_reference(ctx, n_ctx=len(windows[0])) as rt:
        res = evaluate(rt, windows, reference=ref, record_reference=True,
                       on_window=lambda i, n, ppl: (ctx.progress(span[0] + (span[1] - span[0]) * i / n,
                                                                 f"baseline {i}/{n}: ppl {ppl:.3f}"),
                                                    ctx.sample("perplexity", ppl, "baseline")),
                       cancelled=ctx.cancel.is_set)
    ctx.add_metrics("baseline", **variant_metrics(res, None))
    if into is not None:
        for i in range(len(windows)):
            link_or_copy(ref.path(i), into / ref.path(i).name)
        atomic.write_json(into / "baseline.json", variant_metrics(res, None))


def variant_metrics(res, base_ppl) -> dict:
    m = {"perplexity": round(res.perplexity, 5), "eval_tokens": res.tokens_scored, "eval_windows": res.windows,
         "eval_ctx": res.ctx, "eval_seconds": res.seconds, "eval_runtime": res.runtime}
    if res.kl is not None:
        m["kl"] = round(res.kl, 6)
        m["kl_p999"] = round(res.kl_p999, 6)
        m["top1"] = round(res.top1, 5)
    if base_ppl:
        m["ppl_increase_pct"] = round(100 * (res.perplexity / base_ppl - 1), 3)
    return m


def reference_need(step: str, shape):
    """Of the untouched source: a large model's reference is a 16-bit GGUF in llama.cpp (``engine.reference``),
    whose logits are kept before the variants run one at a time (each at most 16-bit, so never larger); a small
    one is the torch model (the registered multiple)."""
    from ..footprint import PROCESS_BYTES, StepNeed
    from ..reference import TORCH_REFERENCE_MAX_BYTES

    if shape.fp32_bytes <= TORCH_REFERENCE_MAX_BYTES:
        return None
    mapped = shape.params * 2
    return StepNeed(step, PROCESS_BYTES, "runs the 16-bit reference GGUF, then each variant, in llama.cpp",
                    {"process": PROCESS_BYTES, "reference (16-bit GGUF, mapped)": mapped}, mapped_bytes=mapped)


@register_step("evaluate", EvaluateConfig, kind="measure",
               summary="Perplexity, KL to the baseline and top-1 agreement of every variant, on the evaluation text",
               ram_multiple=2.0, streamed_ram=lambda cfg, shape: reference_need("evaluate", shape))
def evaluate_step(ctx: RunContext, cfg: EvaluateConfig) -> None:
    n_ctx = cfg.ctx or ctx.options.eval_ctx
    windows = make_windows(ctx.tokenizer, ctx.eval_text(), n_ctx, cfg.windows or ctx.options.eval_windows)
    base = ensure_baseline(ctx, windows)
    base_ppl = base["metrics"]["perplexity"]
    ref = ReferenceLogprobs(reference_folder(ctx))
    threads = ctx.options.resolved_threads()
    todo = [v for v in ctx.record.manifest["variants"] if v["name"] != "baseline"
            and (v["name"] in cfg.variants if cfg.variants else "perplexity" not in v.get("metrics", {}))]
    if cfg.current and ctx.applied:
        name = ctx.current_variant_name("torch")
        ctx.add_variant(Variant(name=name, format="torch", path=None, params={}, steps=list(ctx.applied),
                                metrics={"parameters": sum(p.numel() for p in ctx.model.parameters())}))
        todo.append(ctx.record.variant(name))
    for k, v in enumerate(todo):
        ctx.check_cancelled()
        if v["format"] == "torch":
            rt = TorchRuntime(ctx.model, threads)
        else:
            rt = open_runtime(v["format"], ctx.variant_path(v), n_ctx=n_ctx, threads=threads)
        try:
            res = evaluate(rt, windows, reference=ref,
                           on_window=lambda i, n, ppl, k=k, name=v["name"]: (
                               ctx.progress(0.5 + 0.5 * (k + i / n) / len(todo), f"{name} {i}/{n}: ppl {ppl:.3f}"),
                               ctx.sample("perplexity", ppl, name)),
                           cancelled=ctx.cancel.is_set)
        finally:
            rt.close()
        ctx.add_metrics(v["name"], **variant_metrics(res, base_ppl))
        ctx.log(f"{v['name']}: perplexity {res.perplexity:.4f} ({100 * (res.perplexity / base_ppl - 1):+.2f}%), "
                f"KL {res.kl:.5f}, top-1 {100 * res.top1:.1f}%")
    ctx.progress(1.0, "evaluated")

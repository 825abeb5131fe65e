"""Export the current model to a runtime format, one variant per type; each file is verified by loading it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..context import RunContext
from ..footprint import export_need
from ..plain import plain_weights
from ..registry import register_step
from ..runs import Variant
from ..verification import check_reference, export_checked


@dataclass
class ExportConfig:
    format: str = field(default="gguf", metadata={"help": "gguf or onnx"})
    types: list[str] = field(default_factory=lambda: ["F16"],
                             metadata={"help": "GGUF: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K IQ4_XS ...; "
                                               "ONNX: fp32 fp16 int8 int4"})
    options: dict = field(default_factory=dict, metadata={"help": "exporter-specific options"})
    verify: bool = field(default=True, metadata={"help": "run each file in its runtime against the model it was "
                                                         "written from (KL, top-1 on fixed windows) before keeping it"})

    def __post_init__(self):
        from ...exporters import get_exporter

        if not self.types:
            raise ValueError("give at least one type")
        exporter = get_exporter(self.format)          # an unknown format: the formats there are
        for t in self.types:                           # an unknown type: the types the format has
            exporter.check_options({**self.options, "type": t})


def _disk(cfg: ExportConfig, shape) -> float:
    """Each file, and for k-quants of a family llama.cpp's converter writes, the 16-bit (F32 under 2B parameters)
    intermediate llama.cpp's quantizer reads while they are written (``exporters.gguf.intermediate_type``);
    EdgeTailor's own writer encodes k-quants as it writes them (no intermediate)."""
    from ..preflight import GGUF_BITS_PER_WEIGHT

    bits = {"fp32": 32, "fp16": 16, "int8": 8.5, "int4": 4.6}
    total = 0.0
    for t in cfg.types:
        total += shape.params * (GGUF_BITS_PER_WEIGHT.get(t.upper()) or bits.get(t.lower(), 16)) / 8
    if cfg.format == "gguf" and not shape.gguf_own_writer and any(t.upper() not in ("F32", "F16", "BF16", "Q8_0") for t in cfg.types):
        sixteen_bit = shape.stored_bytes_per_weight <= 2 or shape.params >= 2_000_000_000
        total += shape.params * (2 if sixteen_bit else 4)
    return total


@dataclass
class ExportJob:
    """One file for ``export_variants`` to write: the variant's label (appended to the current model's name),
    the exporter's options (``type`` among them) and the parameters recorded with the variant."""
    label: str
    options: dict
    params: dict = field(default_factory=dict)


#: what an exporter's result info says that a variant's params keep
RECORDED_INFO = ("type", "kept_f16", "quantized_by", "fallback_tensors", "block_size", "method", "target_bytes")


def export_variants(ctx: RunContext, exporter, model, jobs: list[ExportJob], verify: bool = True,
                    on_written: Callable[[dict], None] | None = None) -> None:
    """Write each job's file atomically into the run, check it (loaded in its runtime, then KL / top-1 against
    ``model`` on fixed windows) and record it as a variant; ``on_written`` sees each result's info."""
    from ..atomic import tree_size

    n = len(jobs)
    for i, job in enumerate(jobs):
        ctx.check_cancelled()
        variant = ctx.current_variant_name(job.label)
        filename = f"{ctx.source.display_name}-{variant}{exporter.suffix}"
        qtype = job.options.get("type")
        ctx.progress(i / n, f"{exporter.format} {job.label}")
        with ctx.artifact(filename) as tmp:
            result, seconds, checked, agreement = export_checked(
                exporter, model, ctx.tokenizer, ctx.source.path, tmp, job.options,
                (lambda: check_reference(ctx, model)) if verify else None, threads=ctx.options.resolved_threads(),
                progress=lambda f, m, i=i, q=qtype: ctx.progress((i + f * 0.9) / n, f"{q}: {m}"),
                cancelled=ctx.cancel.is_set)
        if on_written:
            on_written(result.info)
        path = ctx.record.artifacts_dir / filename
        size = tree_size(path)
        ctx.add_variant(Variant(
            name=variant, format=exporter.format, path=str(path.relative_to(ctx.record.folder)),
            params={**job.params, **{k: v for k, v in result.info.items() if k in RECORDED_INFO}},
            metrics={"size_bytes": size, "export_seconds": round(seconds, 3), **agreement},
            parent="baseline", steps=list(ctx.applied)))
        ctx.log(f"{filename}: {size / 1e6:.1f} MB in {seconds:.1f} s"
                + (f", verified by {checked.get('loaded_by')}" if checked else "")
                + (f": KL {agreement['verify_kl']:.2g}, top-1 {agreement['verify_top1']:.0%} against the source"
                   if agreement else ""))
    ctx.progress(1.0, "exported")


@register_step("export", ExportConfig, kind="export",
               summary="Write the current model as GGUF or ONNX files (one variant per type), each loaded back",
               exports="this is the export", disk_bytes=_disk,
               streamed_ram=lambda cfg, shape: export_need("export", shape, cfg.format, cfg.types, cfg.options,
                                                            cfg.verify))
def export(ctx: RunContext, cfg: ExportConfig) -> None:
    from ...exporters import get_exporter

    # GGUF and ONNX (on EdgeTailor's graph) are written from the current model's files read lazily (the
    # source's, with the blocks of streamed transforms in place; no fp32 copy) unless a step loaded it;
    # a loaded model has its factored layers (low-rank) multiplied back for the file formats
    model = ctx.weights()
    if not getattr(model, "is_lazy", False):
        model = plain_weights(model)
    shared = {"threads": ctx.options.resolved_threads(), **cfg.options}
    if not ctx.applied and any(ctx.source.path.glob("*.safetensors")):
        shared.setdefault("source_dir", ctx.source.path)       # untouched: writers may read the files lazily
    if cfg.format == "onnx" and shared.get("method") == "gptq":
        shared.setdefault("calibration_text", ctx.calibration_text())
    jobs = [ExportJob(t, {**shared, "type": t}, {"type": t}) for t in cfg.types]
    export_variants(ctx, get_exporter(cfg.format), model, jobs, verify=cfg.verify)

"""Export the current model to a runtime format, one variant per type; each file is verified by loading it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..context import RunContext
from ..errors import EdgeTailorError
from ..footprint import export_need
from ..plain import plain_weights
from ..registry import register_step
from ..runs import Variant
from ..verification import check_variant

SUFFIX = {"gguf": ".gguf", "onnx": ""}     # ONNX variants are folders


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


def _disk(cfg: ExportConfig, params_total: int) -> float:
    from ..preflight import GGUF_BITS_PER_WEIGHT

    bits = {"fp32": 32, "fp16": 16, "int8": 8.5, "int4": 4.6}
    total = 0.0
    for t in cfg.types:
        total += params_total * (GGUF_BITS_PER_WEIGHT.get(t.upper()) or bits.get(t.lower(), 16)) / 8
    # k-quants are made from an intermediate file that exists while they are written
    if cfg.format == "gguf" and any(t.upper() not in ("F32", "F16", "BF16", "Q8_0") for t in cfg.types):
        total += params_total * 4
    return total


@register_step("export", ExportConfig, kind="export",
               summary="Write the current model as GGUF or ONNX files (one variant per type), each loaded back",
               exports="this is the export", disk_bytes=_disk,
               streamed_ram=lambda cfg, shape: export_need("export", shape, cfg.format == "gguf"))
def export(ctx: RunContext, cfg: ExportConfig) -> None:
    from ...exporters import get_exporter

    exporter = get_exporter(cfg.format)
    # GGUF of the untouched source is written from its files read lazily (no fp32 copy); otherwise the current
    # model, with factored layers (low-rank) multiplied back for the file formats
    model = ctx.source_weights() if cfg.format == "gguf" else plain_weights(ctx.model)
    if not getattr(model, "is_lazy", False):
        model = plain_weights(model)
    model_name = ctx.source.display_name
    n = len(cfg.types)
    for i, t in enumerate(cfg.types):
        ctx.check_cancelled()
        variant = ctx.current_variant_name(t)
        filename = f"{model_name}-{variant}{SUFFIX.get(cfg.format, '')}"
        ctx.progress(i / n, f"{cfg.format} {t}")
        t0 = time.perf_counter()
        options = {"threads": ctx.options.resolved_threads(), **cfg.options, "type": t}
        if not ctx.applied and any(ctx.source.path.glob("*.safetensors")):
            options.setdefault("source_dir", ctx.source.path)    # untouched: writers may read the files lazily
        if cfg.format == "onnx" and options.get("method") == "gptq":
            options.setdefault("calibration_text", ctx.calibration_text())

        def sub(f, m, i=i):
            ctx.progress((i + f * 0.9) / n, f"{t}: {m}")

        with ctx.artifact(filename) as tmp:
            result = exporter.export(model, ctx.tokenizer, ctx.source.path, tmp, options,
                                     progress=sub, cancelled=ctx.cancel.is_set)
            seconds = time.perf_counter() - t0
            checked = exporter.verify(tmp) if cfg.verify else {}
            if cfg.verify and not checked:
                raise EdgeTailorError(f"{filename} could not be verified.", "See the log.")
            agreement = check_variant(ctx, model, cfg.format, t, tmp) if cfg.verify else {}
        size = (ctx.record.artifacts_dir / filename)
        from ..atomic import tree_size

        ctx.add_variant(Variant(
            name=variant, format=cfg.format, path=str((ctx.record.artifacts_dir / filename).relative_to(ctx.record.folder)),
            params={"type": t, **{k: v for k, v in result.info.items() if k in ("type", "kept_f16", "quantized_by", "fallback_tensors",
                                                                        "block_size", "method")}},
            metrics={"size_bytes": tree_size(size), "export_seconds": round(seconds, 3), **agreement},
            parent="baseline", steps=list(ctx.applied)))
        ctx.log(f"{filename}: {tree_size(size) / 1e6:.1f} MB in {seconds:.1f} s"
                + (f", verified by {checked.get('loaded_by')}" if checked else "")
                + (f": KL {agreement['verify_kl']:.2g}, top-1 {agreement['verify_top1']:.0%} against the source"
                   if agreement else ""))
    ctx.progress(1.0, "exported")


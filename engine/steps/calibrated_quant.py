"""Importance statistics from calibration text, and GGUF files quantized with them.

``imatrix`` runs the calibration text through the current model and keeps, for every linear layer, the
per-input-channel second moments (llama.cpp's importance matrix) and, if asked, the inputs' X^T X (GPTQ's
Hessian); they are saved with the run as ``imatrix.safetensors`` (and in llama.cpp's imatrix GGUF format).
``quant.gguf_calibrated`` writes llama.cpp's type mixes (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) with EdgeTailor's
own blocks, measuring the same statistics one decoder block at a time as it goes (and saving them with the
run when no imatrix step did). With ``mix: measured`` (or a size target) each tensor's type is chosen by its
measured effect on the loss (``engine.sensitivity``) instead, at the size of llama.cpp's file of that type.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step
from ..runs import Variant

METHODS = ("gptq", "imatrix")
#: where each file's per-tensor types come from: llama.cpp's mix of the named type, or EdgeTailor's plan by
#: measured sensitivity at the size of llama.cpp's file of that type (never larger)
MIXES = ("llama.cpp", "measured")
#: tokens per calibration sequence, as llama-imatrix's default context
SEQ_LEN = 512


@dataclass
class ImatrixConfig:
    seq_len: int = field(default=SEQ_LEN, metadata={"help": "tokens per calibration sequence"})
    max_sequences: int | None = field(default=None, metadata={"help": "at most this many sequences (default: all the text gives)"})
    hessians: bool = field(default=False, metadata={"help": "also keep X^T X per layer input (AWQ's search uses it; the calibrated GGUF writer measures its own, one block at a time)"})

    def __post_init__(self):
        if self.seq_len < 64:
            raise ValueError("seq_len must be at least 64")


def compute_stats(ctx: RunContext, cfg: ImatrixConfig):
    from ..calibration import token_sequences
    from ..imatrix import collect

    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.max_sequences)
    ctx.log(f"Calibration: {len(seqs)} sequences of {seqs.shape[1]} tokens")
    model = ctx.source_weights()        # the untouched source: its files, one block at a time
    stats = collect(model, seqs, hessians=cfg.hessians,
                    progress=lambda f, m: ctx.progress(0.95 * f, m), cancelled=ctx.cancel.is_set)
    keep_stats(ctx, stats, model, cfg.seq_len)
    return stats


def keep_stats(ctx: RunContext, stats, model, seq_len: int = 512) -> None:
    """Save the statistics with the run (ours and llama.cpp's format) and hold them for the next steps."""
    from ..architectures import arch_spec
    from ..imatrix import save_llama_imatrix

    with ctx.artifact("imatrix.safetensors") as tmp:
        stats.save(tmp)
    if arch_spec(model.config.model_type) is not None:
        with ctx.artifact("imatrix-llama.cpp.gguf") as tmp:       # reusable with llama-quantize --imatrix
            save_llama_imatrix(stats, model, tmp, "calibration text", seq_len)
    ctx.hold("imatrix", stats)


def _imatrix_ram(cfg: ImatrixConfig, shape):
    from ..footprint import calibrated_need, calibration_tokens

    need = calibrated_need("imatrix", shape, calibration_tokens(cfg.max_sequences, cfg.seq_len), cfg.seq_len,
                           gptq=False, measured=False, quantizes=False)
    if cfg.hessians:      # X^T X of every distinct input of every block, kept for the next steps
        held = shape.layers * (2 * shape.hidden ** 2 + shape.q_dim ** 2 + shape.intermediate ** 2) * 4
        need.parts["X^T X of every layer input"] = held
        need.ram_bytes += held
    return need


def _calibrated_disk(cfg: "CalibratedQuantConfig", params_total: int) -> float:
    """Each file, and its blocks in a scratch file while it is assembled."""
    from ..preflight import GGUF_BITS_PER_WEIGHT

    if cfg.target_mb is not None:
        return 2 * cfg.target_mb * 1e6
    bits = [cfg.target_bpw] if cfg.target_bpw is not None else [GGUF_BITS_PER_WEIGHT.get(t.upper(), 8.5) for t in cfg.types]
    return sum(2 * params_total * b / 8 for b in bits)


def _calibrated_ram(cfg: "CalibratedQuantConfig", shape):
    from ..footprint import calibrated_need, calibration_tokens

    return calibrated_need("quant.gguf_calibrated", shape, calibration_tokens(cfg.max_sequences, cfg.seq_len),
                           cfg.seq_len, gptq=cfg.method == "gptq",
                           measured=cfg.mix == "measured" or cfg.target_mb is not None or cfg.target_bpw is not None)


@register_step("imatrix", ImatrixConfig, kind="measure", streamed_ram=_imatrix_ram,
               summary="Importance statistics of every linear layer's inputs on the calibration text (saved with the run)")
def imatrix_step(ctx: RunContext, cfg: ImatrixConfig) -> None:
    compute_stats(ctx, cfg)
    ctx.progress(1.0, "importance statistics saved")


@dataclass
class CalibratedQuantConfig:
    types: list[str] = field(default_factory=lambda: ["Q4_K_M"],
                             metadata={"help": "llama.cpp type mixes: Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K (also Q5_K_S, Q4_K_S, Q3_K_S ...)"})
    method: str = field(default="gptq", metadata={"help": "gptq (error feedback through the Hessian) or imatrix (weighted search only)"})
    mix: str = field(default="llama.cpp", metadata={"help": "llama.cpp: llama.cpp's types for each tensor; measured: types chosen by measured sensitivity, at the size of llama.cpp's file of that type"})
    target_mb: float | None = field(default=None, metadata={"help": "instead of types: one mixed-precision file of this size (MB, within 2%)"})
    target_bpw: float | None = field(default=None, metadata={"help": "instead of types: one mixed-precision file of this many bits per weight"})
    verify: bool = field(default=True, metadata={"help": "load each file back in llama.cpp before keeping it"})
    seq_len: int = field(default=SEQ_LEN, metadata={"help": "tokens per calibration sequence"})
    max_sequences: int | None = field(default=None, metadata={"help": "at most this many calibration sequences (default: all the text gives)"})

    def __post_init__(self):
        if self.seq_len < 64:
            raise ValueError("seq_len must be at least 64")
        if not self.types:
            raise ValueError("give at least one type")
        if self.target_mb is not None and self.target_bpw is not None:
            raise ValueError("give target_mb or target_bpw, not both")
        if (self.target_mb is not None and self.target_mb <= 0) or (self.target_bpw is not None and self.target_bpw <= 0):
            raise ValueError("a size target must be positive")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}")


def current_stats(ctx: RunContext, need_hessians: bool):
    held = ctx.held("imatrix")
    if held is not None and (held.has_hessians() or not need_hessians):
        return held
    return compute_stats(ctx, ImatrixConfig(hessians=need_hessians))


@register_step("quant.gguf_calibrated", CalibratedQuantConfig, kind="export",
               summary="GGUF k-quant mixes with EdgeTailor's calibrated blocks (importance-weighted, GPTQ)",
               exports="this is the export (GGUF)", streamed_ram=_calibrated_ram, disk_bytes=_calibrated_disk)
def calibrated_quant(ctx: RunContext, cfg: CalibratedQuantConfig) -> None:
    from ...exporters.gguf import verify_gguf
    from ...exporters.gguf_calibrated import export_calibrated, export_to_target
    from ..architectures import gguf_writer_for
    from ..atomic import tree_size
    from ..calibration import token_sequences
    from ..errors import UnsupportedModelError
    from ..verification import check_variant

    # the untouched source is read from its files one block at a time (no fp32 copy of the model); a transformed
    # model is the one in memory
    model = ctx.source_weights()
    if gguf_writer_for(model.config) != "edgetailor":
        raise UnsupportedModelError(
            f"Calibrated GGUF blocks go into EdgeTailor's own GGUF writer, which does not cover this "
            f"'{model.config.model_type}' model (its family, or attention/MLP biases).",
            "Use the export step with llama.cpp's types (Q4_K_M, ...) for this model.")
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.max_sequences)
    ctx.log(f"Calibration: {len(seqs)} sequences of {seqs.shape[1]} tokens, walked one decoder block at a time")
    target = None
    if cfg.target_mb is not None:
        target = int(cfg.target_mb * 1e6)
    elif cfg.target_bpw is not None:
        params = sum(p.numel() for k, p in model.state_dict().items() if k != "lm_head.weight"
                     or not getattr(model.config, "tie_word_embeddings", False))
        target = int(cfg.target_bpw * params / 8)
    planned = bool(target) or cfg.mix == "measured"
    sensitivity = None
    if planned:
        from ..sensitivity import measure_sensitivity

        sensitivity = measure_sensitivity(model, seqs, progress=lambda f, m: ctx.progress(0.05 * f, m),
                                          cancelled=ctx.cancel.is_set)
        ctx.log(f"Sensitivity: loss gradients and input moments of every linear layer on {sensitivity.tokens} tokens")
    types = [f"{target / 1e6:.2f}MB"] if target else [t.upper() for t in cfg.types]
    n = len(types)
    for i, t in enumerate(types):
        ctx.check_cancelled()
        label = f"{t}-{cfg.method}" + ("-measured" if planned and not target else "")
        variant = ctx.current_variant_name(label)
        filename = f"{ctx.source.display_name}-{variant}.gguf"
        t0 = time.perf_counter()
        with ctx.artifact(filename) as tmp:
            sub = (lambda f, m, i=i, t=t: ctx.progress((i + 0.9 * f) / n, f"{t}: {m}"))
            if planned:
                info = export_to_target(model, ctx.tokenizer, ctx.source.path, tmp, target, seqs, cfg.method,
                                        progress=sub, cancelled=ctx.cancel.is_set, like=None if target else t,
                                        sensitivity=sensitivity)
            else:
                info = export_calibrated(model, ctx.tokenizer, ctx.source.path, tmp, t, seqs, cfg.method,
                                         progress=sub, cancelled=ctx.cancel.is_set)
            seconds = time.perf_counter() - t0
            checked = verify_gguf(tmp) if cfg.verify else {}
            if cfg.verify and not checked:
                raise EdgeTailorError(f"{filename} could not be verified.", "See the log.")
            agreement = check_variant(ctx, model, "gguf", t, tmp) if cfg.verify else {}
        if ctx.held("imatrix") is None:
            keep_stats(ctx, info["stats"], model, cfg.seq_len)      # the statistics these blocks were fitted with, saved
        path = ctx.record.artifacts_dir / filename
        ctx.add_variant(Variant(
            name=variant, format="gguf", path=str(path.relative_to(ctx.record.folder)),
            params={"type": info["type"], "method": cfg.method, "mix": "measured" if planned else "llama.cpp",
                    "quantized_by": info["quantized_by"],
                    "calibration_tokens": int(seqs.numel()), **({"target_bytes": info["target_bytes"]} if planned else {})},
            metrics={"size_bytes": tree_size(path), "export_seconds": round(seconds, 3), **agreement},
            parent="baseline", steps=list(ctx.applied)))
        ctx.log(f"{filename}: {tree_size(path) / 1e6:.1f} MB in {seconds:.1f} s")
    ctx.progress(1.0, "exported")

"""The ``imatrix`` step: importance statistics of every linear layer's inputs on the calibration text.

It runs the calibration text through the current model one decoder block at a time and keeps, for every linear
layer, the per-input-channel second moments (llama.cpp's importance matrix) and, if asked, the inputs' X^T X
(GPTQ's Hessian); they are saved with the run as ``imatrix.safetensors`` (and in llama.cpp's imatrix GGUF
format) and held for later steps (``current_stats``: AWQ, the calibrated GGUF writer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..registry import register_step

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
    model = ctx.weights()        # the current model: its files, one block at a time (unless a step loaded it)
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
    from ..footprint import calibrated_need, calibration_tokens, hessians_bytes

    need = calibrated_need("imatrix", shape, calibration_tokens(cfg.max_sequences, cfg.seq_len), cfg.seq_len,
                           gptq=False, measured=False, quantizes=False)
    if cfg.hessians:      # X^T X of every distinct input of every block, kept for the next steps
        held = hessians_bytes(shape)
        need.parts["X^T X of every layer input"] = held
        need.ram_bytes += held
    return need


@register_step("imatrix", ImatrixConfig, kind="measure", streamed_ram=_imatrix_ram,
               summary="Importance statistics of every linear layer's inputs on the calibration text (saved with the run)")
def imatrix_step(ctx: RunContext, cfg: ImatrixConfig) -> None:
    compute_stats(ctx, cfg)
    ctx.progress(1.0, "importance statistics saved")


def current_stats(ctx: RunContext, need_hessians: bool):
    held = ctx.held("imatrix")
    if held is not None and (held.has_hessians() or not need_hessians):
        return held
    return compute_stats(ctx, ImatrixConfig(hessians=need_hessians))

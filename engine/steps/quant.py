"""The ``quant.gguf_calibrated`` step: GGUF files with EdgeTailor's calibrated blocks.

It writes llama.cpp's type mixes (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) with EdgeTailor's
own blocks, measuring the same statistics one decoder block at a time as it goes (and saving them with the
run when no imatrix step did). With ``mix: measured`` (or a size target) each tensor's type is chosen by its
measured effect on the loss (``engine.sensitivity``) instead, at the size of llama.cpp's file of that type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..registry import register_step
from .imatrix import SEQ_LEN

METHODS = ("gptq", "imatrix")
#: where each file's per-tensor types come from: llama.cpp's mix of the named type, or EdgeTailor's plan by
#: measured sensitivity at the size of llama.cpp's file of that type (never larger)
MIXES = ("llama.cpp", "measured")


def _calibrated_disk(cfg: "CalibratedQuantConfig", shape) -> float:
    """Each file, and its blocks in a scratch file while it is assembled."""
    from ..preflight import GGUF_BITS_PER_WEIGHT

    if cfg.target_mb is not None:
        return 2 * cfg.target_mb * 1e6
    bits = [cfg.target_bpw] if cfg.target_bpw is not None else [GGUF_BITS_PER_WEIGHT.get(t.upper(), 8.5) for t in cfg.types]
    return sum(2 * shape.params * b / 8 for b in bits)


def _calibrated_ram(cfg: "CalibratedQuantConfig", shape):
    from ..footprint import calibrated_need, calibration_tokens

    return calibrated_need("quant.gguf_calibrated", shape, calibration_tokens(cfg.max_sequences, cfg.seq_len),
                           cfg.seq_len, gptq=cfg.method == "gptq",
                           measured=cfg.measured,
                           verify=cfg.verify)


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

    @property
    def measured(self) -> bool:
        """Each tensor's type chosen by measured sensitivity (a measured mix or a size target)."""
        return self.mix == "measured" or self.target_mb is not None or self.target_bpw is not None

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


@register_step("quant.gguf_calibrated", CalibratedQuantConfig, kind="export",
               summary="GGUF k-quant mixes with EdgeTailor's calibrated blocks (importance-weighted, GPTQ)",
               exports="this is the export (GGUF)", streamed_ram=_calibrated_ram, disk_bytes=_calibrated_disk)
def calibrated_quant(ctx: RunContext, cfg: CalibratedQuantConfig) -> None:
    from ...exporters import get_exporter
    from ...exporters.gguf_calibrated import Calibration, require_own_writer
    from ..calibration import token_sequences
    from .export import ExportJob, export_variants
    from .imatrix import keep_stats

    # the current model is read from its files one block at a time (no fp32 copy) unless a step loaded it
    model = ctx.weights()
    require_own_writer(model.config)
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.max_sequences)
    ctx.log(f"Calibration: {len(seqs)} sequences of {seqs.shape[1]} tokens, walked one decoder block at a time")
    cal = Calibration(seqs, cfg.method, cfg.mix, _target_bytes(cfg, model))
    if cal.planned:
        from ..sensitivity import measure_sensitivity

        cal.sensitivity = measure_sensitivity(model, seqs, progress=lambda f, m: ctx.progress(0.05 * f, m),
                                              cancelled=ctx.cancel.is_set)
        ctx.log(f"Sensitivity: loss gradients and input moments of every linear layer on {cal.sensitivity.tokens} "
                "tokens")
    types = [f"{cal.target_bytes / 1e6:.2f}MB"] if cal.target_bytes else [t.upper() for t in cfg.types]
    params = {"method": cfg.method, "mix": "measured" if cal.planned else "llama.cpp",
              "calibration_tokens": int(seqs.numel())}
    jobs = [ExportJob(f"{t}-{cfg.method}" + ("-measured" if cal.planned and not cal.target_bytes else ""),
                      {"type": t, "calibration": cal}, params) for t in types]

    def keep(info: dict) -> None:          # the statistics the blocks were fitted with, saved with the run
        if ctx.held("imatrix") is None:
            keep_stats(ctx, info["stats"], model, cfg.seq_len)

    export_variants(ctx, get_exporter("gguf"), model, jobs, verify=cfg.verify, on_written=keep)


def _target_bytes(cfg: CalibratedQuantConfig, model) -> int | None:
    if cfg.target_mb is not None:
        return int(cfg.target_mb * 1e6)
    if cfg.target_bpw is not None:
        params = sum(p.numel() for k, p in model.state_dict().items() if k != "lm_head.weight"
                     or not getattr(model.config, "tie_word_embeddings", False))
        return int(cfg.target_bpw * params / 8)
    return None

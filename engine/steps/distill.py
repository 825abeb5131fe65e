"""The ``distill`` step: the untouched source model teaches the current (compressed) model.

The training loop lives in ``engine/distill.py`` (reusable by other healing steps); this step feeds it
calibration text, reports progress and loss, writes checkpoints into ``<run>/checkpoints/`` and can resume
from another run's checkpoints. Held-out text (the tail of the calibration text, never trained on) shows
whether the student got closer to the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step

EXPORTS = "GGUF and ONNX natively: distillation changes weight values only"


@dataclass
class DistillConfig:
    max_minutes: float = field(default=10.0, metadata={"help": "training time limit (0 = steps only)"})
    steps: int = field(default=0, metadata={"help": "total training steps, resumed ones included (0 = time only)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (warm-up, then cosine decay)"})
    batch_size: int = field(default=1, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    stride: int = field(default=64, metadata={"help": "offset between overlapping training sequences"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the logit KL"})
    hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state (cosine) loss; 0 = logits only"})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 autocast for the forward passes (default: "
                                                              "on where the CPU has AVX512-BF16/AMX)"})
    train_embeddings: bool = field(default=False, metadata={"help": "also train the token embeddings and output head"})
    text: str = field(default="", metadata={"help": "training text file (default: the job's calibration text)"})
    heldout_share: float = field(default=0.1, metadata={"help": "share of the text held out to measure KL before and after"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=1, metadata={"help": "newest checkpoints kept"})
    resume_from: str = field(default="", metadata={"help": "run folder, checkpoints folder or checkpoint to resume from"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})

    def __post_init__(self):
        if self.max_minutes < 0 or self.steps < 0:
            raise ValueError("max_minutes and steps cannot be negative")
        if not self.max_minutes and not self.steps:
            raise ValueError("give max_minutes and/or steps")
        if self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0 or self.stride < 1:
            raise ValueError("lr, batch_size, temperature and stride must be positive")
        if not 0.0 <= self.heldout_share < 0.5:
            raise ValueError("heldout_share must be in [0, 0.5)")


def split_heldout(text: str, share: float) -> tuple[str, str]:
    """(training part, held-out tail) split at a paragraph break near ``1 - share`` of the text."""
    if share <= 0:
        return text, ""
    cut = int(len(text) * (1 - share))
    para = text.find("\n\n", cut)
    cut = para if 0 <= para < len(text) - 200 else cut
    return text[:cut], text[cut:]


def training_text(ctx: RunContext, cfg) -> str:
    from .. import text as texts

    return texts.read_text(cfg.text) if cfg.text else ctx.calibration_text()


def resolved_bf16(bf16: bool | None) -> bool:
    """The bf16 setting of a training step: as given, else on where the CPU computes bf16 natively."""
    from ..devices import cpu_has_bf16

    return cpu_has_bf16() if bf16 is None else bool(bf16)


def _distill_need(cfg: DistillConfig, shape):
    from ..footprint import training_need

    trainable = shape.params if cfg.train_embeddings else max(shape.params - shape.embedding_params, 0)
    return training_need("distill", shape, trainable, cfg.batch_size * cfg.seq_len, cfg.seq_len, teacher=True,
                         bf16=resolved_bf16(cfg.bf16))


@register_step("distill", DistillConfig, kind="transform", exports=EXPORTS, held_ram=_distill_need,
               summary="Knowledge distillation: the original model teaches the compressed one on calibration text "
                       "(logit KL, optional hidden-state loss), with checkpoints and resume")
def distill_step(ctx: RunContext, cfg: DistillConfig) -> None:
    import torch

    from ..calibration import token_sequences
    from ..distill import distill, mean_kl
    from ..modeling import load_model

    torch.set_num_threads(ctx.options.resolved_threads())
    train_text, heldout_text = split_heldout(training_text(ctx, cfg), cfg.heldout_share)
    seqs = token_sequences(ctx.tokenizer, train_text, cfg.seq_len, stride=cfg.stride)
    heldout = None
    if heldout_text:
        try:
            heldout = token_sequences(ctx.tokenizer, heldout_text, cfg.seq_len, max_sequences=8)
        except EdgeTailorError:
            ctx.log("The held-out part of the text is shorter than one sequence; no held-out KL.", "warning")
    ctx.log("Loading the teacher (the untouched source model)")
    teacher = load_model(ctx.source, ctx.options.dtype).model
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = ctx.model
    for name, p in student.named_parameters():
        p.requires_grad_(cfg.train_embeddings or not _is_embedding(name))
    kl_before = mean_kl(student, teacher, heldout) if heldout is not None else None
    ctx.log(f"Distilling on {len(seqs)} sequences of {cfg.seq_len} tokens"
            + (f"; held-out KL before: {kl_before:.4f}" if kl_before is not None else ""))

    def on_step(s):
        ctx.sample("distill_loss", s.loss)
        ctx.progress(min(0.95, s.fraction), f"step {s.step}: loss {s.loss:.4f}")

    result = distill(student, teacher, seqs, steps=cfg.steps or None,
                     max_seconds=cfg.max_minutes * 60 or None, lr=cfg.lr, batch_size=cfg.batch_size,
                     temperature=cfg.temperature, hidden_weight=cfg.hidden_weight, seed=cfg.seed,
                     bf16=resolved_bf16(cfg.bf16),
                     checkpoint_dir=ctx.record.folder / "checkpoints", checkpoint_every=cfg.checkpoint_every,
                     keep_checkpoints=cfg.keep_checkpoints, resume_from=cfg.resume_from or None,
                     on_step=on_step, cancelled=ctx.cancel.is_set)
    for p in student.parameters():
        p.requires_grad_(False)
    kl_after = mean_kl(student, teacher, heldout) if heldout is not None else None
    del teacher
    ctx.mark_applied("distilled")
    first, last = result.losses[:10], result.losses[-10:]
    ctx.report(steps=result.steps, resumed_from_step=result.start_step, seconds=result.seconds,
               stopped_by=result.stopped_by, tokens_trained=(result.steps - result.start_step) * cfg.batch_size * cfg.seq_len,
               loss_first=round(sum(first) / len(first), 5) if first else None,
               loss_last=round(sum(last) / len(last), 5) if last else None,
               heldout_kl_before=round(kl_before, 5) if kl_before is not None else None,
               heldout_kl_after=round(kl_after, 5) if kl_after is not None else None,
               hidden_loss=result.hidden_loss, checkpoints=[str(c) for c in result.checkpoints[-1:]])
    ctx.progress(1.0, "distilled")


def _is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight"))

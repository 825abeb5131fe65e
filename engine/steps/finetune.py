"""LoRA fine-tuning (peft), merged back into plain weights: adaptation to the user's text, or healing.

Low-rank adapters are trained on the chosen linear layers while every original weight stays frozen, then
``merge_and_unload`` folds them into the weights, so the result is an ordinary model of the same shapes.
The objective is next-token loss on the text (adapting to the user's domain) or, with ``objective:
distill``, matching the untouched source model (healing after pruning at a fraction of full distillation's
memory). The training loop is ``engine/distill.py``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step

EXPORTS = "GGUF and ONNX natively: the adapters are merged into the weights before any export"


@dataclass
class LoraConfig:
    rank: int = field(default=8, metadata={"help": "rank of the adapters"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "linear layers that get adapters, by name (q_proj, o_proj, gate_up_proj, ...; default: every linear "
                "layer of the decoder blocks, whatever the family calls them)"})
    objective: str = field(default="next_token", metadata={"help": "next_token (fine-tune on the text) or distill "
                                                                    "(match the source model: healing)"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate"})
    max_minutes: float = field(default=5.0, metadata={"help": "training time limit (0 = steps only)"})
    steps: int = field(default=0, metadata={"help": "training steps (0 = time only)"})
    batch_size: int = field(default=1, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    stride: int = field(default=64, metadata={"help": "offset between overlapping training sequences"})
    text: str = field(default="", metadata={"help": "training text file (default: the job's calibration text)"})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 autocast for the forward passes (default: "
                                                              "on where the CPU has AVX512-BF16/AMX)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0:
            raise ValueError("rank, alpha and lr must be positive")
        if self.objective not in ("next_token", "distill"):
            raise ValueError("objective must be next_token or distill")
        if not self.max_minutes and not self.steps:
            raise ValueError("give max_minutes and/or steps")


def _lora_need(cfg: LoraConfig, shape):
    from ..footprint import lora_parameters, training_need
    from .distill import resolved_bf16

    # every linear layer by default: the Llama names' widths (a family's fused q/k/v or gate/up count no more)
    modules = cfg.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return training_need("finetune.lora", shape, lora_parameters(shape, cfg.rank, modules),
                         cfg.batch_size * cfg.seq_len, cfg.seq_len, teacher=cfg.objective == "distill",
                         bf16=resolved_bf16(cfg.bf16))


@register_step("finetune.lora", LoraConfig, kind="transform", exports=EXPORTS, held_ram=_lora_need,
               summary="LoRA fine-tuning (peft) on your text or as healing after compression, merged into the weights")
def lora_finetune(ctx: RunContext, cfg: LoraConfig) -> None:
    import peft
    import torch

    from ..calibration import linear_modules, token_sequences
    from ..distill import distill
    from ..modeling import load_model
    from .distill import resolved_bf16, training_text

    torch.set_num_threads(ctx.options.resolved_threads())
    model = ctx.model
    present = {n.rsplit(".", 1)[-1] for n in linear_modules(model)}
    targets = list(cfg.target_modules) or sorted(present)
    missing = sorted(set(targets) - present)
    if missing:
        raise EdgeTailorError(f"The model has no linear layers named {missing}.",
                              f"Pick target_modules among: {', '.join(sorted(present))}.")
    seqs = token_sequences(ctx.tokenizer, training_text(ctx, cfg), cfg.seq_len, stride=cfg.stride)
    teacher = None
    if cfg.objective == "distill":
        ctx.log("Loading the teacher (the untouched source model)")
        teacher = load_model(ctx.source, ctx.options.dtype).model
        for p in teacher.parameters():
            p.requires_grad_(False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                         target_modules=targets, bias="none"))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    ctx.log(f"LoRA rank {cfg.rank} on {', '.join(targets)}: {trainable:,} trainable parameters, "
            f"{len(seqs)} sequences of {cfg.seq_len} tokens")

    def on_step(s):
        ctx.sample("lora_loss", s.loss)
        ctx.progress(min(0.95, s.fraction), f"step {s.step}: loss {s.loss:.4f}")

    result = distill(wrapped, teacher, seqs, steps=cfg.steps or None, max_seconds=cfg.max_minutes * 60 or None,
                     lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, bf16=resolved_bf16(cfg.bf16),
                     on_step=on_step,
                     cancelled=ctx.cancel.is_set)
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    ctx.model = merged.eval()
    ctx.mark_applied(f"lora{cfg.rank}")
    first, last = result.losses[:10], result.losses[-10:]
    ctx.report(objective=cfg.objective, rank=cfg.rank, target_modules=targets, trainable_parameters=trainable,
               steps=result.steps,
               seconds=result.seconds, stopped_by=result.stopped_by,
               loss_first=round(sum(first) / len(first), 5), loss_last=round(sum(last) / len(last), 5))
    ctx.progress(1.0, "merged")

"""Layer sharing: adjacent decoder blocks that do nearly the same thing are tied to one set of weights.

For each adjacent pair (i, i+1) the step measures, on calibration text, how well block i's weights
stand in for block i+1: it runs block i at position i+1 on block i+1's real inputs and compares the
update it adds to the residual stream with block i+1's own update (relative error). The ``pairs`` best
non-overlapping pairs are tied: block i+1 becomes a second use of block i's parameters (the same
tensors, so the parameter count really drops; the block keeps its own position in the KV cache). A short
distillation from the untied model (``engine.distill``) then heals the loss (``heal_steps``).

Exports: in torch the blocks truly share storage. GGUF and ONNX write every block's tensors separately,
so the shared weights are written twice (no size saving on disk; the quality change is kept).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step


@dataclass
class ShareConfig:
    pairs: int = field(default=2, metadata={"help": "how many adjacent pairs of blocks to tie"})
    heal_steps: int = field(default=40, metadata={"help": "distillation steps after tying (0 = none)"})
    heal_lr: float = field(default=5e-5, metadata={"help": "learning rate of the healing distillation"})
    heal_scope: str = field(default="shared", metadata={"help": "shared: train only the tied blocks; all: every weight"})
    batch_size: int = field(default=4, metadata={"help": "sequences per healing step"})
    calibration_sequences: int = field(default=64, metadata={"help": "calibration sequences (selection and healing)"})
    calibration_length: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self):
        if self.pairs < 1:
            raise ValueError("pairs must be at least 1")
        if self.heal_steps < 0 or self.heal_lr <= 0:
            raise ValueError("heal_steps must be >= 0 and heal_lr > 0")
        if self.heal_scope not in ("shared", "all"):
            raise ValueError("heal_scope must be 'shared' or 'all'")


#: what a decoder block's modules hold of its place in the model rather than of its weights: a block standing in
#: for the next takes these from it (its KV-cache slot, Gemma 2/3's local or global attention, SmolLM3's rotary or
#: none, ...)
PLACE_ATTRIBUTES = ("layer_idx", "attention_type", "is_sliding", "sliding_window", "layer_type", "use_rope",
                    "is_causal")


def twin(source: torch.nn.Module, place: torch.nn.Module) -> torch.nn.Module:
    """``source``'s weights (the same tensors, not a copy) in ``place``'s position: a module of ``source``'s
    structure with ``place``'s ``PLACE_ATTRIBUTES``."""
    memo = {id(p): p for p in source.parameters()}
    memo.update({id(b): b for b in source.buffers()})
    out = copy.deepcopy(source, memo)
    for mine, theirs in zip(out.modules(), place.modules()):
        for name in PLACE_ATTRIBUTES:
            if hasattr(theirs, name):
                setattr(mine, name, getattr(theirs, name))
    return out


def substitution_errors(model, sequences: torch.Tensor) -> list[float]:
    """For each i: ||block_i(h_{i+1}) - block_{i+1}(h_{i+1})|| / ||block_{i+1}'s update||, over the sequences: block
    i run in block i+1's place (``twin``, with the arguments the model gives block i+1: its rotary, its mask)."""
    from ..calibration import block_output
    from ..walker import BlockWalk

    walk = BlockWalk(model, sequences, batch_size=len(sequences))
    kwargs = [kw[0] for kw in walk.kwargs]
    layers = walk.layers
    errors = []
    with torch.inference_mode():
        hs = [walk.hidden[0]]
        for i, layer in enumerate(layers):
            hs.append(block_output(layer(hs[-1], **kwargs[i])))
        for i in range(len(layers) - 1):
            x, y = hs[i + 1], hs[i + 2]
            sub = block_output(twin(layers[i], layers[i + 1])(x, **kwargs[i + 1]))
            errors.append(float((sub - y).norm() / (y - x).norm().clamp_min(1e-12)))
    return errors


def choose_pairs(errors: list[float], pairs: int) -> list[int]:
    """Indices i (block i+1 reuses block i) of the lowest errors; no block is both a source and a target."""
    chosen, used = [], set()
    for i in sorted(range(len(errors)), key=errors.__getitem__):
        if len(chosen) == pairs:
            break
        if i in used or i + 1 in used:
            continue
        chosen.append(i)
        used.update((i, i + 1))
    if len(chosen) < pairs:
        raise EdgeTailorError(f"Only {len(chosen)} non-overlapping pairs of adjacent blocks exist, not {pairs}.",
                              "Ask for fewer pairs.")
    return sorted(chosen)


def tie(model, i: int) -> None:
    """Block i+1 becomes a second use of block i's parameters (same tensors) in its own place (``twin``)."""
    from ..calibration import decoder_layers

    layers = decoder_layers(model)
    layers[i + 1] = twin(layers[i], layers[i + 1])


def heal(student, teacher, sequences: torch.Tensor, scope_params, steps: int, lr: float, batch_size: int,
         on_step=None, cancelled=None):
    """Distil ``teacher`` into ``student`` (the project's distillation loop), training only ``scope_params``."""
    from ..distill import distill

    keep = {id(p) for p in scope_params}
    frozen = [p for p in student.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return distill(student, teacher, sequences, steps=steps, lr=lr, batch_size=batch_size,
                       warmup_steps=min(10, steps // 4), on_step=on_step, cancelled=cancelled)
    finally:
        for p in frozen:
            p.requires_grad_(True)


@register_step("share.layers", ShareConfig, kind="transform",
               summary="Tie the most similar adjacent decoder blocks to one set of weights, healed by distillation",
               exports="torch: truly shared (fewer parameters). GGUF and ONNX: each block's tensors are written "
                       "separately (the shared weights twice; no size saving on disk)",
               ram_multiple=3.0)
def share_layers(ctx: RunContext, cfg: ShareConfig) -> None:
    from ..calibration import decoder_layers, token_sequences

    model = ctx.model
    n_layers = len(decoder_layers(model))
    if 2 * cfg.pairs > n_layers:
        raise EdgeTailorError(f"The model has {n_layers} blocks; {cfg.pairs} pairs need {2 * cfg.pairs}.",
                              "Ask for fewer pairs.")
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.calibration_length, cfg.calibration_sequences)
    ctx.progress(0.0, "measuring how well each block stands in for the next")
    errors = substitution_errors(model, seqs[: min(8, len(seqs))])
    chosen = choose_pairs(errors, cfg.pairs)
    ctx.check_cancelled()
    teacher = copy.deepcopy(model) if cfg.heal_steps else None
    before = sum(p.numel() for p in model.parameters())
    for i in chosen:
        tie(model, i)
    after = sum(p.numel() for p in model.parameters())
    ctx.log(f"tied blocks {', '.join(f'{i + 1}<-{i}' for i in chosen)} (substitution errors "
            f"{', '.join(f'{errors[i]:.3f}' for i in chosen)}); parameters {before:,} -> {after:,}")
    held_out, train = seqs[:4], seqs[4:] if len(seqs) > 8 else seqs
    kl_before = kl_after = None
    if cfg.heal_steps:
        from ..distill import mean_kl

        kl_before = mean_kl(model, teacher, held_out)
        layers = decoder_layers(model)
        scope = [p for i in chosen for p in layers[i].parameters()] if cfg.heal_scope == "shared" \
            else list(model.parameters())
        heal(model, teacher, train, scope, cfg.heal_steps, cfg.heal_lr, cfg.batch_size,
             on_step=lambda s: (ctx.progress(0.1 + 0.9 * s.fraction, f"healing {s.step}/{cfg.heal_steps}: KL {s.loss:.4f}"),
                                ctx.sample("heal_kl", s.loss, "share")),
             cancelled=ctx.cancel.is_set)
        kl_after = mean_kl(model, teacher, held_out)
        ctx.log(f"healing: KL to the untied model on held-out calibration text {kl_before:.4f} -> {kl_after:.4f}")
        del teacher
    label = f"share{cfg.pairs}"
    ctx.mark_applied(label)
    ctx.report(**{"tied": [[i, i + 1] for i in chosen], "substitution_errors": errors,
                             "parameters_before": before, "parameters_after": after,
                             "heal_steps": cfg.heal_steps, "heldout_kl_before_heal": kl_before,
                             "heldout_kl_after_heal": kl_after})
    ctx.progress(1.0, f"{label}: {before - after:,} parameters shared")

"""Unstructured and N:M semi-structured pruning: zero weights of the decoder blocks' linear layers.

Two scores decide which weights go:

* ``prune.magnitude``: |W|; the smallest weights of each row (``scope: row``) or of each layer go.
* ``prune.wanda``: |W| * ||X_j||_2 (Sun et al., 2023, "Wanda"), X_j the j-th input channel's activations on
  calibration text; the smallest scores of each output row go. Blocks are pruned in order, each one's
  statistics taken on the output of the already pruned blocks before it, as in the paper's code.

``pattern: "2:4"`` (any N:M) keeps N weights in every group of M consecutive input weights instead of a
sparsity target; hardware with sparse tensor cores runs that pattern faster. Shapes never change, so the
result exports natively to GGUF and ONNX as plain weights (with zeros); sizes shrink only after a
compression that benefits from zeros.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ...calibration import decoder_layers, linear_modules, recording_channel_stats, token_sequences
from ...context import RunContext
from ...errors import EdgeTailorError
from ...registry import register_step
from ...walker import BlockWalk

EXPORTS = "GGUF and ONNX natively: shapes are unchanged, pruned weights are stored as zeros"


@dataclass
class PruneConfig:
    sparsity: float = field(default=0.5, metadata={"help": "share of weights zeroed in each pruned layer (ignored with a pattern)"})
    pattern: str = field(default="", metadata={"help": "N:M semi-structured pattern, e.g. 2:4 (N kept of every M); empty = unstructured"})
    scope: str = field(default="row", metadata={"help": "row: the same share in every output row; layer: across the whole matrix (magnitude only)"})
    modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               metadata={"help": "linear layers of the decoder blocks to prune, by name"})
    calibration_sequences: int = field(default=32, metadata={"help": "calibration sequences (Wanda)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence (Wanda)"})

    def __post_init__(self):
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError("sparsity must be between 0 and 1 (e.g. 0.5)")
        if self.pattern:
            parse_pattern(self.pattern)
        if self.scope not in ("row", "layer"):
            raise ValueError("scope must be 'row' or 'layer'")
        if not self.modules:
            raise ValueError("name at least one module to prune")


def parse_pattern(pattern: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern '{pattern}' is not N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str = "", scope: str = "row") -> torch.Tensor:
    """Boolean mask of the weights to zero (True = prune) given a score per weight (low = unimportant)."""
    if pattern:
        n, m = parse_pattern(pattern)
        rows, cols = score.shape
        if cols % m:
            raise EdgeTailorError(f"A layer with {cols} inputs cannot be split into groups of {m} for {pattern}.",
                                  "Leave that layer out (modules) or use unstructured sparsity.")
        groups = score.reshape(rows, cols // m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.reshape(rows, cols)
    if scope == "row":
        k = int(score.shape[1] * sparsity)
        drop = torch.topk(score, k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    k = int(score.numel() * sparsity)
    drop = torch.topk(score.flatten(), k, largest=False).indices
    return torch.zeros(score.numel(), dtype=torch.bool).scatter_(0, drop, True).reshape(score.shape)


def _selected(layer, modules: list[str]) -> dict[str, torch.nn.Linear]:
    return linear_modules(layer, lambda name: name.rsplit(".", 1)[-1] in modules)


def _apply(linear: torch.nn.Linear, mask: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight[mask] = 0


def sparsity_report(model, modules: list[str]) -> dict:
    """Share of zero weights per layer type over all decoder blocks, and over all pruned layers."""
    zeros, totals = {}, {}
    for layer in decoder_layers(model):
        for name, lin in _selected(layer, modules).items():
            kind = name.rsplit(".", 1)[-1]
            zeros[kind] = zeros.get(kind, 0) + int((lin.weight == 0).sum())
            totals[kind] = totals.get(kind, 0) + lin.weight.numel()
    per_type = {k: round(zeros[k] / totals[k], 5) for k in totals}
    overall = sum(zeros.values()) / max(sum(totals.values()), 1)
    return {"sparsity_by_type": per_type, "sparsity": round(overall, 5), "pruned_weights": sum(zeros.values())}


def _label(prefix: str, cfg: PruneConfig) -> str:
    return f"{prefix}{cfg.pattern.replace(':', '_')}" if cfg.pattern else f"{prefix}{round(cfg.sparsity * 100)}"


def _check_modules(ctx: RunContext, cfg: PruneConfig) -> None:
    if not any(_selected(layer, cfg.modules) for layer in decoder_layers(ctx.model)):
        raise EdgeTailorError(f"No linear layer of the decoder blocks is named any of {cfg.modules}.",
                              "Use names like q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.")


def _finish(ctx: RunContext, cfg: PruneConfig, label: str) -> None:
    report = sparsity_report(ctx.model, cfg.modules)
    ctx.mark_applied(label)
    ctx.report(**report, pattern=cfg.pattern or None)


@register_step("prune.magnitude", PruneConfig, kind="transform", exports=EXPORTS,
               summary="Zero the smallest weights of the linear layers (unstructured or N:M such as 2:4)")
def magnitude_prune(ctx: RunContext, cfg: PruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    _check_modules(ctx, cfg)
    layers = decoder_layers(ctx.model)
    for i, layer in enumerate(layers):
        ctx.check_cancelled()
        for lin in _selected(layer, cfg.modules).values():
            _apply(lin, prune_mask(lin.weight.detach().abs().float(), cfg.sparsity, cfg.pattern, cfg.scope))
        ctx.progress((i + 1) / len(layers), f"block {i + 1}/{len(layers)}")
    _finish(ctx, cfg, _label("mag", cfg))


@register_step("prune.wanda", PruneConfig, kind="transform", exports=EXPORTS,
               summary="Zero the weights with the smallest |weight| x input-activation norm on calibration text (Wanda)")
def wanda_prune(ctx: RunContext, cfg: PruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    if cfg.scope != "row":
        raise EdgeTailorError("Wanda compares weights within each output row (scope: row).",
                              "Remove 'scope' or set it to row.")
    _check_modules(ctx, cfg)
    model = ctx.model
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.calibration_sequences)
    ctx.log(f"Wanda: {len(seqs)} calibration sequences of {cfg.seq_len} tokens")
    walk = BlockWalk(model, seqs, cancelled=ctx.cancel.is_set, progress=ctx.progress)
    for block in walk:
        mods = _selected(block.module, cfg.modules)
        with recording_channel_stats(mods) as stats:
            block.forward(advance=False)
        for name, lin in mods.items():
            score = lin.weight.detach().abs().float() * stats[name].l2_norm.float().unsqueeze(0)
            _apply(lin, prune_mask(score, cfg.sparsity, cfg.pattern, "row"))
        block.forward()                   # the pruned block's outputs feed the next one
    _finish(ctx, cfg, _label("wanda", cfg))

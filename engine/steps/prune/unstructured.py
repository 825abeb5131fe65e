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

from ...calibration import recording_channel_stats, token_sequences
from ...context import RunContext
from ...errors import EdgeTailorError
from ...footprint import scratch_bytes, streamed_transform_need
from ...registry import register_step

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


def _apply(linear: torch.nn.Linear, mask: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight[mask] = 0


class SparsityCount:
    """Zero weights per layer type, counted block by block as the pruned blocks pass."""

    def __init__(self):
        self.zeros: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def add(self, linears: dict[str, torch.nn.Linear]) -> None:
        for name, lin in linears.items():
            kind = name.rsplit(".", 1)[-1]
            self.zeros[kind] = self.zeros.get(kind, 0) + int((lin.weight == 0).sum())
            self.totals[kind] = self.totals.get(kind, 0) + lin.weight.numel()

    def report(self) -> dict:
        """Share of zero weights per layer type over all decoder blocks, and over all pruned layers."""
        per_type = {k: round(self.zeros[k] / self.totals[k], 5) for k in self.totals}
        overall = sum(self.zeros.values()) / max(sum(self.totals.values()), 1)
        return {"sparsity_by_type": per_type, "sparsity": round(overall, 5), "pruned_weights": sum(self.zeros.values())}


def _label(prefix: str, cfg: PruneConfig) -> str:
    return f"{prefix}{cfg.pattern.replace(':', '_')}" if cfg.pattern else f"{prefix}{round(cfg.sparsity * 100)}"


def _selected_in(block, modules: list[str]) -> dict[str, torch.nn.Linear]:
    """The block's linear layers to prune, by qualified name; none at all is the user's mistake, named."""
    found = {name: lin for name, lin in block.linears().items() if name.rsplit(".", 1)[-1] in modules}
    if not found and block.index == 0:
        raise EdgeTailorError(f"No linear layer of the decoder blocks is named any of {modules}.",
                              "Use names like q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.")
    return found


@register_step("prune.magnitude", PruneConfig, kind="transform", exports=EXPORTS,
               summary="Zero the smallest weights of the linear layers (unstructured or N:M such as 2:4)",
               streamed_ram=lambda cfg, shape: streamed_transform_need("prune.magnitude", shape),
               disk_bytes=lambda cfg, shape: scratch_bytes(shape))
def magnitude_prune(ctx: RunContext, cfg: PruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    walk, count = ctx.transform_walk(), SparsityCount()
    for block in walk:                    # one block's weights at a time; the pruned ones kept
        linears = _selected_in(block, cfg.modules)
        for lin in linears.values():
            _apply(lin, prune_mask(lin.weight.detach().abs().float(), cfg.sparsity, cfg.pattern, cfg.scope))
        count.add(linears)
        block.keep(linears)
    _finish(ctx, cfg, _label("mag", cfg), walk, count)


@register_step("prune.wanda", PruneConfig, kind="transform", exports=EXPORTS,
               summary="Zero the weights with the smallest |weight| x input-activation norm on calibration text (Wanda)",
               streamed_ram=lambda cfg, shape: streamed_transform_need("prune.wanda", shape,
                                                                       cfg.calibration_sequences * cfg.seq_len),
               disk_bytes=lambda cfg, shape: scratch_bytes(shape))
def wanda_prune(ctx: RunContext, cfg: PruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    if cfg.scope != "row":
        raise EdgeTailorError("Wanda compares weights within each output row (scope: row).",
                              "Remove 'scope' or set it to row.")
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.calibration_sequences)
    ctx.log(f"Wanda: {len(seqs)} calibration sequences of {cfg.seq_len} tokens")
    walk, count = ctx.transform_walk(seqs), SparsityCount()
    for block in walk:
        linears = _selected_in(block, cfg.modules)
        with recording_channel_stats(linears) as stats:
            block.forward(advance=False)
        for name, lin in linears.items():
            score = lin.weight.detach().abs().float() * stats[name].l2_norm.float().unsqueeze(0)
            _apply(lin, prune_mask(score, cfg.sparsity, cfg.pattern, "row"))
        count.add(linears)
        block.keep(linears)
        block.forward()                   # the pruned block's outputs feed the next one
    _finish(ctx, cfg, _label("wanda", cfg), walk, count)


def _finish(ctx: RunContext, cfg: PruneConfig, label: str, walk, count: SparsityCount) -> None:
    ctx.mark_applied(label, walk.result())
    ctx.report(**count.report(), pattern=cfg.pattern or None)

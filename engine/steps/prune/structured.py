"""Structured pruning: smaller shapes, not zeros. The result is a smaller model with a valid config.

* ``prune.width`` (Minitron's width axes, Muralidharan et al. 2024, "Compact Language Models via Pruning
  and Knowledge Distillation"): attention heads, MLP channels and hidden (embedding) channels, ranked by
  their activations on calibration text and cut uniformly across blocks, so every block keeps the same
  shape and the config stays a plain Llama/Qwen config:

  - heads: within each key/value group, the query heads with the smallest output norm go (every group
    keeps the same number, so grouped-query attention stays valid); ``kv_groups_keep`` removes whole
    key/value groups with their query heads. ``head_dim`` is written into the config explicitly.
  - MLP channels: the intermediate channels with the smallest input norm at ``down_proj`` go.
  - hidden channels: the residual-stream channels with the smallest norm at the blocks' normalised inputs
    go everywhere at once (embeddings, every projection, every norm, the output head).

* ``prune.depth``: whole blocks go, ranked by ShortGPT's Block Influence (1 - cos(block input, block
  output), Men et al. 2024) or by how much calibration loss rises when that one block is skipped.

Both give a model of the new config: from lazily read files, the ranking walks one block at a time and the
result is a view of the files (depth) or the cut tensors written to the run's scratch block by block (width);
a loaded model is rebuilt in memory. The tokenizer is unchanged. The
result exports natively to GGUF and ONNX like any model of that architecture.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from ...architectures import ModelDims, count_parameters, keep_layers
from ...calibration import (
    ChannelStats,
    block_influence,
    decoder_layers,
    linear_input_stats,
    mean_loss,
    skipping_block,
    token_sequences,
)
from ...context import RunContext
from ...errors import EdgeTailorError
from ...footprint import scratch_bytes, streamed_transform_need
from ...registry import register_step

EXPORTS = "GGUF and ONNX natively: the result is a smaller model of the same architecture with a consistent config"


@dataclass
class WidthPruneConfig:
    heads_keep: float = field(default=1.0, metadata={"help": "share of query heads kept in every key/value group"})
    kv_groups_keep: float = field(default=1.0, metadata={"help": "share of key/value groups kept (each with its query heads)"})
    mlp_keep: float = field(default=1.0, metadata={"help": "share of MLP intermediate channels kept"})
    intermediate_size: int = field(default=0, metadata={"help": "target MLP intermediate size (overrides mlp_keep)"})
    hidden_keep: float = field(default=1.0, metadata={"help": "share of hidden (embedding) channels kept"})
    hidden_size: int = field(default=0, metadata={"help": "target hidden size (overrides hidden_keep)"})
    round_to: int = field(default=32, metadata={"help": "round intermediate/hidden sizes to a multiple of this "
                                                        "(32 keeps Q8_0/Q4_0 blocks whole, 256 k-quant super-blocks); 0 = exact"})
    calibration_sequences: int = field(default=32, metadata={"help": "calibration sequences for the importance"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    @property
    def mlp_only(self) -> bool:
        """Only MLP channels go (the width axis every supported family's layout is known for)."""
        return self.heads_keep == self.kv_groups_keep == self.hidden_keep == 1.0 and not self.hidden_size

    def __post_init__(self):
        for name in ("heads_keep", "kv_groups_keep", "mlp_keep", "hidden_keep"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.intermediate_size < 0 or self.hidden_size < 0 or self.round_to < 0:
            raise ValueError("sizes and round_to cannot be negative")


@dataclass
class DepthPruneConfig:
    blocks: int = field(default=0, metadata={"help": "number of decoder blocks to remove"})
    fraction: float = field(default=0.0, metadata={"help": "share of blocks to remove (when blocks is 0)"})
    method: str = field(default="block_influence",
                        metadata={"help": "block_influence (1 - cos(in, out), ShortGPT) or perplexity "
                                          "(loss rise when the block is skipped)"})
    calibration_sequences: int = field(default=16, metadata={"help": "calibration sequences for the ranking"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self):
        if self.method not in ("block_influence", "perplexity"):
            raise ValueError("method must be block_influence or perplexity")
        if self.blocks < 0 or not 0.0 <= self.fraction < 1.0:
            raise ValueError("blocks must be >= 0 and fraction in [0, 1)")
        if not self.blocks and not self.fraction:
            raise ValueError("give blocks (a number) or fraction (a share) of blocks to remove")


# --- building the smaller model ----------------------------------------------------------------------
def rebuild(model, config, state: dict):
    """A new model of ``config`` holding ``state`` (every tensor of the new model must be in it)."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = new.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise AssertionError(f"rebuilt model lacks {missing[:3]}")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise AssertionError(f"{k}: {tuple(state[k].shape)} does not fit {tuple(v.shape)}")
    new.load_state_dict({k: state[k] for k in expected}, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(getattr(model, "generation_config", None)) or new.generation_config
    new.eval()
    return new


def _non_embedding(config) -> int:
    return count_parameters(config.to_dict())["non_embedding"]


def _round(n: int, total: int, multiple: int) -> int:
    if multiple and total > multiple:
        n = max(multiple, round(n / multiple) * multiple)
    return max(1, min(total, n))


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MlpLayout:
    """A family's MLP within a block: the layer that reads its channels (ranked by their input norm), the layers
    whose rows make them, and fused layers whose rows make them twice (Phi-3's gate_up: gate, then up)."""
    reads: str = "mlp.down_proj"
    makes: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    makes_fused: tuple[str, ...] = ()


MLP_LAYOUTS = {"phi3": MlpLayout(makes=(), makes_fused=("mlp.gate_up_proj",)),
               "starcoder2": MlpLayout(reads="mlp.c_proj", makes=("mlp.c_fc",))}


def mlp_layout(config) -> MlpLayout:
    return MLP_LAYOUTS.get(config.model_type, MlpLayout())


def width_slices(model, stats: dict, cfg: WidthPruneConfig) -> tuple[dict, dict]:
    """Which indices every tensor keeps: ({tensor name: [(dim, index tensor)]}, config changes)."""
    d = ModelDims.of(model.config)
    n_layers = int(model.config.num_hidden_layers)
    keep_groups = max(1, round(d.kv_heads * cfg.kv_groups_keep))
    keep_per_group = max(1, round(d.heads // d.kv_heads * cfg.heads_keep))
    # a share of 1 keeps the axis whole whatever the rounding (576 hidden channels rounded to 256s would be 512)
    keep_inter = d.intermediate if cfg.mlp_keep >= 1.0 and not cfg.intermediate_size else \
        _round(cfg.intermediate_size or round(d.intermediate * cfg.mlp_keep), d.intermediate, cfg.round_to)
    keep_hidden = d.hidden if cfg.hidden_keep >= 1.0 and not cfg.hidden_size else \
        _round(cfg.hidden_size or round(d.hidden * cfg.hidden_keep), d.hidden, cfg.round_to)
    slices: dict[str, list] = {}
    changes = {}
    if keep_groups < d.kv_heads or keep_per_group < d.heads // d.kv_heads:
        changes.update(num_attention_heads=keep_groups * keep_per_group, num_key_value_heads=keep_groups,
                       head_dim=d.head_dim)
        for i in range(n_layers):
            slices.update(_head_slices(i, stats, d, keep_groups, keep_per_group))
    experts = expert_width(model)
    if experts:        # a mixture of experts: every expert keeps as many channels, its own strongest
        keep = experts if cfg.mlp_keep >= 1.0 and not cfg.intermediate_size else \
            _round(cfg.intermediate_size or round(experts * cfg.mlp_keep), experts, cfg.round_to)
        if keep < experts:
            changes[EXPERT_WIDTH_KEY.get(model.config.model_type, "intermediate_size")] = keep
            for i in range(n_layers):
                slices.update(_expert_slices(i, stats, keep, experts))
    elif keep_inter < d.intermediate:
        changes["intermediate_size"] = keep_inter
        for i in range(n_layers):
            slices.update(_mlp_slices(i, stats, keep_inter, mlp_layout(model.config), d.intermediate))
    if keep_hidden < d.hidden:
        changes["hidden_size"] = keep_hidden
        changes.setdefault("head_dim", d.head_dim)
        _add_hidden_slices(slices, model, stats, n_layers, keep_hidden)
    return slices, changes


def _head_slices(i: int, stats: dict, d: ModelDims, keep_groups: int, keep_per_group: int) -> dict:
    """Layer i's kept KV groups (by their o_proj input norm) and the strongest query heads of each."""
    hd, per_group = d.head_dim, d.heads // d.kv_heads
    o_sq = stats[f"model.layers.{i}.self_attn.o_proj"].sum_sq.reshape(d.heads, hd).sum(1).sqrt()
    group_score = o_sq.reshape(d.kv_heads, per_group).sum(1)
    groups = torch.sort(torch.topk(group_score, keep_groups).indices).values
    q_heads = []
    for g in groups.tolist():
        top = torch.topk(o_sq[g * per_group:(g + 1) * per_group], keep_per_group).indices
        q_heads += [g * per_group + int(h) for h in torch.sort(top).values]
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
    p = f"model.layers.{i}.self_attn."
    out = {p + "q_proj.weight": [(0, q_rows)], p + "q_proj.bias": [(0, q_rows)], p + "o_proj.weight": [(1, q_rows)]}
    for n in ("k_proj", "v_proj"):
        out[p + f"{n}.weight"] = [(0, kv_rows)]
        out[p + f"{n}.bias"] = [(0, kv_rows)]
    return out


def _mlp_slices(i: int, stats: dict, keep_inter: int, layout: MlpLayout, inter: int) -> dict:
    """Layer i's kept MLP channels, by the input norm of the layer that reads them."""
    idx = torch.sort(torch.topk(stats[f"model.layers.{i}.{layout.reads}"].sum_sq, keep_inter).indices).values
    p = f"model.layers.{i}."
    out = {p + f"{layout.reads}.weight": [(1, idx)]}
    for n, rows in [(n, idx) for n in layout.makes] + [(n, torch.cat([idx, inter + idx])) for n in layout.makes_fused]:
        out[p + f"{n}.weight"] = [(0, rows)]
        out[p + f"{n}.bias"] = [(0, rows)]
    return out


#: the config key of a mixture of experts' expert width (Mixtral's experts take the dense key)
EXPERT_WIDTH_KEY = {"qwen3_moe": "moe_intermediate_size"}


def expert_width(model) -> int:
    """The channels of each expert's MLP (``down_proj`` [experts, hidden, width]); 0 for a dense model."""
    layer = model.model.layers[0] if not getattr(model, "is_lazy", False) else None
    if layer is not None:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        return int(experts.down_proj.shape[-1]) if experts is not None and hasattr(experts, "down_proj") else 0
    t = model.state_dict().get("model.layers.0.mlp.experts.down_proj")
    return int(t.shape[-1]) if t is not None else 0


def _expert_slices(i: int, stats: dict, keep: int, width: int) -> dict:
    """Layer i's kept channels of each expert (by its down projection's input norm on the tokens routed to it): one
    row of indices per expert, cut from its down projection's columns and its gate and up rows."""
    idx = torch.sort(torch.topk(stats[f"model.layers.{i}.mlp.experts"].sum_sq, keep, dim=-1).indices, dim=-1).values
    p = f"model.layers.{i}.mlp.experts."
    return {p + "down_proj": [(2, idx)], p + "gate_up_proj": [(1, torch.cat([idx, width + idx], dim=-1))]}


def cut(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t`` keeping ``idx`` along ``dim``; a row of indices per expert (2-D ``idx``) cuts each expert its own."""
    if idx.ndim == 1:
        return t.index_select(dim, idx)
    return torch.stack([t[e].index_select(dim - 1, idx[e]) for e in range(t.shape[0])])


def expert_channel_stats(model, sequences: torch.Tensor, progress=None, cancelled=None) -> dict[str, ChannelStats]:
    """Each mixture-of-experts block's down-projection input statistics, one row per expert [experts, width] over
    the tokens routed to it (zeros for an expert no calibration token reached), keyed by the experts module."""
    from ...imatrix import InputCollector
    from ...walker import BlockWalk

    out = {}
    for block in BlockWalk(model, sequences, cancelled=cancelled, progress=progress):
        acc = InputCollector(hessians=False)
        found = block.experts()
        with acc.hooks({}, found):
            block.forward()
        for name, module in found.items():
            n, width = module.down_proj.shape[0], module.down_proj.shape[-1]
            rows = [acc.sum_sq.get(f"{name}.{e}.down_proj", torch.zeros(width, dtype=torch.float64)) for e in range(n)]
            out[name] = ChannelStats(torch.stack(rows), torch.zeros(n, width, dtype=torch.float64),
                                     sum(acc.count.get(f"{name}.{e}.down_proj", 0) for e in range(n)))
    return out


def _add_hidden_slices(slices: dict, model, stats: dict, n_layers: int, keep_hidden: int) -> None:
    """The kept hidden channels (by the q_proj and gate_proj inputs' norms over all layers), in every tensor."""
    score = sum(stats[f"model.layers.{i}.{n}"].sum_sq for i in range(n_layers)
                for n in ("self_attn.q_proj", "mlp.gate_proj"))
    idx = torch.sort(torch.topk(score, keep_hidden).indices).values
    for name in model.state_dict():
        m = _LAYER.match(name)
        leaf = m.group(2) if m else name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            slices.setdefault(name, []).append((1, idx))
        elif name == "model.norm.weight" or leaf in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                     "pre_feedforward_layernorm.weight",
                                                     "post_feedforward_layernorm.weight"):
            slices.setdefault(name, []).append((0, idx))
        elif re.search(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", leaf):
            slices.setdefault(name, []).append((1, idx))
        elif re.search(r"(o_proj|down_proj)\.(weight|bias)$", leaf):
            slices.setdefault(name, []).append((0, idx))


def sliced_lazily(ctx: RunContext, weights, slices: dict, changes: dict):
    """The width-pruned model as lazily read files: each sliced tensor read, cut and written to the run's scratch
    a decoder block at a time; the untouched ones still read from where they were."""
    store = ctx.tensor_store(weights)
    state, done, group = weights.state_dict(), set(), {}

    def flush(key):
        if group:
            store.write(key, group)
            group.clear()
    key = None
    for name, t in state.items():
        if name not in slices or id(t) in done:       # a tied head follows its embedding
            continue
        done.add(id(t))
        m = _LAYER.match(name)
        block = f"block-{int(m.group(1)):05d}" if m else name.rsplit(".", 1)[0]
        if block != key:
            flush(key)
            key = block
        ctx.check_cancelled()
        value = t.load()
        for dim, idx in slices[name]:
            value = cut(value, dim, idx)
        group[name] = value
    flush(key)
    config = copy.deepcopy(weights.config)
    for k, v in changes.items():
        setattr(config, k, v)
    return store.model(config)


def apply_slices(model, slices: dict, changes: dict):
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        for dim, idx in slices.get(name, []):
            t = cut(t, dim, idx)
        state[name] = t.clone()
    config = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(config, k, v)
    return rebuild(model, config, state)


def _width_need(cfg: WidthPruneConfig, shape):
    need = streamed_transform_need("prune.width", shape, cfg.calibration_sequences * cfg.seq_len, cfg.seq_len)
    need.parts["largest tensor, read and cut"] = shape.largest_tensor_params * 4 * 2
    need.ram_bytes += need.parts["largest tensor, read and cut"]
    return need


@register_step("prune.width", WidthPruneConfig, kind="transform", exports=EXPORTS,
               summary="Remove attention heads, MLP channels and hidden channels ranked by activation on calibration text",
               streamed_ram=_width_need, disk_bytes=lambda cfg, shape: scratch_bytes(shape))
def width_prune(ctx: RunContext, cfg: WidthPruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    model = ctx.weights()                   # lazily read files (ranked and cut block by block), or loaded
    lazy = getattr(model, "is_lazy", False)
    if not lazy:
        decoder_layers(model)
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.calibration_sequences)
    ctx.log(f"Ranking heads and channels on {len(seqs)} calibration sequences of {cfg.seq_len} tokens")
    problem = width_axes_problem(model.config.model_type, cfg)
    if problem:
        raise EdgeTailorError(problem, "Keep heads_keep, kv_groups_keep and hidden_keep at 1 (prune MLP channels only).")
    reads = mlp_layout(model.config).reads.rsplit(".", 1)[-1]
    if expert_width(model):
        stats = expert_channel_stats(model, seqs, progress=lambda f, m: ctx.progress(0.8 * f, m),
                                     cancelled=ctx.cancel.is_set)
    else:
        stats = linear_input_stats(model, seqs, lambda n: n.endswith(("o_proj", "down_proj", "q_proj", "gate_proj", reads)),
                                   progress=lambda f, m: ctx.progress(0.8 * f, m), cancelled=ctx.cancel.is_set)
    slices, changes = width_slices(model, stats, cfg)
    if not changes:
        raise EdgeTailorError("These settings remove nothing (every keep share rounds to the full size).",
                              "Lower heads_keep, kv_groups_keep, mlp_keep/intermediate_size or hidden_keep/hidden_size.")
    before = _non_embedding(model.config)
    if lazy:
        pruned = sliced_lazily(ctx, model, slices, changes)
    else:
        ctx.model = pruned = apply_slices(model, slices, changes)
    after = _non_embedding(pruned.config)
    short = {"num_attention_heads": "h", "num_key_value_heads": "kv", "intermediate_size": "ffn", "hidden_size": "d",
             "moe_intermediate_size": "ffn"}
    label = "width-" + "-".join(f"{short[k]}{v}" for k, v in changes.items() if k in short)
    ctx.mark_applied(label, pruned if lazy else None)
    ctx.report(**{k: v for k, v in changes.items()}, non_embedding_before=before, non_embedding_after=after,
               non_embedding_removed=round(1 - after / before, 4))
    ctx.progress(1.0, "pruned")


def width_axes_problem(model_type: str, cfg: WidthPruneConfig) -> str:
    """Why these cuts do not apply to the family ("" where they do): heads and hidden channels are cut with the Llama
    block's layout; the other families' MLP channels only (``mlp_layout``)."""
    from ...architectures import arch_spec

    spec = arch_spec(model_type)
    if cfg.mlp_only or spec is None or spec.techniques is None:
        return ""
    return (f"width pruning of attention heads and hidden channels is not for {model_type} yet (its fused, per-head "
            "or whole-width norms are cut with the Llama layout); its MLP channels are (mlp_keep, intermediate_size)")


def depth_ranking(model, seqs, method: str, progress=None, cancelled=None) -> list[float]:
    """Importance of every block (low = removable first)."""
    if method == "block_influence":
        return block_influence(model, seqs, progress=progress, cancelled=cancelled)
    base = mean_loss(model, seqs, cancelled=cancelled)
    rises = []
    n = len(decoder_layers(model))
    for i in range(n):
        with skipping_block(model, i):
            rises.append(mean_loss(model, seqs, cancelled=cancelled) - base)
        if progress:
            progress((i + 1) / n, f"block {i + 1}/{n} skipped")
    return rises


def remove_blocks(model, drop: list[int]):
    """A new model without the decoder blocks ``drop`` (the others renumbered in order)."""
    n = len(decoder_layers(model))
    keep = [i for i in range(n) if i not in set(drop)]
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        m = _LAYER.match(name)
        if m is None:
            state[name] = tensor.detach().clone()
        elif int(m.group(1)) in renumber:
            state[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = tensor.detach().clone()
    config = copy.deepcopy(model.config)
    keep_layers(config, keep)
    return rebuild(model, config, state)


@register_step("prune.depth", DepthPruneConfig, kind="transform", exports=EXPORTS,
               summary="Remove whole decoder blocks, the least important on calibration text first",
               streamed_ram=lambda cfg, shape: streamed_transform_need(
                   "prune.depth", shape, cfg.calibration_sequences * cfg.seq_len, cfg.seq_len)
               if cfg.method == "block_influence" else None)
def depth_prune(ctx: RunContext, cfg: DepthPruneConfig) -> None:
    torch.set_num_threads(ctx.options.resolved_threads())
    model = ctx.weights()                   # Block Influence walks lazily read files; the loss ranking needs it loaded
    lazy = getattr(model, "is_lazy", False) and cfg.method == "block_influence"
    if not lazy:
        model = ctx.model
    n = int(model.config.num_hidden_layers)
    count = cfg.blocks or round(n * cfg.fraction)
    if not 0 < count < n:
        raise EdgeTailorError(f"Cannot remove {count} of the model's {n} blocks.",
                              f"Remove between 1 and {n - 1} blocks.")
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.seq_len, cfg.calibration_sequences)
    scores = depth_ranking(model, seqs, cfg.method, progress=lambda f, m: ctx.progress(0.9 * f, m),
                           cancelled=ctx.cancel.is_set)
    drop = sorted(sorted(range(n), key=lambda i: scores[i])[:count])
    before = _non_embedding(model.config)
    if lazy:                                # the same files seen without those blocks: nothing written
        pruned = model.without_blocks(drop)
    else:
        ctx.model = pruned = remove_blocks(model, drop)
    after = _non_embedding(pruned.config)
    ctx.mark_applied(f"depth-{count}", pruned if lazy else None)
    ctx.report(removed_blocks=drop, method=cfg.method, scores=[round(s, 5) for s in scores],
               num_hidden_layers=n - count, non_embedding_before=before, non_embedding_after=after,
               non_embedding_removed=round(1 - after / before, 4))
    ctx.progress(1.0, "pruned")

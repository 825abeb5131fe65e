"""AWQ-style equivalent scaling: protect the input channels that carry large activations before quantizing.

For a linear layer y = W x, scaling input channel j of W by s_j and dividing x_j by s_j leaves y unchanged.
When x comes out of a norm (q/k/v, gate/up) the division folds into the norm's scale (Gemma's 1 + w included)
and bias; when it comes out of up_proj (down_proj's input is act(gate) * up, linear in up) it folds into
up_proj's rows. Where each family's inputs come from is ``awq_groups`` (Gemma 2/3's MLP norm, Phi-3's fused
layers, StarCoder2's GeLU MLP, OLMo 2's post-norms). Nothing is added to the graph, so every runtime and exporter
gets the benefit: llama.cpp's own quantizer, the calibrated GGUF writer, ONNX int4.

The scales follow AWQ (Lin et al., 2024): s = m^alpha, where m is each input channel's RMS on the
calibration text, alpha chosen per group of layers from a grid. The search scores each alpha by the error
of the layers' *outputs* on the calibration text, tr(E H E^T) with E = Q(W diag(s)) diag(1/s) - W and H the
inputs' X^T X / n (the statistics the ``imatrix`` step keeps), so no activations are stored and no forward
pass is repeated. Q is a group-wise asymmetric round-to-nearest quantizer at ``bits`` (a stand-in for the
k-quant that comes after). alpha = 0 is the identity: a group is only rescaled when that lowers its error.
The statistics are rescaled with the model, so a calibrated quantization step that follows reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..context import RunContext
from ..errors import EdgeTailorError, RunCancelled
from ..footprint import scratch_bytes
from ..registry import register_step

GROUPS = ("attn_in", "mlp_in", "mlp_down")


@dataclass
class AwqConfig:
    bits: int = field(default=4, metadata={"help": "bits of the search's stand-in quantizer (4 for Q4_K mixes, 3 for Q3_K ...)"})
    group_size: int = field(default=32, metadata={"help": "weights per scale of the stand-in quantizer"})
    grid: int = field(default=20, metadata={"help": "alpha values tried per layer group, from 0 to 1"})
    groups: list[str] = field(default_factory=lambda: list(GROUPS),
                              metadata={"help": "attn_in (norm -> q/k/v), mlp_in (norm -> gate/up), mlp_down (up -> down)"})

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError("bits must be between 2 and 8")
        if self.group_size < 8:
            raise ValueError("group_size must be at least 8")
        if self.grid < 2:
            raise ValueError("grid must be at least 2")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown group {bad[0]!r}; choose from {', '.join(GROUPS)}")


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Group-wise asymmetric round-to-nearest along the input dimension (rows padded to whole groups)."""
    out_f, in_f = w.shape
    pad = (-in_f) % group
    x = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, -1, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    q = ((x - lo) / scale).round().clamp(0, levels)
    return (q * scale + lo).reshape(out_f, -1)[:, :in_f]


def output_error(terms: list[tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor, bits: int, group: int) -> float:
    """Sum over the (W, H) terms of tr(E H E^T): the squared error the layers' outputs take on their calibration
    inputs; H is X^T X / n, or its diagonal alone (a vector: an expert's second moments, weighted by its share of
    the tokens)."""
    total = 0.0
    for w, h in terms:
        e = fake_quantize(w * s, bits, group) / s - w
        total += float(((e @ h) * e).sum()) if h.ndim == 2 else float((e * e * h).sum())
    return total


def search_scales(terms: list[tuple[torch.Tensor, torch.Tensor]], rms: torch.Tensor,
                  cfg: AwqConfig) -> tuple[torch.Tensor, float, float, float]:
    """(scales, alpha, error with them, error without) for layers that read one input whose channels have the
    root mean squares ``rms`` (s = rms^alpha, alpha from the grid)."""
    plain = output_error(terms, torch.ones_like(rms), cfg.bits, cfg.group_size)
    best = (torch.ones_like(rms), 0.0, plain)
    for i in range(1, cfg.grid):
        alpha = i / cfg.grid
        s = rms ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(terms, s, cfg.bits, cfg.group_size)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], plain


def _rescale_stats(stats, modules: list[str], s: torch.Tensor) -> None:
    """The layers' inputs are now x / s: their second moments and X^T X follow."""
    s64 = s.double()
    for m in modules:
        stats.sum_sq[m] = stats.sum_sq[m] / s64 ** 2
    keys = {stats.input_of.get(m) for m in modules} - {None}
    for k in keys:
        if k in stats.xtx:
            stats.xtx[k] = (stats.xtx[k].double() / torch.outer(s64, s64)).float()


@dataclass(frozen=True)
class Group:
    """Linear layers that read one input, and where that input's division by the scales folds: the norm that makes
    it (``norm``), or the rows of the linear layer that makes it (``rows_of``, ``rows``: "all" or Phi-3's "second
    half", the up half of its fused gate-up). Module paths within a decoder block."""
    linears: tuple[str, ...]
    norm: str = ""
    rows_of: str = ""
    rows: str = "all"


@dataclass(frozen=True)
class ExpertGroup:
    """A mixture of experts' layers scaled together (``experts``: the stacked module, ``gate_up_proj`` [experts,
    2 x width, hidden], ``down_proj`` [experts, hidden, width]). ``mlp_in``: every expert's gate and up read the
    norm's output, routed: one scale for all, their columns and the router's times it (llama.cpp keeps the router
    unquantized, so it only carries the scale), the norm divided. ``mlp_down``: each expert's own scale, its down
    projection's columns times it, the up half of its gate_up rows divided. Each expert's error is weighed by its
    inputs' second moments (the imatrix keeps no X^T X per expert: a block's worth each)."""
    experts: str
    norm: str = ""
    router: str = ""


def awq_groups(config) -> dict[str, Group | ExpertGroup]:
    """The family's layer groups: Llama's pre-norms feed q/k/v and gate/up, up_proj feeds down_proj (after the
    activation: linear in up); Gemma 2/3 feed the MLP from ``pre_feedforward_layernorm``; Phi-3 fuses q/k/v and
    gate/up (its up is the second half of gate_up_proj's rows); StarCoder2's MLP is c_fc -> GeLU -> c_proj (nothing
    folds past the GeLU); OLMo 2's norms come after attention and MLP (only up -> down folds); StableLM with a
    parallel residual feeds its MLP from the attention's norm (that group would need one scale for both)."""
    kind = config.model_type
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if kind == "phi3":
        return {"attn_in": Group(("self_attn.qkv_proj",), norm="input_layernorm"),
                "mlp_in": Group(("mlp.gate_up_proj",), norm="post_attention_layernorm"),
                "mlp_down": Group(("mlp.down_proj",), rows_of="mlp.gate_up_proj", rows="second half")}
    if kind == "starcoder2":
        return {"attn_in": Group(attn, norm="input_layernorm"), "mlp_in": Group(("mlp.c_fc",), norm="post_attention_layernorm")}
    if kind in ("qwen3_moe", "mixtral"):
        return {"attn_in": Group(attn, norm="input_layernorm"),
                "mlp_in": ExpertGroup("mlp.experts", norm="post_attention_layernorm", router="mlp.gate"),
                "mlp_down": ExpertGroup("mlp.experts")}
    mlp_norm = "pre_feedforward_layernorm" if kind in ("gemma2", "gemma3_text") else "post_attention_layernorm"
    groups = {"attn_in": Group(attn, norm="input_layernorm"),
              "mlp_in": Group(("mlp.gate_proj", "mlp.up_proj"), norm=mlp_norm),
              "mlp_down": Group(("mlp.down_proj",), rows_of="mlp.up_proj")}
    if kind == "olmo2":
        return {"mlp_down": groups["mlp_down"]}
    if kind == "stablelm" and getattr(config, "use_parallel_residual", False):
        del groups["mlp_in"]
    return groups


def norm_shift(config) -> float:
    """What a family's norms add to their weight before scaling (Gemma's RMSNorm scales by 1 + w)."""
    from ..architectures import arch_spec

    spec = arch_spec(config.model_type)
    return spec.gguf_norm_shift if spec is not None else 0.0


def fold_scales(layer, group: Group, s: torch.Tensor, shift: float = 0.0) -> None:
    """The group's linear layers read x * s where they read x: their columns times s, and x divided by s where it is
    made: the norm's scale (shift + w) and bias, or the rows of the linear layer that makes it (and their bias)."""
    for path in group.linears:
        lin = layer.get_submodule(path)
        lin.weight.mul_(s.to(lin.weight.dtype))
    if group.norm:
        norm = layer.get_submodule(group.norm)
        w = norm.weight
        w.copy_((w.double() + shift).div(s.double().to(w.device)).sub(shift).to(w.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        return
    prev = layer.get_submodule(group.rows_of)
    rows = slice(prev.out_features - len(s), None) if group.rows == "second half" else slice(None)
    prev.weight[rows].div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias[rows].div_(s.to(prev.bias.dtype))


def fold_expert_scales(layer, group: ExpertGroup, s: torch.Tensor, shift: float = 0.0, expert: int | None = None) -> None:
    """``mlp_in`` (no ``expert``): every expert's gate and up columns and the router's times s, the norm divided;
    ``mlp_down``: expert ``expert``'s down projection's columns times s, the up half of its gate_up rows divided."""
    experts = layer.get_submodule(group.experts)
    if expert is None:
        experts.gate_up_proj.mul_(s.to(experts.gate_up_proj.dtype))
        fold_scales(layer, Group((group.router,), norm=group.norm), s, shift)
        return
    experts.down_proj[expert].mul_(s.to(experts.down_proj.dtype))
    experts.gate_up_proj[expert, experts.down_proj.shape[-1]:].div_(s.to(experts.gate_up_proj.dtype)[:, None])


def apply_awq(model, stats, cfg: AwqConfig, progress=None, cancelled=None) -> list[dict]:
    """Rescale every decoder layer of a loaded model in place; returns one record per layer group."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise EdgeTailorError("AWQ scaling needs a decoder with model.layers.", "Use a model of a supported family.")
    records = []
    for li, layer in enumerate(layers):
        if cancelled and cancelled():
            raise RunCancelled()
        records += scale_layer(layer, f"model.layers.{li}.", stats, cfg, model.config)
        if progress:
            progress((li + 1) / len(layers), f"layer {li + 1}/{len(layers)} scaled")
    return records


def scale_layer(layer, prefix: str, stats, cfg: AwqConfig, config) -> list[dict]:
    """One decoder layer's groups (those of ``cfg.groups`` the family has) rescaled in place, and the statistics
    with them: one record per group."""
    groups, shift = awq_groups(config), norm_shift(config)
    records = []
    for name in (g for g in cfg.groups if g in groups):
        group = groups[name]
        if isinstance(group, ExpertGroup):
            records.append(_scale_experts(layer, prefix, name, group, stats, cfg, shift))
            continue
        modules = [prefix + p for p in group.linears]
        h = stats.hessian(modules[0])
        if h is None:
            raise EdgeTailorError("AWQ scaling needs the inputs' X^T X.",
                                  "Run the 'imatrix' step with hessians: true before 'awq.scale'.")
        with torch.no_grad():
            h = h.float()
            terms = [(layer.get_submodule(p).weight.detach().float(), h) for p in group.linears]
            s, alpha, err, plain = search_scales(terms, torch.diagonal(h).clamp_min(1e-12).sqrt(), cfg)
            if alpha > 0:
                fold_scales(layer, group, s, shift)
                _rescale_stats(stats, modules, s)
        records.append({"layer": int(prefix.split(".")[-2]), "group": name, "alpha": alpha,
                        "error_before": plain, "error_after": err})
    return records


#: rows of an expert's matrix its stand-in error is measured on (evenly spaced; the error is a sum over rows, each
#: row's a function of the scales alone). One Qwen3-30B-A3B-shaped block, 2 threads: 91 + 55 s on every row,
#: 19 + 1 s sampled, the same alpha for the shared input (0.35) and a mean of 0.31 for the down projections either way
EXPERT_ROWS = 256


def sampled_rows(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's (W, h) term on at most ``EXPERT_ROWS`` of its rows, h scaled to stand for all of them."""
    if w.shape[0] <= EXPERT_ROWS:
        return w.float(), h
    idx = torch.linspace(0, w.shape[0] - 1, EXPERT_ROWS).round().long()
    return w[idx].float(), h * (w.shape[0] / EXPERT_ROWS)


def _scale_experts(layer, prefix: str, name: str, group: ExpertGroup, stats, cfg: AwqConfig, shift: float) -> dict:
    """One mixture of experts' group (``ExpertGroup``) searched and folded in place, its statistics rescaled."""
    experts = layer.get_submodule(group.experts)
    key = f"{prefix}{group.experts}"
    seen = [e for e in range(experts.gate_up_proj.shape[0]) if f"{key}.{e}.gate_proj" in stats.sum_sq]
    if not seen:
        raise EdgeTailorError("AWQ scaling found no statistics for this mixture of experts' inputs.",
                              "Run the 'imatrix' step before 'awq.scale'.")
    record = {"layer": int(prefix.split(".")[-2]), "group": name}
    with torch.no_grad():
        if name == "mlp_in":
            tokens = sum(stats.count[f"{key}.{e}.gate_proj"] for e in seen)
            terms = [sampled_rows(experts.gate_up_proj[e], stats.sum_sq[f"{key}.{e}.gate_proj"].float() / tokens)
                     for e in seen]
            rms = (sum(stats.sum_sq[f"{key}.{e}.gate_proj"] for e in seen) / tokens).clamp_min(1e-12).sqrt().float()
            s, alpha, err, plain = search_scales(terms, rms, cfg)
            if alpha > 0:
                fold_expert_scales(layer, group, s, shift)
                _rescale_stats(stats, [f"{key}.{e}.{p}" for e in seen for p in ("gate_proj", "up_proj")], s)
            return {**record, "alpha": alpha, "error_before": plain, "error_after": err}
        alphas, err, plain = [], 0.0, 0.0
        for e in seen:
            d = stats.second_moment(f"{key}.{e}.down_proj").float()
            s, alpha, e_err, e_plain = search_scales([sampled_rows(experts.down_proj[e], d)], d.clamp_min(1e-12).sqrt(), cfg)
            if alpha > 0:
                fold_expert_scales(layer, group, s, expert=e)
                _rescale_stats(stats, [f"{key}.{e}.down_proj"], s)
            alphas.append(alpha)
            err, plain = err + e_err, plain + e_plain
    return {**record, "alpha": sum(alphas) / len(alphas), "experts_scaled": sum(a > 0 for a in alphas),
            "error_before": plain, "error_after": err}


def _scaled_modules(block, config) -> dict:
    """What scaling may change in a block: its linear layers and norms, a mixture of experts' experts and router."""
    moe = {p for g in awq_groups(config).values() if isinstance(g, ExpertGroup) for p in (g.experts, g.router) if p}
    return {n: m for n, m in block.module.named_modules(prefix=block.prefix.rstrip("."))
            if isinstance(m, torch.nn.Linear) or n.endswith("layernorm") or n[len(block.prefix):] in moe}


def _streamed_need(shape):
    from ..footprint import hessians_bytes, streamed_transform_need

    need = streamed_transform_need("awq.scale", shape)
    need.parts["X^T X of every layer input (held)"] = hessians_bytes(shape)
    need.ram_bytes += hessians_bytes(shape)
    if shape.experts:       # the shared input's search: every expert's sampled rows, and the stand-in's copy of them
        need.parts["the experts' sampled rows (fp32, twice)"] = 2 * shape.experts * EXPERT_ROWS * shape.hidden * 4
        need.ram_bytes += need.parts["the experts' sampled rows (fp32, twice)"]
    return need


@register_step("awq.scale", AwqConfig, kind="transform",
               summary="AWQ-style per-channel scaling folded into the norms and up_proj (equivalent model, easier to quantize)",
               exports="GGUF and ONNX natively: the scales fold into existing weights, so the graph is unchanged",
               ram_multiple=1.2, streamed_ram=lambda cfg, shape: _streamed_need(shape),
               disk_bytes=lambda cfg, shape: scratch_bytes(shape, exact=False))
def awq_scale(ctx: RunContext, cfg: AwqConfig) -> None:
    from .imatrix import current_stats, keep_stats

    stats = current_stats(ctx, need_hessians=True)
    walk, records = ctx.transform_walk(), []
    for block in walk:                    # one block's weights at a time; the scaled ones kept
        records += scale_layer(block.module, block.prefix, stats, cfg, walk.model.config)
        block.keep(_scaled_modules(block, walk.model.config))
    label = f"awq{cfg.bits}"
    ctx.mark_applied(label, walk.result())
    keep_stats(ctx, stats, ctx.weights())  # rescaled with the model: still valid, saved again for the scaled model
    before = sum(r["error_before"] for r in records)
    after = sum(r["error_after"] for r in records)
    scaled = sum(r["alpha"] > 0 for r in records)
    ctx.report(**{"label": label, "groups_scaled": scaled, "groups": len(records),
                             "stand_in_output_error_before": before, "stand_in_output_error_after": after,
                             "alphas": [r["alpha"] for r in records]})
    ctx.log(f"{label}: {scaled}/{len(records)} layer groups rescaled; stand-in {cfg.bits}-bit output error "
            f"{before:.4g} -> {after:.4g} ({100 * (after / before - 1):+.1f}%)")
    ctx.progress(1.0, f"{label}: {scaled}/{len(records)} groups rescaled")

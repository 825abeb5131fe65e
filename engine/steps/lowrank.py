"""Low-rank factorization: each selected linear W (out x in) becomes B (out x r) @ A (r x in).

Ranks are chosen per layer by the energy kept (share of the sum of squared singular values), or across
all selected layers by a parameter budget: singular directions are taken greedily by their gain per
parameter (sigma^2 / (out + in)) until the budget is met; a layer whose rank would cost as much as its
dense matrix stays dense.

The activation-aware variant (SVD-LLM's truncation-aware whitening) factors W S, where S S^T = X^T X is
the Cholesky factor of the layer's input covariance on calibration text, and maps back with S^-1: the
dropped singular values are then exactly the error of the layer's *outputs* on that text, not of its
weights, which keeps much more quality at the same rank.

In torch the factored layers stay factored (``LowRankLinear``: two Linear layers), so their parameter
count and speed are real there. GGUF and ONNX have no factored Llama linear: the exporters get B @ A
multiplied back into plain weights (no size saving in the file; the quality effect is kept, and it pairs
with quantization).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..context import RunContext
from ..errors import EdgeTailorError, RunCancelled
from ..registry import register_step

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LowRankLinear(nn.Module):
    """``second(first(x))`` = x A^T B^T (+ bias): a rank-r stand-in for an out x in linear layer."""

    def __init__(self, first: nn.Linear, second: nn.Linear):
        super().__init__()
        self.first = first      # in -> r, no bias
        self.second = second    # r -> out, the original bias
        self.in_features, self.out_features = first.in_features, second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x):
        return self.second(self.first(x))

    def to_plain(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                        dtype=self.second.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.second.weight @ self.first.weight)
            if self.second.bias is not None:
                lin.bias.copy_(self.second.bias)
        return lin


@dataclass
class LowRankConfig:
    mode: str = field(default="budget", metadata={
        "help": "budget: keep a share of the selected layers' parameters; energy: keep a share of each "
                "layer's squared singular values (of W S, the output error, when activation-aware)"})
    keep: float = field(default=0.7, metadata={"help": "the share kept (parameters or energy), 0..1"})
    activation_aware: bool = field(default=True, metadata={
        "help": "whiten with the calibration input covariance before the SVD (SVD-LLM)"})
    targets: list[str] = field(default_factory=lambda: list(LINEAR_NAMES),
                               metadata={"help": "linear layer names to factor"})
    factored: bool = field(default=True, metadata={
        "help": "keep B and A as two layers in torch (real size and speed); false multiplies them back"})
    calibration_sequences: int = field(default=16, metadata={"help": "calibration sequences (activation-aware)"})
    calibration_length: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self):
        if self.mode not in ("budget", "energy"):
            raise ValueError("mode must be 'budget' or 'energy'")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError("keep must be in (0, 1]")
        unknown = sorted(set(self.targets) - set(LINEAR_NAMES))
        if unknown or not self.targets:
            raise ValueError(f"targets must be among {LINEAR_NAMES}, not {unknown or 'empty'}")


def target_linears(model, targets) -> dict[str, nn.Linear]:
    from ..calibration import decoder_layers

    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                out[f"model.layers.{i}.{name}"] = mod
    if not out:
        raise EdgeTailorError(f"The model has no linear layers named {targets} to factor.",
                              "Pick targets among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.")
    return out


def input_covariances(model, linears: dict[str, nn.Linear], sequences, progress=None, cancelled=None) -> dict:
    """X^T X (float64) of each linear layer's input over the calibration sequences (the one input collector;
    layers fed the same input, as q/k/v and gate/up, share one matrix)."""
    from ..calibration import run_batches
    from ..imatrix import InputCollector

    collector = InputCollector(hessians=True, dtype=torch.float64)
    with collector.hooks(linears):
        run_batches(model, sequences, progress=progress, cancelled=cancelled)
    collector.done()
    return {name: collector.xtx[collector.input_of[name]] for name in linears}


@dataclass
class Factors:
    u: torch.Tensor          # out x k
    s: torch.Tensor          # k, descending
    vt: torch.Tensor         # k x in, already mapped back through S^-1 when whitened


def factor(weight: torch.Tensor, cov: torch.Tensor | None) -> Factors:
    w = weight.detach().double()
    if cov is None:
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        return Factors(u.float(), s.float(), vt.float())
    n = cov.shape[0]
    damp = 1e-6 * float(cov.diagonal().mean()) + 1e-12
    chol, info = torch.linalg.cholesky_ex(cov + damp * torch.eye(n, dtype=cov.dtype))
    if int(info):
        chol = torch.linalg.cholesky(cov + (1e-2 * float(cov.diagonal().mean()) + 1e-8) * torch.eye(n, dtype=cov.dtype))
    u, s, vt = torch.linalg.svd(w @ chol, full_matrices=False)
    vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)   # vt @ chol^-1
    return Factors(u.float(), s.float(), vt.float())


def ranks_by_energy(factors: dict[str, Factors], shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int]:
    ranks = {}
    for name, f in factors.items():
        e = f.s.square()
        cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-30)
        ranks[name] = min(int(torch.searchsorted(cum, torch.tensor(keep, dtype=cum.dtype) - 1e-12)) + 1, len(e))
    return ranks


def ranks_by_budget(factors: dict[str, Factors], shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int]:
    """Greedy by singular-value gain per parameter until ``keep`` of the dense parameters are used.

    A layer's cost is min(r (out + in), out x in): at full cost it is stored dense. Directions that do
    not fit are skipped and cheaper ones still tried, so the budget is filled to within one direction.
    Every layer keeps at least rank 1.
    """
    dense = {n: o * i for n, (o, i) in shapes.items()}
    budget = keep * sum(dense.values())
    names = list(factors)
    gains, owners = [], []
    for k, name in enumerate(names):
        o, i = shapes[name]
        gains.append(factors[name].s.square() / (o + i))
        owners.append(torch.full((len(factors[name].s),), k))
    order = torch.argsort(torch.cat(gains), descending=True)
    owner = torch.cat(owners)[order].tolist()
    ranks = dict.fromkeys(names, 1)           # every layer keeps at least its strongest direction
    used = sum(min(o + i, dense[n]) for n, (o, i) in shapes.items())
    first = set()
    for k in owner:
        name = names[k]
        if name not in first:                 # that direction is already counted
            first.add(name)
            continue
        o, i = shapes[name]
        old = min(ranks[name] * (o + i), dense[name])
        new = min((ranks[name] + 1) * (o + i), dense[name])
        if used - old + new <= budget:
            ranks[name] += 1
            used += new - old
    return ranks


def build(linear: nn.Linear, f: Factors, rank: int) -> LowRankLinear:
    root = f.s[:rank].sqrt()
    first = nn.Linear(linear.in_features, rank, bias=False, dtype=linear.weight.dtype)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * f.vt[:rank]).to(linear.weight.dtype))
        second.weight.copy_((f.u[:, :rank] * root[None, :]).to(linear.weight.dtype))
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return LowRankLinear(first, second)


def factorize(model, cfg: LowRankConfig, sequences=None, progress=None, cancelled=None) -> dict:
    """Factor the model's target linears in place; returns a report (ranks, parameters before/after)."""
    progress = progress or (lambda f, m: None)
    linears = target_linears(model, cfg.targets)
    covs = {}
    if cfg.activation_aware:
        if sequences is None:
            raise EdgeTailorError("Activation-aware low-rank factorization needs calibration text.",
                                  "Give calibration sequences, or set activation_aware: false.")
        covs = input_covariances(model, linears, sequences, lambda f, m: progress(0.2 * f, m), cancelled)
    factors, shapes = {}, {}
    for k, (name, lin) in enumerate(linears.items()):
        if cancelled and cancelled():
            raise RunCancelled()
        factors[name] = factor(lin.weight, covs.get(name))
        shapes[name] = (lin.out_features, lin.in_features)
        progress(0.2 + 0.7 * (k + 1) / len(linears), f"SVD {k + 1}/{len(linears)}: {name}")
    choose = ranks_by_budget if cfg.mode == "budget" else ranks_by_energy
    ranks = choose(factors, shapes, cfg.keep)
    before = sum(o * i for o, i in shapes.values())
    after, factored, energy = 0, 0, []
    for name, lin in linears.items():
        o, i = shapes[name]
        r = ranks[name]
        if r * (o + i) >= o * i:          # no saving: keep it dense and exact
            after += o * i
            energy.append(1.0)
            continue
        s2 = factors[name].s.square()
        energy.append(float(s2[:r].sum() / s2.sum().clamp_min(1e-30)))
        new = build(lin, factors[name], r)
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, new if cfg.factored else new.to_plain())
        after += r * (o + i)
        factored += 1
    return {"ranks": ranks, "energy_kept": energy, "linear_params_before": before, "linear_params_after": after,
            "layers_factored": factored, "layers": len(linears)}


@register_step("lowrank.svd", LowRankConfig, kind="transform",
               summary="Factor linear layers as two low-rank matrices (SVD; activation-aware SVD-LLM whitening)",
               exports="torch: stays factored (real size and speed). GGUF and ONNX: B @ A is multiplied back "
                       "into plain weights at export (same file size as dense; the quality change is kept)",
               ram_multiple=1.5)
def lowrank_svd(ctx: RunContext, cfg: LowRankConfig) -> None:
    seqs = None
    if cfg.activation_aware:
        from ..calibration import token_sequences

        seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.calibration_length,
                               cfg.calibration_sequences)
    total_before = sum(p.numel() for p in ctx.model.parameters())
    rep = factorize(ctx.model, cfg, seqs, progress=ctx.progress, cancelled=ctx.cancel.is_set)
    total_after = sum(p.numel() for p in ctx.model.parameters())
    share = rep["linear_params_after"] / rep["linear_params_before"]
    label = f"{'asvd' if cfg.activation_aware else 'svd'}{round(100 * (share if cfg.mode == 'budget' else cfg.keep))}"
    if cfg.mode == "energy":
        label += "e"
    ctx.mark_applied(label)
    ctx.report(**{"label": label, "parameters_before": total_before, "parameters_after": total_after,
                             **{k: v for k, v in rep.items() if k != "ranks"},
                             "ranks": rep["ranks"], "factored_in_torch": cfg.factored})
    ctx.log(f"{label}: factored {rep['layers_factored']}/{rep['layers']} linear layers; linear parameters "
            f"{rep['linear_params_before']:,} -> {rep['linear_params_after']:,} ({100 * share:.1f}%), model "
            f"{total_before:,} -> {total_after:,}; mean energy kept "
            f"{100 * sum(rep['energy_kept']) / len(rep['energy_kept']):.1f}%"
            + ("" if cfg.factored else " (multiplied back into plain weights)"))
    ctx.progress(1.0, f"{label}: {100 * share:.1f}% of the linear parameters kept")

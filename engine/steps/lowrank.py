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
from pathlib import Path

import torch
from torch import nn

from ..architectures import ModelDims
from ..context import RunContext
from ..errors import EdgeTailorError
from ..registry import register_step

#: the decoder blocks' linear layers as the families name them: Llama's, Phi-3's fused q/k/v and gate/up,
#: StarCoder2's MLP (c_fc, c_proj); a model is factored in the ones it has
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
                "c_fc", "c_proj"]


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
        "help": "keep B and A as two layers in torch (real size and speed; holds a model of up to 2 GB in fp32, "
                "larger ones stream); false multiplies them back and streams"})
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


def block_targets(block, targets) -> dict[str, nn.Linear]:
    """A walked block's linear layers named in ``targets``, by qualified name."""
    return {n: m for n, m in block.linears().items() if n.rsplit(".", 1)[-1] in targets}


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


def most_useful_rank(out: int, inp: int) -> int:
    """The largest rank that still saves parameters (r (out + in) < out x in); beyond it a layer stays dense."""
    return max(1, (out * inp - 1) // (out + inp))


class FactorStore:
    """Each layer's factors up to ``most_useful_rank`` (what the rank choice can keep), between the two walks: in
    memory, or with a ``folder`` in one safetensors file per block (a model read lazily: one block in memory)."""

    def __init__(self, folder: Path | None = None):
        self.folder, self.held = folder, {}

    def put(self, index: int, factors: dict[str, Factors]) -> None:
        if self.folder is None:
            self.held[index] = factors
            return
        from safetensors.torch import save_file

        from ..atomic import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"block-{index:05d}.safetensors") as tmp:
            save_file({f"{n}/{k}": getattr(f, k).contiguous() for n, f in factors.items() for k in ("u", "s", "vt")},
                      str(tmp))

    def get(self, index: int) -> dict[str, Factors]:
        if self.folder is None:
            return self.held.pop(index, {})
        from safetensors.torch import load_file

        flat = load_file(str(self.folder / f"block-{index:05d}.safetensors"))
        names = {k.rsplit("/", 1)[0] for k in flat}
        return {n: Factors(flat[f"{n}/u"], flat[f"{n}/s"], flat[f"{n}/vt"]) for n in names}


def measure_factors(model, cfg: LowRankConfig, sequences, store: FactorStore, progress=None, cancelled=None):
    """The first walk: each block's target layers factored (whitened by the covariance of their inputs, measured
    as the walk runs the untouched block: the source's own activations), kept in ``store``; returns every layer's
    singular values and shape (what the rank choice reads)."""
    from ..imatrix import InputCollector
    from ..walker import BlockWalk

    spectra, shapes = {}, {}
    for block in BlockWalk(model, sequences, cancelled=cancelled, progress=progress):
        linears = block_targets(block, cfg.targets)
        covs = {}
        if sequences is not None:
            acc = InputCollector(hessians=True, dtype=torch.float64)
            with acc.hooks(linears):
                block.forward()
            acc.done()
            covs = {n: acc.xtx[acc.input_of[n]] for n in linears}
            del acc
        kept = {}
        for name, lin in linears.items():
            f = factor(lin.weight, covs.get(name))
            o, i = lin.out_features, lin.in_features
            r = min(most_useful_rank(o, i), len(f.s))
            kept[name] = Factors(f.u[:, :r].contiguous(), f.s.clone(), f.vt[:r].contiguous())
            spectra[name], shapes[name] = f.s, (o, i)
        del covs
        store.put(block.index, kept)
    return spectra, shapes


# Long by design: the two walks (measure every layer, choose ranks across them, rebuild) read as one algorithm.
def factorize(model, cfg: LowRankConfig, sequences=None, progress=None, cancelled=None, scratch: Path | None = None,
              rebuild_walk=None) -> dict:
    """Factor the model's target linears: a first walk factors every layer (``measure_factors``), the ranks are
    chosen across all of them, a second walk puts the rank-r layers in. A loaded model is changed in place
    (``LowRankLinear``, or multiplied back when not ``cfg.factored``); a lazy one (``scratch`` for the factors,
    ``rebuild_walk``: a transform walk that keeps what it changes) gets the multiplied-back weights written
    block by block, and ``result`` is the model they make. Returns the report (ranks, parameters before/after)."""
    from ..walker import BlockWalk

    progress = progress or (lambda f, m: None)
    if cfg.activation_aware and sequences is None:
        raise EdgeTailorError("Activation-aware low-rank factorization needs calibration text.",
                              "Give calibration sequences, or set activation_aware: false.")
    store = FactorStore(scratch)
    spectra, shapes = measure_factors(model, cfg, sequences if cfg.activation_aware else None, store,
                                      lambda f, m: progress(0.8 * f, f"factoring: {m}"), cancelled)
    if not shapes:
        raise EdgeTailorError(f"The model has no linear layers named {cfg.targets} to factor.",
                              f"Pick targets among {', '.join(LINEAR_NAMES)}.")
    choose = ranks_by_budget if cfg.mode == "budget" else ranks_by_energy
    ranks = choose({n: Factors(None, s, None) for n, s in spectra.items()}, shapes, cfg.keep)
    walk = rebuild_walk(None) if rebuild_walk else BlockWalk(model, None, cancelled=cancelled)
    after, factored, energy = 0, 0, []
    for block in walk:
        kept = store.get(block.index)
        changed = {}
        for name, lin in block_targets(block, cfg.targets).items():
            (o, i), r = shapes[name], ranks[name]
            if r * (o + i) >= o * i:          # no saving: keep it dense and exact
                after += o * i
                energy.append(1.0)
                continue
            s2 = spectra[name].square()
            energy.append(float(s2[:r].sum() / s2.sum().clamp_min(1e-30)))
            new = build(lin, kept[name], r)
            changed[name] = new if cfg.factored and not walk.lazy else new.to_plain()
            after += r * (o + i)
            factored += 1
        if walk.lazy:
            block.keep(changed)
        else:
            for name, new in changed.items():
                parent_name, child = name[len(block.prefix):].rsplit(".", 1)
                setattr(block.module.get_submodule(parent_name), child, new)
        progress(0.8 + 0.2 * (block.index + 1) / len(walk), f"rank-r layers of block {block.index + 1}/{len(walk)}")
    if scratch is not None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return {"ranks": ranks, "energy_kept": energy, "linear_params_before": sum(o * i for o, i in shapes.values()),
            "linear_params_after": after, "layers_factored": factored, "layers": len(shapes),
            "factored_in_torch": cfg.factored and not walk.lazy, "result": walk.result() if walk.lazy else None}


def _parameters(model) -> int:
    """The model's parameters, a tied head counted once (as torch counts them)."""
    if getattr(model, "is_lazy", False):
        tied = ModelDims.of(model.config).tied
        return sum(t.numel() for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight"))
    return sum(p.numel() for p in model.parameters())


def _factorize(ctx: RunContext, model, cfg: LowRankConfig, seqs) -> dict:
    lazy = getattr(model, "is_lazy", False)
    return factorize(model, cfg, seqs, progress=ctx.progress, cancelled=ctx.cancel.is_set,
                     scratch=ctx.record.folder / "scratch" / "lowrank-factors" if lazy else None,
                     rebuild_walk=ctx.transform_walk if lazy else None)


def holds_factors(cfg: LowRankConfig, fp32_bytes: int) -> bool:
    """Whether the step holds the model to keep its factored layers in torch (``factored``, for a model small
    enough to be evaluated in torch); otherwise it streams and writes the multiplied-back weights, which is what
    the file formats store anyway."""
    from ..reference import TORCH_REFERENCE_MAX_BYTES

    return cfg.factored and fp32_bytes <= TORCH_REFERENCE_MAX_BYTES


def _lowrank_need(cfg: LowRankConfig, shape):
    """None where the step holds the model (``holds_factors``). Streamed: one block walked (its weights in fp32, the calibration hidden states), its inputs' covariances in
    float64, the SVD of its widest matrix in float64 (the matrix, its whitened copy, U, V^T and LAPACK's work:
    eight copies, measured on a 1B shape) and the block's factors (at most its weights' size, fp32)."""
    from ..footprint import streamed_transform_need

    if holds_factors(cfg, shape.fp32_bytes):
        return None
    tokens = cfg.calibration_sequences * cfg.calibration_length if cfg.activation_aware else 0
    need = streamed_transform_need("lowrank.svd", shape, tokens, cfg.calibration_length)
    h, n, q = shape.hidden, shape.intermediate, shape.q_dim
    extra = {"input covariances of one block (float64)": (2 * h * h + q * q + n * n) * 8 if tokens else 0,
             "SVD of its widest matrix (float64, 8 copies)": max(n, q) * h * 8 * 8,
             "the block's factors (fp32)": shape.block_params * 4}
    need.parts.pop("scores of its largest matrix")
    need.parts.update(extra)
    # the batch's activations (the block's forward) and the SVDs (after it) are never held at once
    need.ram_bytes = sum(need.parts.values()) - min(need.parts.get("one batch's activations", 0),
                                                    extra["SVD of its widest matrix (float64, 8 copies)"])
    return need


def _lowrank_disk(cfg: LowRankConfig, shape) -> float:
    """The blocks' factors (fp32, up to each layer's most useful rank: about the weights' size) while the second
    walk writes the rank-r blocks (fp32) to scratch."""
    from ..footprint import scratch_bytes

    return 2 * scratch_bytes(shape, exact=False)


@register_step("lowrank.svd", LowRankConfig, kind="transform",
               summary="Factor linear layers as two low-rank matrices (SVD; activation-aware SVD-LLM whitening)",
               exports="torch: stays factored (real size and speed) when the model is held. GGUF and ONNX: B @ A "
                       "is multiplied back into plain weights (same file size as dense; the quality change is kept); "
                       "a model read from its files is streamed and gets the multiplied-back weights directly",
               ram_multiple=1.5, streamed_ram=_lowrank_need, disk_bytes=_lowrank_disk)
def lowrank_svd(ctx: RunContext, cfg: LowRankConfig) -> None:
    from ..walker import FusedNamesError

    seqs = None
    if cfg.activation_aware:
        from ..calibration import token_sequences

        seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.calibration_length,
                               cfg.calibration_sequences)
    torch.set_num_threads(ctx.options.resolved_threads())
    model = ctx.weights()
    if getattr(model, "is_lazy", False) and holds_factors(cfg, 4 * _parameters(model)):
        model = ctx.model               # factored layers live in a held torch model
    total_before = _parameters(model)
    try:
        rep = _factorize(ctx, model, cfg, seqs)
    except FusedNamesError as exc:       # fused experts in the files: no lazy walk
        ctx.log(f"{exc.problem} Loading it whole for this step.")
        rep = _factorize(ctx, ctx.model, cfg, seqs)
    result = rep.pop("result")
    share = rep["linear_params_after"] / rep["linear_params_before"]
    total_after = total_before - rep["linear_params_before"] + rep["linear_params_after"] \
        if rep["factored_in_torch"] else total_before
    label = f"{'asvd' if cfg.activation_aware else 'svd'}{round(100 * (share if cfg.mode == 'budget' else cfg.keep))}"
    if cfg.mode == "energy":
        label += "e"
    ctx.mark_applied(label, result)
    ctx.report(**{"label": label, "parameters_before": total_before, "parameters_after": total_after,
                  **{k: v for k, v in rep.items() if k != "ranks"}, "ranks": rep["ranks"]})
    ctx.log(f"{label}: factored {rep['layers_factored']}/{rep['layers']} linear layers; linear parameters "
            f"{rep['linear_params_before']:,} -> {rep['linear_params_after']:,} ({100 * share:.1f}%), model "
            f"{total_before:,} -> {total_after:,}; mean energy kept "
            f"{100 * sum(rep['energy_kept']) / len(rep['energy_kept']):.1f}%"
            + ("" if rep["factored_in_torch"] else " (multiplied back into plain weights"
               + ("; streamed: the file formats multiply them back too)" if result is not None else ")")))
    ctx.progress(1.0, f"{label}: {100 * share:.1f}% of the linear parameters kept")

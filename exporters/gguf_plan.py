"""Mixed precision by measured sensitivity: every tensor's candidate types priced by their expected loss
increase (sum_ij E[g_i^2] E[x_j^2] (W - Q(W))_ij^2 on sampled rows), and the types bought under a byte budget.
Used by ``gguf_calibrated.export_to_target`` and the planner (``engine/planner.py``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine.architectures import arch_spec
from ..engine.errors import EdgeTailorError, RunCancelled
from ..engine.memory import release_pages
from . import gguf_blocks
from .gguf import hf_matrix

if TYPE_CHECKING:
    from .gguf_calibrated import Source

#: the types a planned file chooses from (Q4_0 left out: IQ4_NL has its size and a lower error)
CANDIDATES = ("Q2_K", "Q3_K", "IQ4_NL", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
#: rows of each tensor whose errors the planner measures (drawn in proportion to their loss weight; the cost is
#: scaled to all rows)
PLAN_ROWS = 64


def metadata_bytes(model, tokenizer, tokenizer_dir, workdir: Path) -> int:
    """Bytes of everything in the file but the 2-D tensors' data: header, vocabulary, tensor infos, norms."""
    import gguf

    from .gguf import add_hparams, add_vocab

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    probe = Path(workdir) / "metadata.gguf"
    w = gguf.GGUFWriter(str(probe), spec.gguf_arch)
    add_hparams(w, cfg, spec, int(cfg.num_hidden_layers))
    add_vocab(w, tokenizer, tokenizer_dir, int(cfg.vocab_size))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    size = probe.stat().st_size
    probe.unlink()
    n_tensors = sum(1 for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq"))
    ones = sum(p.numel() * 4 for p in model.state_dict().values() if p.ndim == 1)
    return size + 96 * n_tensors + ones + 64            # name/dims/type/offset and alignment per tensor


def type_bytes(t: str, shape) -> int:
    bt = gguf_blocks.TYPES[t]
    return shape[0] * shape[1] // bt.block * bt.bytes


#: GGUF's default data alignment: each tensor's data may be padded by up to this many bytes
ALIGN = 32


def tensor_bytes(t: str, shape) -> int:
    """Bytes of a tensor's data in any type llama.cpp puts in a file (F16/F32 for rows too short to block)."""
    if t in gguf_blocks.TYPES:
        return type_bytes(t, shape)
    return shape[0] * shape[1] * {"F16": 2, "BF16": 2, "F32": 4}[t]


def sample_rows(weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows drawn with probability proportional to their weight (systematic sampling along the cumulative
    weight, so deterministic), and the factor each sampled row's error counts with, so that the sum over the
    sample estimates the weighted sum over all rows. A handful of rows can carry most of the weight (the output
    head's rows of the tokens the text uses): evenly spaced rows would miss them."""
    R = len(weights)
    if R <= n:
        return np.arange(R), np.asarray(weights, dtype=np.float64)
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0) + 1e-12 * (float(np.max(weights)) + 1e-30)
    cum = np.cumsum(w)
    rows = np.minimum(np.searchsorted(cum, (np.arange(n) + 0.5) * cum[-1] / n), R - 1)
    return rows, np.full(n, cum[-1] / n)


@dataclass
class TypePrices:
    """Every tensor's types priced: (type, bytes, expected loss cost) per tensor, all of them (``every``) and the
    lower convex hull of (bytes, cost) (``hull``: the types worth buying in order); ``onnx``: per ONNX scheme
    (``onnx_plan.SCHEMES``), each tensor's (bytes, cost) in the folder that scheme writes."""
    hull: dict[str, list[tuple[str, int, float]]]
    every: dict[str, list[tuple[str, int, float]]]
    onnx: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)

    def only(self, names) -> "TypePrices":
        """The prices of the tensors in ``names`` alone (a model with blocks removed)."""
        keep = set(names)
        return TypePrices({n: o for n, o in self.hull.items() if n in keep},
                          {n: o for n, o in self.every.items() if n in keep},
                          {s: {n: o for n, o in t.items() if n in keep} for s, t in self.onnx.items()})

    def with_time(self, seconds_cost) -> "TypePrices":
        """These prices with ``seconds_cost(name, type)`` added to every option's cost (a decode time priced
        in loss), the hulls rebuilt: ``choose_types`` then trades quality for speed as well as for bytes."""
        every = {n: sorted(((t, b, c + seconds_cost(n, t)) for t, b, c in o), key=lambda o: (o[1], o[2]))
                 for n, o in self.every.items()}
        return TypePrices({n: _lower_hull(o) for n, o in every.items()}, every, self.onnx)

    def smallest_bytes(self) -> int:
        return sum(o[0][1] for o in self.hull.values())

    def to_dict(self) -> dict:
        return {"hull": self.hull, "every": self.every, "onnx": self.onnx}

    @classmethod
    def from_dict(cls, d: dict) -> "TypePrices":
        def options(table):
            return {n: [tuple(o) for o in opts] for n, opts in table.items()}
        return cls(options(d["hull"]), options(d["every"]),
                   {s: {n: tuple(o) for n, o in t.items()} for s, t in d.get("onnx", {}).items()})

    def largest_bytes(self) -> int:
        return sum(max(x[1] for x in o) for o in self.every.values())


def price_types(sources: dict, sensitivity, max_rows: int | None = None,
                progress: Callable[[float, str], None] | None = None,
                cancelled: Callable[[], bool] | None = None, onnx_schemes=(), experts: dict | None = None) -> TypePrices:
    """The expected loss cost of every tensor under every candidate type.

    The cost of a tensor under a type is ``sum_ij E[g_i^2] E[x_j^2] (W - Q(W))_ij^2`` (``engine.sensitivity``:
    the loss gradient at each output row times the second moment of each input), measured on ``max_rows``
    (default ``PLAN_ROWS``) rows drawn in proportion to their weight and scaled to the whole tensor; it compares
    tensors of different layers with each other, which the input statistics alone cannot. To second order the
    loss increase per token (and the KL to the source) is half the summed cost. ``onnx_schemes``
    (``onnx_plan.OnnxScheme``) are priced on the same rows in the same pass. ``experts``
    (``gguf_calibrated.expert_sources``): each stacked experts tensor priced as the sum of its experts' costs
    (``price_experts``); a router stays in F32, as llama.cpp keeps it.
    """
    from .onnx_plan import price_tensor

    tied = "output.weight" not in sources
    onnx: dict[str, dict[str, tuple[int, float]]] = {s.name: {} for s in onnx_schemes}
    row_weights = gguf_row_weights(sources, sensitivity.output_grad_sq)
    max_rows = max_rows or PLAN_ROWS
    hull_of: dict[str, list[tuple[str, int, float]]] = {}
    every: dict[str, list[tuple[str, int, float]]] = {}
    names = list(sources)
    experts = experts or {}
    total = len(names) + len(experts)
    for k, name in enumerate(names):
        if cancelled and cancelled():
            raise RunCancelled()
        if ROUTER in name:
            hull_of[name] = every[name] = [("F32", tensor_bytes("F32", sources[name].shape), 0.0)]
            continue
        module, W = sources[name].module, sources[name].matrix()
        x2 = sensitivity.input_sq.get(module)
        imp = x2.numpy() if x2 is not None else np.ones(W.shape[1])
        rows, rw = sample_rows(row_weights.get(name, np.ones(W.shape[0])), max_rows)
        sub = W[rows]
        opts = []
        for t in CANDIDATES:
            if W.shape[1] % gguf_blocks.TYPES[t].block:
                continue
            _, deq = gguf_blocks.quantize_matrix(t, sub, imp)
            err = float(rw @ (((deq - sub) ** 2) * imp[None, :]).sum(1))
            opts.append((t, type_bytes(t, W.shape), err))
        if not opts:          # rows no block type divides (llama.cpp keeps these in F16 too)
            opts = [("F16", tensor_bytes("F16", W.shape), 0.0)]
        opts.sort(key=lambda o: (o[1], o[2]))
        hull_of[name] = _lower_hull(opts)
        every[name] = opts
        for s in onnx_schemes:
            onnx[s.name][name] = price_tensor(s, name, W, sub, imp, rw, tied)
        release_pages([sources[name].tensor])          # planning reads every weight once: do not keep it resident
        if progress:
            progress((k + 1) / total, f"pricing the types of {name}")
    say = (lambda f, m: progress((len(names) + f * len(experts)) / total, m)) if progress else None
    for name, opts in price_experts(experts, sensitivity, max_rows, cancelled, say).items():
        hull_of[name], every[name] = _lower_hull(opts), opts
    return TypePrices(hull_of, every, onnx)


#: a mixture of experts' router: kept in F32 (llama-quantize never quantizes it), not priced
ROUTER = "ffn_gate_inp."


def _expert_rows(src, sensitivity, per: int, cancelled=None):
    """Rows of every expert the text chose (``per`` each, drawn by their weight), each row's importance (its
    expert's inputs) and the factor it counts with; (None, None, None) when no expert was chosen."""
    subs, imps, weights = [], [], []
    for e in range(src.shape[0]):
        if cancelled and cancelled():
            raise RunCancelled()
        g2, x2 = sensitivity.output_grad_sq.get(src.key(e)), sensitivity.input_sq.get(src.key(e))
        if g2 is None or x2 is None:
            continue
        picked, rw = sample_rows(g2.numpy(), per)
        subs.append(src.expert(e)[picked])
        imps.append(np.broadcast_to(x2.numpy().astype(np.float32), (len(picked), x2.numel())))
        weights.append(rw)
    if not subs:
        return None, None, None
    return np.concatenate(subs), np.concatenate(imps), np.concatenate(weights)


def price_experts(experts: dict, sensitivity, max_rows: int, cancelled=None,
                  progress: Callable[[float, str], None] | None = None) -> dict[str, list[tuple[str, int, float]]]:
    """Each stacked experts tensor's types priced: per expert, ``sum_ij E[g_i^2] E[x_j^2] D_ij^2`` on rows drawn by
    their weight (``max_rows`` shared by the experts, at least 4 each), with the expert's own statistics (its inputs
    averaged over the tokens routed to it, its output gradients over all tokens: an expert the text rarely chooses
    costs little); the tensor's cost is the experts' sum. An expert no calibration token chose costs nothing."""
    out = {}
    for name, src in experts.items():
        n_exp, rows, cols = src.shape
        subs, imps, weights = _expert_rows(src, sensitivity, max(4, max_rows // n_exp), cancelled)
        cost = {t: 0.0 for t in CANDIDATES if cols % gguf_blocks.TYPES[t].block == 0}
        for t in (cost if subs is not None else ()):      # every expert's rows at once, each with its own inputs
            _, deq = gguf_blocks.quantize_matrix(t, subs, imps)
            cost[t] = float(weights @ (((deq - subs) ** 2) * imps).sum(1))
        opts = [(t, type_bytes(t, (n_exp * rows, cols)), c) for t, c in cost.items()] or \
            [("F16", tensor_bytes("F16", (n_exp * rows, cols)), 0.0)]
        out[name] = sorted(opts, key=lambda o: (o[1], o[2]))
        if progress:
            progress(len(out) / len(experts), f"pricing the types of {name} ({n_exp} experts)")
    return out


def _lower_hull(opts: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The lower convex hull of (bytes, cost), options sorted by (bytes, cost) (of equal sizes, the cheapest)."""
    opts = [o for i, o in enumerate(opts) if i == 0 or o[1] != opts[i - 1][1]]
    hull: list[tuple[str, int, float]] = []
    for o in opts:
        if hull and o[2] >= hull[-1][2]:
            continue
        while len(hull) >= 2 and ((hull[-1][2] - o[2]) * (hull[-1][1] - hull[-2][1])
                                  >= (hull[-2][2] - hull[-1][2]) * (o[1] - hull[-1][1])):
            hull.pop()
        hull.append(o)
    return hull


def choose_types(prices: TypePrices, budget: int) -> tuple[dict[str, str], int, float]:
    """Each tensor's type so that the tensors fit ``budget`` bytes with the least expected cost: (types, tensor
    bytes, summed cost). A greedy pass buys, at every step, the hull upgrade with the largest cost drop per byte
    until the budget is spent, then fills what is left with upgrades off the hull that still fit."""
    options, every = prices.hull, prices.every
    names = list(options)
    level = {n: 0 for n in names}
    total = prices.smallest_bytes()
    if total > budget:
        raise EdgeTailorError(f"The target is too small: even the smallest types need {total / 1e6:.1f} MB of tensors.",
                              "Give a larger size or more bits per weight.")
    largest = prices.largest_bytes()
    if budget > 1.02 * largest:
        raise EdgeTailorError(f"The target is larger than the largest file of these types ({largest / 1e6:.1f} MB of tensors).",
                              "Give a smaller size, or export F16/BF16 with the plain export step.")
    while True:
        best, best_gain = None, 0.0
        for n in names:
            i = level[n]
            if i + 1 < len(options[n]):
                cur, nxt = options[n][i], options[n][i + 1]
                extra = nxt[1] - cur[1]
                if total + extra <= budget:
                    gain = (cur[2] - nxt[2]) / extra
                    if gain > best_gain:
                        best, best_gain = n, gain
        if best is None:
            break
        i = level[best]
        total += options[best][i + 1][1] - options[best][i][1]
        level[best] = i + 1
    chosen = {n: options[n][level[n]] for n in names}
    while True:          # fill what is left with upgrades off the hull that still fit
        best, best_gain = None, 0.0
        for n in names:
            cur = chosen[n]
            for o in every[n]:
                extra = o[1] - cur[1]
                if 0 < extra and total + extra <= budget and o[2] < cur[2] and (cur[2] - o[2]) / extra > best_gain:
                    best, best_gain = (n, o), (cur[2] - o[2]) / extra
        if best is None:
            break
        n, o = best
        total += o[1] - chosen[n][1]
        chosen[n] = o
    return {n: o[0] for n, o in chosen.items()}, total, sum(o[2] for o in chosen.values())


def plan_types(sources: dict, sensitivity, budget: int, max_rows: int | None = None,
               progress: Callable[[float, str], None] | None = None,
               cancelled: Callable[[], bool] | None = None, experts: dict | None = None) -> dict[str, str]:
    """Each tensor's type so that the tensors fit ``budget`` bytes with the least expected loss increase
    (``price_types``, then ``choose_types``)."""
    return choose_types(price_types(sources, sensitivity, max_rows, progress, cancelled, experts=experts), budget)[0]


def gguf_row_weights(sources: dict[str, Source], output_moments: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-row weights of every GGUF matrix (its rows in llama.cpp's order) from E[(dL/dy)^2] per output
    channel of the HF modules (``engine.sensitivity``); a tied embedding takes the output head's."""
    out = {}
    for name, src in sources.items():
        g = output_moments.get(src.module)
        if g is not None and g.numel() == src.shape[0]:
            out[name] = hf_matrix(src.hf_name, g.reshape(-1, 1), src.spec, *src.heads).ravel().astype(np.float64)
    return out



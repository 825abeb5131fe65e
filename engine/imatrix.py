"""Importance statistics of every linear layer's inputs, from calibration text.

For each linear layer (the output head included) this accumulates, over every calibration token, the sum
of x_j^2 per input channel (llama.cpp's importance matrix is that sum divided by the token count) and,
optionally, the full X^T X (the Hessian GPTQ uses). Layers fed by the same tensor (q/k/v, gate/up) share
one accumulation. The result saves to a single safetensors file and loads back::

    stats = collect(model, token_sequences(tok, ctx.calibration_text(), 512), hessians=True)
    stats.second_moment("model.layers.0.mlp.down_proj")    # E[x^2] per input channel
    stats.hessian("model.layers.0.mlp.down_proj")          # X^T X / n
    stats.save(path); ImportanceStats.load(path)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .calibration import input_hooks
from .errors import EdgeTailorError


@dataclass
class ImportanceStats:
    sum_sq: dict[str, torch.Tensor]                 # module -> sum of x^2 per input channel (float64)
    count: dict[str, int]                           # module -> tokens seen
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)   # input key -> X^T X (float32)
    input_of: dict[str, str] = field(default_factory=dict)       # module -> input key of its X^T X
    tokens: int = 0

    def second_moment(self, module: str) -> torch.Tensor:
        return self.sum_sq[module] / max(self.count[module], 1)

    def hessian(self, module: str) -> torch.Tensor | None:
        key = self.input_of.get(module)
        if key is None or key not in self.xtx:
            return None
        return self.xtx[key].double() / max(self.count[module], 1)

    def has_hessians(self) -> bool:
        return bool(self.xtx)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"sum_sq/{k}": v.contiguous() for k, v in self.sum_sq.items()}
        tensors.update({f"xtx/{k}": v.contiguous() for k, v in self.xtx.items()})
        meta = {"count": json.dumps(self.count, sort_keys=True), "input_of": json.dumps(self.input_of, sort_keys=True),
                "tokens": str(self.tokens),
                "format": "edgetailor-imatrix-1"}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "ImportanceStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "edgetailor-imatrix-1":
                raise EdgeTailorError(f"{path} is not an EdgeTailor importance-statistics file.",
                                      "Pass the imatrix.safetensors written by the 'imatrix' step.")
            sum_sq, xtx = {}, {}
            for k in f.keys():
                kind, name = k.split("/", 1)
                (sum_sq if kind == "sum_sq" else xtx)[name] = f.get_tensor(k)
        return cls(sum_sq, json.loads(meta["count"]), xtx, json.loads(meta["input_of"]), int(meta["tokens"]))


def linear_layers(model) -> dict[str, torch.nn.Linear]:
    """Every linear layer of the model by qualified name, the output head included."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _full_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc += x.T @ x


def _double_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    x = x.double()
    acc += x.T @ x


class InputCollector:
    """The one collector of linear layers' input statistics, fed by forward pre-hooks: per layer the sum of x^2
    per channel and the token count; per distinct input tensor (q/k/v share one, gate/up another) X^T X where
    ``hessians`` asks for it (True, or a predicate on the layer name). ``input_of`` maps each layer to the key
    of its input; ``gram(acc, x)`` adds x^T x (default: the full product; the GPTQ writer passes its
    upper-triangle product); ``dtype`` of the X^T X accumulators (float64 for low-rank's whitening)."""

    def __init__(self, hessians: bool | Callable[[str], bool], gram: Callable | None = None,
                 dtype: torch.dtype = torch.float32):
        self.wants_gram = hessians if callable(hessians) else (lambda name, on=bool(hessians): on)
        self.gram = gram or (_full_gram if dtype == torch.float32 else _double_gram)
        self.dtype = dtype
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.input_of: dict[str, str] = {}
        self.last: dict[str, object] = {"x": None}

    def add(self, name: str, x: torch.Tensor, gram: bool = True) -> None:
        if self.last["x"] is not x:                 # a new input (else: the previous layer's, as q/k/v, gate/up)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            self.last.update(x=x, key=name, x2=x2, sq=(x2.double() ** 2).sum(0), gram=False)
        key, sq = self.last["key"], self.last["sq"]
        if gram and not self.last["gram"] and self.wants_gram(name):
            x2 = self.last["x2"]
            if key not in self.xtx:
                self.xtx[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype)
            self.gram(self.xtx[key], x2)
            self.last["gram"] = True
        self.input_of[name] = key
        self.sum_sq[name] = self.sum_sq[name] + sq if name in self.sum_sq else sq.clone()
        self.count[name] = self.count.get(name, 0) + x.numel() // x.shape[-1]

    def done(self) -> None:
        """Drop the last input held for sharing (call after each run through the hooked modules)."""
        self.last = {"x": None}

    def add_experts(self, name: str, experts: torch.nn.Module, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """A mixture of experts' inputs, expert by expert (``{name}.{e}.gate_proj`` / ``up_proj`` / ``down_proj``):
        the tokens the router sent to expert e, and what its down projection reads. Second moments only: a
        Hessian per expert would be a block's worth of memory each."""
        x_all = hidden.detach().reshape(-1, hidden.shape[-1])
        chosen = chosen.reshape(x_all.shape[0], -1)
        for e in range(experts.gate_up_proj.shape[0]):
            routed = (chosen == e).any(-1)
            if not routed.any():
                continue
            x = x_all[routed]
            self.add(f"{name}.{e}.gate_proj", x, gram=False)
            self.add(f"{name}.{e}.up_proj", x, gram=False)
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            self.add(f"{name}.{e}.down_proj", experts.act_fn(gate) * up, gram=False)

    def hooks(self, mods: dict[str, torch.nn.Module], experts: dict[str, torch.nn.Module] | None = None):
        """Pre-hooks on ``mods`` (linear layers) and on ``experts`` (stacked experts, ``walker.Block.experts``),
        removed when the context ends."""
        def on_experts(n):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
                self.add_experts(n, module, hidden, chosen)
            return hook

        return input_hooks([*(m.register_forward_pre_hook(lambda module, args, n=n: self.add(n, args[0]))
                              for n, m in mods.items()),
                            *(m.register_forward_pre_hook(on_experts(n), with_kwargs=True)
                              for n, m in (experts or {}).items())])

    def stats(self, tokens: int) -> ImportanceStats:
        self.done()
        return ImportanceStats(self.sum_sq, self.count, self.xtx, self.input_of, tokens)


def collect(model, sequences: torch.Tensor, hessians: bool = True, batch_size: int = 4,
            progress: Callable[[float, str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> ImportanceStats:
    """Walk the calibration sequences through the model (loaded or lazy, one block at a time) and accumulate
    the statistics of every linear input; the output head's input is the final norm's output (read there, so
    no [batch, seq, vocab] logits are ever made)."""
    from .walker import BlockWalk

    walk = BlockWalk(model, sequences, batch_size, cancelled=cancelled, progress=progress)
    acc = InputCollector(hessians)
    for block in walk:
        with acc.hooks(block.linears(), block.experts()):
            block.forward()
    for y in walk.final_hidden():
        acc.add("lm_head", y)
    return acc.stats(int(sequences.numel()))


def save_llama_imatrix(stats: ImportanceStats, model, path: Path, dataset: str = "calibration", chunk_size: int = 512) -> int:
    """Write the statistics in llama.cpp's GGUF imatrix format (``llama-quantize --imatrix FILE`` reads it).

    Returns the number of weight matrices written. The tied output head is left out, as llama-imatrix does.
    """
    import gguf

    from .architectures import arch_spec, gguf_tensor_names

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    if spec is None:
        raise EdgeTailorError(f"No llama.cpp tensor names for '{cfg.model_type}' models.",
                              "Use EdgeTailor's own imatrix.safetensors with the calibrated GGUF step.")
    names = gguf_tensor_names(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    w = gguf.GGUFWriter(str(path), arch=None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", max(1, stats.tokens // chunk_size))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    n = 0
    for module, (sums, counts) in sorted({**_dense_entries(stats, tied), **_expert_entries(stats, cfg)}.items()):
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            continue
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", counts)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


#: an expert's statistics (``InputCollector.add_experts``): the stacked module, the expert, the projection
EXPERT_ENTRY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def _dense_entries(stats: ImportanceStats, tied: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each linear layer's sums of x^2 and its token count, as llama.cpp's imatrix holds them."""
    return {m: (v.float().numpy(), np.array([float(stats.count[m])], dtype=np.float32)) for m, v in stats.sum_sq.items()
            if not EXPERT_ENTRY.match(m) and not (m == "lm_head" and tied)}


def _expert_entries(stats: ImportanceStats, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each stacked experts tensor (``...experts.gate_proj``, the name llama.cpp's tensor map knows) as llama-imatrix
    writes it for ``ffn_*_exps``: every expert's sums of x^2 [experts, inputs] and its own token count [experts];
    an expert no calibration token reached has zeros (llama.cpp then weighs its inputs alike)."""
    from .architectures import expert_count

    n_experts = expert_count(cfg)
    grouped: dict[str, dict[int, str]] = {}
    for m in stats.sum_sq:
        hit = EXPERT_ENTRY.match(m)
        if hit:
            grouped.setdefault(f"{hit.group(1)}.{hit.group(3)}", {})[int(hit.group(2))] = m
    out = {}
    for tensor, by_expert in grouped.items():
        width = next(iter(stats.sum_sq[m] for m in by_expert.values())).numel()
        sums = np.zeros((max(n_experts, max(by_expert) + 1), width), dtype=np.float32)
        counts = np.zeros((sums.shape[0], 1), dtype=np.float32)       # llama-imatrix's shape: one per expert
        for e, m in by_expert.items():
            sums[e], counts[e] = stats.sum_sq[m].float().numpy(), float(stats.count[m])
        out[tensor] = (sums, counts)
    return out

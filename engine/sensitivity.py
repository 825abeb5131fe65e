"""How much each linear layer's output matters to the model's loss: per output channel, E[(dL/dy)^2].

Input statistics (``imatrix``) say which *inputs* of a layer matter for that layer's own output; they cannot
compare layers with each other: a unit of error in block 3's MLP and in block 28's value projection reach the
loss very differently. The squared gradient of the loss with respect to each output channel, averaged over
calibration tokens, supplies the missing factor. With both, the expected loss increase of a weight error
``D`` is, to second order (the diagonal Fisher information with its usual Kronecker factorization)::

    dL ~= 1/2 * sum_ij  E[g_i^2] * E[x_j^2] * D_ij^2

which is what ``gguf_plan.plan_types`` spends a size budget against. One backward pass over a few
calibration sequences suffices (the per-channel averages settle quickly); the loss is the model's own
next-token cross-entropy on the calibration text. The weights never get gradients; the pass runs block by
block (all pieces through one block, then the next; backward the same way, each block recomputed from its
kept input) and each block's weights are released from resident memory after each use (``engine.memory``),
so it needs less memory than the block-by-block writer (smollm2, 8 x 128 tokens: 372 MB over the process
before the model, vs 547 MB piece by piece, in 11 s instead of 18).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .calibration import input_hooks
from .errors import RunCancelled
from .memory import release_pages, trim_heap

#: tokens whose logits the loss is computed from at once (64 x a 49k vocabulary: 12 MB of float32 logits)
HEAD_ROWS = 64


@dataclass
class Sensitivity:
    """Both factors of the second-order loss estimate, per HF ``nn.Linear`` module (the head included)."""
    input_sq: dict[str, torch.Tensor]        # E[x_j^2] per input channel
    output_grad_sq: dict[str, torch.Tensor]  # E[(dL/dy_i)^2] per output channel
    tokens: int


def measure_sensitivity(model, sequences: torch.Tensor, seq_len: int = 128, max_sequences: int = 8,
                        progress: Callable[[float, str], None] | None = None,
                        cancelled: Callable[[], bool] | None = None) -> Sensitivity:
    """Run a few calibration pieces forward and backward through the model and average, over their tokens,
    every linear layer's squared inputs and the squared gradients of the loss at its outputs.

    ``sequences`` [n, L] are cut into pieces of ``seq_len`` tokens; at most ``max_sequences`` pieces are
    used. The loss is the summed next-token cross-entropy of the model on them.

    The pass goes block by block, not piece by piece (activation checkpointing at block granularity): all
    pieces go forward through one block at a time (only each block's input is kept, and its input moments
    are taken), the head turns the last hidden states into the loss ``HEAD_ROWS`` tokens at a time, and the gradient
    then goes back through one block at a time, each recomputed from its kept input. Each block's weights
    are read twice in all (and released after each use), and only one block's activations exist at once.
    """
    seq_len = min(seq_len, sequences.shape[1])
    pieces = sequences[:, : (sequences.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)[:max_sequences]
    run = _SensitivityPass(model, pieces, progress, cancelled)
    lazy = bool(getattr(model, "is_lazy", False))
    flags = [] if lazy else [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training if not lazy else False
    if not lazy:
        model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        kept, h = run.forward()
        grad = run.loss_gradient(h)
        del h
        run.backward(kept, grad)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if not lazy:
            model.train(was_training)
            release_pages(p.data for p in model.parameters())
    n = max(int(pieces.numel()), 1)
    # an expert's inputs are averaged over the tokens routed to it and its output gradients over all tokens (zero
    # where it was not chosen): their product is E[g^2 x^2] over all tokens, each expert weighted by its share
    return Sensitivity({k: v / run.routed.get(k, n) for k, v in run.in_sq.items()},
                       {k: v / n for k, v in run.grad_sq.items()}, n)


def recording_experts(experts: torch.nn.Module, record: Callable):
    """transformers' stacked-experts forward (the same products in the same order, expert by expert), calling
    ``record("{e}.{proj}", input, output)`` for each expert's gate, up and down projections on the way."""
    F = torch.nn.functional

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(experts.gate_up_proj.shape[0]):
            token, pos = torch.where(top_k_index == e)
            if not len(token):
                continue
            x = hidden_states[token]
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            y = F.linear(h, experts.down_proj[e])
            for proj, inp, o in (("gate_proj", x, gate), ("up_proj", x, up), ("down_proj", h, y)):
                record(f"{e}.{proj}", inp, o)
            out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
        return out
    return forward


class _Patched:
    """A module's forward replaced until ``remove`` (a hook handle's shape)."""

    def __init__(self, module: torch.nn.Module, forward):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward


def _plain(t):
    """A tensor made under inference mode, cloned so autograd can use it."""
    return t.clone() if isinstance(t, torch.Tensor) else t


class _SensitivityPass:
    """One forward and backward pass over the block walk, with hooks that sum E[x^2] and E[(dL/dy)^2]."""

    def __init__(self, model, pieces: torch.Tensor, progress, cancelled):
        from .walker import BlockWalk

        self.pieces, self.progress, self.cancelled = pieces, progress, cancelled
        self.lazy = bool(getattr(model, "is_lazy", False))
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.in_sq: dict[str, torch.Tensor] = {}
        self.routed: dict[str, int] = {}  # an expert's projections: the tokens routed to it
        self.moments = True              # input moments are taken on the forward pass only
        self.walk = BlockWalk(model, pieces, batch_size=len(pieces), cancelled=cancelled)
        self.steps = 2 * len(self.walk) + 1
        self.kws = [{k: tuple(_plain(v) for v in x) if isinstance(x, tuple) else _plain(x) for k, x in kw[0].items()}
                    for kw in self.walk.kwargs]

    def _hook(self, name: str):
        def record(g):
            g = g.detach().reshape(-1, g.shape[-1])
            self.grad_sq[name].add_((g * g).sum(0, dtype=torch.float64))

        def fn(module, args, out):
            if self.moments:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                self.in_sq[name] = self.in_sq[name] + (x ** 2).sum(0) if name in self.in_sq else (x ** 2).sum(0)
            if out.requires_grad:
                self.grad_sq.setdefault(name, torch.zeros(out.shape[-1], dtype=torch.float64))
                out.register_hook(record)
        return fn

    def _record(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """One expert projection's input moments (forward pass) and output gradients (``{block's experts}.{e}.{proj}``,
        as ``imatrix.InputCollector.add_experts`` names them)."""
        if self.moments:
            x2 = x.detach().double() ** 2
            self.in_sq[name] = self.in_sq[name] + x2.sum(0) if name in self.in_sq else x2.sum(0)
            self.routed[name] = self.routed.get(name, 0) + x.shape[0]
        if out.requires_grad:
            self.grad_sq.setdefault(name, torch.zeros(out.shape[-1], dtype=torch.float64))
            def add(g):              # returns None: the gradient flows on unchanged
                self.grad_sq[name].add_((g.detach() ** 2).sum(0, dtype=torch.float64))
            out.register_hook(add)

    def hooked(self, mods: dict, experts: dict | None = None):
        return input_hooks([*(m.register_forward_hook(self._hook(n)) for n, m in mods.items()),
                            *(_Patched(m, recording_experts(m, lambda key, x, out, n=n: self._record(f"{n}.{key}", x, out)))
                              for n, m in (experts or {}).items())])

    def check(self) -> None:
        if self.cancelled and self.cancelled():
            raise RunCancelled()

    def say(self, done: int, message: str) -> None:
        if self.progress:
            self.progress(done / self.steps, f"sensitivity: {message}")

    def forward(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All pieces through one block at a time; each block's input kept; the last hidden states."""
        from .calibration import block_output

        h, kept = _plain(self.walk.hidden[0]), []
        with torch.no_grad():
            for i in range(len(self.walk)):
                self.check()
                kept.append(h)
                with self.walk.block(i) as block, self.hooked(block.linears(), block.experts()):
                    h = block_output(block.module(h, **self.kws[i]))
                    if not self.lazy:
                        release_pages(p.data for p in block.module.parameters())
                self.say(i + 1, f"block {i + 1}/{len(self.walk)} forward")
        return kept, h

    def loss_gradient(self, h: torch.Tensor) -> torch.Tensor:
        """dL/dh of the summed next-token loss, the head run HEAD_ROWS tokens at a time (a vocabulary's logits are
        large); a piece's last token predicts nothing (ignored by the loss: its gradient is zero)."""
        flat = h.reshape(-1, h.shape[-1])
        targets = torch.cat([self.pieces[:, 1:], torch.full_like(self.pieces[:, :1], -100)], 1).reshape(-1)
        grad_flat = torch.zeros_like(flat)
        walk = self.walk
        with walk.holding(walk.final_norm()) as norm, walk.holding(walk.model.get_output_embeddings()) as head, \
                self.hooked({"lm_head": head}):
            for a in range(0, len(flat), HEAD_ROWS):
                self.check()
                hi = flat[a:a + HEAD_ROWS].detach().requires_grad_(True)
                logits = head(norm(hi))
                torch.nn.functional.cross_entropy(logits.float(), targets[a:a + HEAD_ROWS], reduction="sum",
                                                  ignore_index=-100).backward()
                grad_flat[a:a + HEAD_ROWS] = hi.grad
                del hi, logits
        self.say(len(walk) + 1, "loss")
        self.moments = False
        return grad_flat.reshape(h.shape)

    def backward(self, kept: list[torch.Tensor], grad: torch.Tensor) -> None:
        """The gradient back through one block at a time, each recomputed from its kept input."""
        from .calibration import block_output

        n = len(self.walk)
        for i in reversed(range(n)):
            self.check()
            x = kept.pop().requires_grad_(True)
            with self.walk.block(i) as block, self.hooked(block.linears(), block.experts()):
                block_output(block.module(x, **self.kws[i])).backward(grad)
                if not self.lazy:
                    release_pages(p.data for p in block.module.parameters())
            grad = x.grad
            del x
            trim_heap()
            self.say(2 * n + 1 - i, f"block {i + 1}/{n} backward")

"""How much each linear layer's output matters to the model's loss: per output channel, E[(dL/dy)^2].

Input statistics (``imatrix``) say which *inputs* of a layer matter for that layer's own output; they cannot
compare layers with each other: a unit of error in block 3's MLP and in block 28's value projection reach the
loss very differently. The squared gradient of the loss with respect to each output channel, averaged over
calibration tokens, supplies the missing factor. With both, the expected loss increase of a weight error
``D`` is, to second order (the diagonal Fisher information with its usual Kronecker factorization)::

    dL ~= 1/2 * sum_ij  E[g_i^2] * E[x_j^2] * D_ij^2

which is what ``gguf_calibrated.plan_types`` spends a size budget against. One backward pass over a few
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
    from .calibration import block_output
    from .walker import BlockWalk

    seq_len = min(seq_len, sequences.shape[1])
    pieces = sequences[:, : (sequences.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)[:max_sequences]
    grad_sq: dict[str, torch.Tensor] = {}
    in_sq: dict[str, torch.Tensor] = {}
    state = {"moments": True}

    def forward_hook(name):
        def record(g):
            g = g.detach().reshape(-1, g.shape[-1])
            grad_sq[name].add_((g * g).sum(0, dtype=torch.float64))

        def fn(module, args, out):
            if state["moments"]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                in_sq[name] = in_sq[name] + (x ** 2).sum(0) if name in in_sq else (x ** 2).sum(0)
            if out.requires_grad:
                grad_sq.setdefault(name, torch.zeros(out.shape[-1], dtype=torch.float64))
                out.register_hook(record)
        return fn

    def hooked(mods: dict):
        return input_hooks(m.register_forward_hook(forward_hook(n)) for n, m in mods.items())

    def check():
        if cancelled and cancelled():
            raise RunCancelled()

    def plain(t):                 # tensors made under inference mode, usable by autograd
        return t.clone() if isinstance(t, torch.Tensor) else t

    lazy = bool(getattr(model, "is_lazy", False))
    flags = [] if lazy else [(p, p.requires_grad) for p in model.parameters()]
    if not lazy:
        was_training = model.training
        model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        walk = BlockWalk(model, pieces, batch_size=len(pieces), cancelled=cancelled)
        steps = 2 * len(walk) + 1
        kws = [{k: tuple(plain(v) for v in x) if isinstance(x, tuple) else plain(x) for k, x in kw[0].items()}
               for kw in walk.kwargs]
        h = plain(walk.hidden[0])
        kept = []
        with torch.no_grad():
            for i in range(len(walk)):
                check()
                kept.append(h)
                with walk.block(i) as block, hooked(block.linears()):
                    h = block_output(block.module(h, **kws[i]))
                    if not lazy:
                        release_pages(p.data for p in block.module.parameters())
                if progress:
                    progress((i + 1) / steps, f"sensitivity: block {i + 1}/{len(walk)} forward")
        # the head and the loss over HEAD_ROWS tokens at a time (a vocabulary's logits are large); a piece's
        # last token predicts nothing (ignored by the loss: its gradient is zero)
        flat = h.reshape(-1, h.shape[-1])
        targets = torch.cat([pieces[:, 1:], torch.full_like(pieces[:, :1], -100)], 1).reshape(-1)
        grad_flat = torch.zeros_like(flat)
        head_module = walk.model.get_output_embeddings()
        with walk.holding(walk.final_norm()) as norm, walk.holding(head_module) as head, \
                hooked({"lm_head": head}):
            for a in range(0, len(flat), HEAD_ROWS):
                check()
                hi = flat[a:a + HEAD_ROWS].detach().requires_grad_(True)
                logits = head(norm(hi))
                torch.nn.functional.cross_entropy(logits.float(), targets[a:a + HEAD_ROWS], reduction="sum",
                                                  ignore_index=-100).backward()
                grad_flat[a:a + HEAD_ROWS] = hi.grad
                del hi, logits
        grad = grad_flat.reshape(h.shape)
        del flat, grad_flat
        if progress:
            progress((len(walk) + 1) / steps, "sensitivity: loss")
        state["moments"] = False
        del h
        for i in reversed(range(len(walk))):
            check()
            x = kept.pop().requires_grad_(True)
            with walk.block(i) as block, hooked(block.linears()):
                block_output(block.module(x, **kws[i])).backward(grad)
                if not lazy:
                    release_pages(p.data for p in block.module.parameters())
            grad = x.grad
            del x
            trim_heap()
            if progress:
                progress((2 * len(walk) + 1 - i) / steps, f"sensitivity: block {i + 1}/{len(walk)} backward")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if not lazy:
            model.train(was_training)
            release_pages(p.data for p in model.parameters())
    n = max(int(pieces.numel()), 1)
    return Sensitivity({k: v / n for k, v in in_sq.items()}, {k: v / n for k, v in grad_sq.items()}, n)

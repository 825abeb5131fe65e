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

from .calibration import _hooks, decoder_layers
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
    from .calibration import _block_output, capture_block_inputs

    seq_len = min(seq_len, sequences.shape[1])
    pieces = sequences[:, : (sequences.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)[:max_sequences]
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    grad_sq = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    in_sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in mods.items()}
    state = {"moments": True}

    def forward_hook(name):
        def record(g):
            g = g.detach().reshape(-1, g.shape[-1])
            grad_sq[name].add_((g * g).sum(0, dtype=torch.float64))

        def fn(module, args, out):
            if state["moments"]:
                in_sq[name].add_((args[0].detach().reshape(-1, args[0].shape[-1]).double() ** 2).sum(0))
            if out.requires_grad:
                out.register_hook(record)
        return fn

    def check():
        if cancelled and cancelled():
            raise RunCancelled()

    def plain(t):                 # tensors made under inference mode, usable by autograd
        return t.clone() if isinstance(t, torch.Tensor) else t

    layers = list(decoder_layers(model))
    inner = model.get_submodule("model")
    norm = getattr(inner, "norm", None)
    head = model.get_output_embeddings()
    steps = 2 * len(layers) + 1
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with _hooks(m.register_forward_hook(forward_hook(n)) for n, m in mods.items()):
            (h, kw), = capture_block_inputs(model, pieces, batch_size=len(pieces), cancelled=cancelled)
            h = plain(h)
            kw = {k: tuple(plain(v) for v in x) if isinstance(x, tuple) else plain(x) for k, x in kw.items()}
            kept = []
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    check()
                    kept.append(h)
                    h = _block_output(layer(h, **kw))
                    release_pages(p.data for p in layer.parameters())
                    if progress:
                        progress((i + 1) / steps, f"sensitivity: block {i + 1}/{len(layers)} forward")
            # the head and the loss over HEAD_ROWS tokens at a time (a vocabulary's logits are large); a piece's
            # last token predicts nothing (ignored by the loss: its gradient is zero)
            flat = h.reshape(-1, h.shape[-1])
            targets = torch.cat([pieces[:, 1:], torch.full_like(pieces[:, :1], -100)], 1).reshape(-1)
            grad_flat = torch.zeros_like(flat)
            for a in range(0, len(flat), HEAD_ROWS):
                check()
                hi = flat[a:a + HEAD_ROWS].detach().requires_grad_(True)
                y = norm(hi) if isinstance(norm, torch.nn.Module) else hi
                logits = head(y)
                torch.nn.functional.cross_entropy(logits.float(), targets[a:a + HEAD_ROWS], reduction="sum",
                                                  ignore_index=-100).backward()
                grad_flat[a:a + HEAD_ROWS] = hi.grad
                del hi, y, logits
            grad = grad_flat.reshape(h.shape)
            del flat, grad_flat
            if progress:
                progress((len(layers) + 1) / steps, "sensitivity: loss")
            state["moments"] = False
            del h
            for i, layer in reversed(list(enumerate(layers))):
                check()
                x = kept.pop().requires_grad_(True)
                _block_output(layer(x, **kw)).backward(grad)
                grad = x.grad
                del x
                release_pages(p.data for p in layer.parameters())
                trim_heap()
                if progress:
                    progress((2 * len(layers) + 1 - i) / steps, f"sensitivity: block {i + 1}/{len(layers)} backward")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    release_pages(p.data for p in model.parameters())
    n = max(int(pieces.numel()), 1)
    return Sensitivity({k: v / n for k, v in in_sq.items()}, {k: v / n for k, v in grad_sq.items()}, n)

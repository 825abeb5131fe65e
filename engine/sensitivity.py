"""How much each linear layer's output matters to the model's loss: per output channel, E[(dL/dy)^2].

Input statistics (``imatrix``) say which *inputs* of a layer matter for that layer's own output; they cannot
compare layers with each other: a unit of error in block 3's MLP and in block 28's value projection reach the
loss very differently. The squared gradient of the loss with respect to each output channel, averaged over
calibration tokens, supplies the missing factor. With both, the expected loss increase of a weight error
``D`` is, to second order (the diagonal Fisher information with its usual Kronecker factorization)::

    dL ~= 1/2 * sum_ij  E[g_i^2] * E[x_j^2] * D_ij^2

which is what ``gguf_calibrated.plan_types`` spends a size budget against. One backward pass over a few
calibration sequences suffices (the per-channel averages settle quickly); the loss is the model's own
next-token cross-entropy on the calibration text. The weights never get gradients, and each decoder block's
weights are released from resident memory after it runs forward and backward (``engine.memory``), so the
pass fits the same memory as the block-by-block writer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .calibration import _hooks, decoder_layers
from .errors import RunCancelled
from .memory import release_pages, trim_heap


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

    ``sequences`` [n, L] are cut into pieces of ``seq_len`` tokens (short pieces keep the activations the
    backward pass holds small); at most ``max_sequences`` pieces are used. The loss is the summed next-token
    cross-entropy of the model on them.
    """
    seq_len = min(seq_len, sequences.shape[1])
    pieces = sequences[:, : (sequences.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)[:max_sequences]
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    grad_sq = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    in_sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in mods.items()}
    tokens = 0

    def forward_hook(name):
        def record(g):
            grad_sq[name].add_((g.detach().reshape(-1, g.shape[-1]).double() ** 2).sum(0))

        def fn(module, args, out):
            in_sq[name].add_((args[0].detach().reshape(-1, args[0].shape[-1]).double() ** 2).sum(0))
            if out.requires_grad:
                out.register_hook(record)
        return fn

    def release(module, *_):
        release_pages(p.data for p in module.parameters())

    layers = list(decoder_layers(model))
    handles = [m.register_forward_hook(forward_hook(n)) for n, m in mods.items()]
    handles += [layer.register_forward_hook(release) for layer in layers]
    handles += [layer.register_full_backward_hook(release) for layer in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with _hooks(handles):
            for i, ids in enumerate(pieces):
                if cancelled and cancelled():
                    raise RunCancelled()
                ids = ids[None]
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
                loss.backward()
                tokens += ids.shape[1]
                del emb, logits, loss
                trim_heap()
                if progress:
                    progress((i + 1) / len(pieces), f"sensitivity {i + 1}/{len(pieces)}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    release_pages(p.data for p in model.parameters())
    n = max(tokens, 1)
    return Sensitivity({k: v / n for k, v in in_sq.items()}, {k: v / n for k, v in grad_sq.items()}, tokens)

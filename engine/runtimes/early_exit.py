"""A model in memory with exit heads (``steps/early_exit``): a token leaves at the first confident head."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runtime, register_runtime


@register_runtime
class EarlyExitRuntime(Runtime):
    """``Runtime`` over an ``EarlyExitModel`` at one threshold; counts where the tokens left.

    ``logits`` runs whole windows (the evaluator); ``prefill`` / ``decode_one`` run token by token on a KV
    cache with state propagation, and ``blocks_run`` lists the blocks each decoded token ran."""

    name = "torch-early-exit"
    formats = ("torch-early-exit",)
    kv_cache = "transformers DynamicCache (state propagation for skipped blocks)"

    def __init__(self, ee, threshold: float):
        self.ee, self.threshold = ee, threshold
        self.exit_counts = np.zeros(ee.n_layers + 1, dtype=np.int64)
        self.cache, self.position, self.blocks_run = None, 0, []

    @classmethod
    def open(cls, path: str | Path | None, *, n_ctx: int = 512, threads: int | None = None, model=None,
             threshold: float = 1.0) -> "EarlyExitRuntime":
        """``path``: the ``*-exit-heads.safetensors`` file; ``model``: the (transformed) model it was fitted on,
        in memory: exit heads are not an exported format."""
        from ..errors import EdgeTailorError
        from ..steps.early_exit import EarlyExitModel, load_heads

        if model is None:
            raise EdgeTailorError("An early-exit variant runs only beside the model its heads were fitted on.",
                                  "Try the variant's exported GGUF or ONNX file instead.")
        rt = cls(EarlyExitModel(model, load_heads(model, path)), threshold)
        rt.n_ctx = n_ctx
        return rt

    def logits(self, tokens):
        logits, exit_at = self.ee.forward(tokens, self.threshold)
        self.exit_counts += np.bincount(exit_at.numpy(), minlength=self.ee.n_layers + 1)
        return logits.float().numpy()

    def prefill(self, tokens):
        self.cache, self.position = self.ee.new_cache(), 0
        for tok in tokens:
            logits = self.decode_one(tok)
        self.blocks_run = []
        return logits

    def decode_one(self, token):
        logits, ran = self.ee.decode_step(int(token), self.cache, self.position, self.threshold)
        self.position += 1
        self.blocks_run.append(ran)
        return logits.float().numpy()

    def exit_shares(self) -> dict[str, float]:
        total = max(int(self.exit_counts.sum()), 1)
        return {str(layer): float(self.exit_counts[layer] / total) for layer in self.ee.heads}

    def mean_blocks(self) -> float:
        return float((np.arange(len(self.exit_counts)) * self.exit_counts).sum() / max(self.exit_counts.sum(), 1))

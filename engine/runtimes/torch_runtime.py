"""A Hugging Face model in torch: the baseline every variant is measured against."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runtime, register_runtime


@register_runtime
class TorchRuntime(Runtime):
    """A loaded ``transformers`` model; ``prefill`` / ``decode_one`` keep its ``past_key_values``."""

    name = "torch"
    formats = ("torch",)
    kv_cache = "transformers DynamicCache"

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.past = None

    @classmethod
    def open(cls, path: str | Path | None, *, n_ctx: int = 512, threads: int | None = None, model=None,
             dtype: str = "float32") -> "TorchRuntime":
        """The model in memory (``model``), else loaded from a source spec (a folder, a GGUF, a hub id)."""
        if model is None:
            from ..modeling import load_model
            from ..sources import resolve

            model = load_model(resolve(str(path)), dtype).model
        rt = cls(model, threads)
        rt.n_ctx = n_ctx
        return rt

    def logits(self, tokens):
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], dtype=torch.long)
            out = self.model(input_ids=ids, use_cache=False)
            return out.logits[0].float().numpy()

    def logits_rows(self, tokens, start, stop):
        """The output head on positions ``start`` onwards only (transformers' ``logits_to_keep``)."""
        import torch

        tokens = list(tokens)
        if not 0 <= start < stop <= len(tokens):
            return super().logits_rows(tokens, start, stop)
        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long)
            try:
                out = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(tokens) - start)
            except TypeError:          # a model class without transformers' logits_to_keep
                return super().logits_rows(tokens, start, stop)
            return out.logits[0, : stop - start].float().numpy()

    def _step(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), past_key_values=self.past,
                             use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def prefill(self, tokens):
        self.past = None
        return self._step(list(tokens))

    def decode_one(self, token):
        return self._step([int(token)])

    def stop_tokens(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

    def close(self) -> None:
        self.past = None

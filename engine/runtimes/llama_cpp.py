"""A GGUF file run by llama.cpp (llama-cpp-python), the engine users ship to; and its KV-cache types."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeTailorError
from .base import Runtime, register_runtime

LLAMA_DEFAULT_UBATCH = 512


@dataclass(frozen=True)
class KvType:
    """A KV-cache type llama.cpp offers."""
    name: str
    ggml_type: int             # llama.cpp's GGML type id (type_k / type_v)
    bytes_per_element: float
    flash_attention: bool      # llama.cpp quantizes the V cache only with flash attention


KV_TYPES = {
    "f16": KvType("f16", 1, 2.0, False),
    "q8_0": KvType("q8_0", 8, 34 / 32, True),
    "q4_0": KvType("q4_0", 2, 18 / 32, True),
}


def llama_kv_settings(kv_type: str = "f16") -> dict:
    """``Llama(...)`` keyword arguments for a KV-cache type (f16: llama.cpp's default, none)."""
    kv = KV_TYPES[kv_type]
    if kv.name == "f16":
        return {}
    return {"type_k": kv.ggml_type, "type_v": kv.ggml_type, "flash_attn": kv.flash_attention}


@register_runtime
class LlamaCppRuntime(Runtime):
    """``all_logits``: keep every position's logits (the evaluator's ``logits``); off for decoding, where
    llama.cpp then computes the head for the last position only and splits the prompt in its default
    micro-batches, as an app would run it (the benchmark, "try it")."""

    name = "llama.cpp"
    formats = ("gguf",)

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, kv_type: str = "f16",
                 all_logits: bool = True):
        from llama_cpp import Llama

        path = Path(path)
        if not path.exists():
            raise EdgeTailorError(f"The GGUF file {path} does not exist.", "Check the path.")
        ubatch = n_ctx if all_logits else min(n_ctx, LLAMA_DEFAULT_UBATCH)
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=ubatch, logits_all=all_logits,
                             n_threads=threads, n_threads_batch=threads, verbose=False, **llama_kv_settings(kv_type))
        except (ValueError, RuntimeError) as exc:
            raise EdgeTailorError(f"llama.cpp could not load {path.name}: {exc}",
                                  "The file may be truncated or of an architecture this llama.cpp lacks.") from exc
        self.n_ctx, self.all_logits = n_ctx, all_logits
        self.kv_cache = f"llama.cpp KV cache ({kv_type})"
        self.n_vocab = self.llm.n_vocab()

    def logits(self, tokens):
        tokens = list(tokens)
        if not self.all_logits:
            raise ValueError("this llama.cpp runtime was opened for decoding (all_logits=False)")
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True)

    def logits_rows(self, tokens, start, stop):
        """Only the asked positions' logits are computed (llama.cpp's batch flags which rows it outputs: its graph
        then runs the final norm and head, and the last block's feed-forward, for those rows alone) and copied
        once, where ``Llama.eval`` copies every row's twice."""
        tokens = list(tokens)
        llm = self.llm
        if not self.all_logits or len(tokens) > self.n_ctx or not 0 <= start < stop <= len(tokens):
            return super().logits_rows(tokens, start, stop)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        batch = llm._batch
        batch.set_batch(batch=tokens, n_past=0, logits_all=False)
        for i in range(len(tokens)):
            batch.batch.logits[i] = start <= i < stop
        llm._ctx.decode(batch)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(stop - start, self.n_vocab)).copy()

    def _last(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def prefill(self, tokens):
        self.llm.reset()
        self.llm.eval(list(tokens))
        return self._last()

    def decode_one(self, token):
        self.llm.eval([int(token)])
        return self._last()

    def stop_tokens(self) -> set[int]:
        return {int(self.llm.token_eos())}

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

"""Runtimes that turn token ids into next-token logits: one interface for torch, llama.cpp and ONNX.

The evaluator and the benchmark step talk only to ``Runtime``. A runtime is opened from a variant's
format; new formats register a factory with ``register_runtime``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import EdgeTailorError


class Runtime(ABC):
    name: str = "?"

    @abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for every position of one sequence, shape [len(tokens), vocab], float32 (fresh context)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()

    def logits(self, tokens):
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], dtype=torch.long)
            out = self.model(input_ids=ids, use_cache=False)
            return out.logits[0].float().numpy()


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


class LlamaCppRuntime(Runtime):
    """A GGUF file run by llama.cpp (llama-cpp-python), the engine users ship to."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, kv_type: str = "f16"):
        from llama_cpp import Llama

        path = Path(path)
        if not path.exists():
            raise EdgeTailorError(f"The GGUF file {path} does not exist.", "Check the path.")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_threads=threads, n_threads_batch=threads, verbose=False, **llama_kv_settings(kv_type))
        except (ValueError, RuntimeError) as exc:
            raise EdgeTailorError(f"llama.cpp could not load {path.name}: {exc}",
                                  "The file may be truncated or of an architecture this llama.cpp lacks.") from exc
        self.n_ctx = n_ctx

    def logits(self, tokens):
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


_FACTORIES: dict[str, Callable[..., Runtime]] = {}


def register_runtime(fmt: str, factory: Callable[..., Runtime]) -> None:
    _FACTORIES[fmt] = factory


def open_runtime(fmt: str, path: str | Path | None = None, *, model=None, n_ctx: int = 512,
                 threads: int | None = None, **settings) -> Runtime:
    """Open a runtime for a variant: ``fmt`` is the variant's format ("torch", "gguf", "onnx", ...);
    ``settings`` are the runtime's own (llama.cpp: ``kv_type``)."""
    if fmt == "torch":
        if model is None:
            from .modeling import load_model
            from .sources import resolve

            model = load_model(resolve(str(path))).model
        return TorchRuntime(model, threads)
    if fmt not in _FACTORIES:
        _load_plugins()
    if fmt not in _FACTORIES:
        raise EdgeTailorError(f"No runtime can run variants of format '{fmt}'.",
                              f"Known formats: torch, {', '.join(sorted(_FACTORIES))}.")
    return _FACTORIES[fmt](path, n_ctx=n_ctx, threads=threads, **settings)


def _load_plugins() -> None:
    # Exporters register the runtimes of their formats (ONNX lives beside its exporter); importing them all
    # makes a fresh process (a benchmark child, the GUI) know every format.
    from ..exporters import all_exporters

    all_exporters()


register_runtime("gguf", LlamaCppRuntime)

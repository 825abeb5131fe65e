"""Runtimes that turn token ids into next-token logits: one interface for torch, llama.cpp and ONNX.

The evaluator and the benchmark step talk only to ``Runtime``. A runtime is opened from a variant's
format; new formats register a factory with ``register_runtime``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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


class LlamaCppRuntime(Runtime):
    """A GGUF file run by llama.cpp (llama-cpp-python), the engine users ship to."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        from llama_cpp import Llama

        path = Path(path)
        if not path.exists():
            raise EdgeTailorError(f"The GGUF file {path} does not exist.", "Check the path.")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_threads=threads, n_threads_batch=threads, verbose=False)
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
                 threads: int | None = None) -> Runtime:
    """Open a runtime for a variant: ``fmt`` is the variant's format ("torch", "gguf", "onnx", ...)."""
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
    return _FACTORIES[fmt](path, n_ctx=n_ctx, threads=threads)


def _load_plugins() -> None:
    # Exporters register the runtimes of their formats (ONNX lives beside its exporter); importing them all
    # makes a fresh process (a benchmark child, the GUI) know every format.
    from ..exporters import all_exporters

    all_exporters()


register_runtime("gguf", lambda path, n_ctx=512, threads=None: LlamaCppRuntime(path, n_ctx, threads))

"""The one shape of a runtime, and the registry that opens one for a variant's format.

A runtime is one model loaded in one inference engine. Every runtime offers the same five verbs:

    rt = open_runtime("gguf", path, n_ctx=512, threads=2, kv_type="q8_0")     # load
    rt.logits(tokens)         # [len(tokens), vocab] float32 for one sequence from an empty cache
    rt.logits_rows(tokens, 255, 511)   # positions 255..510 only (the evaluator scores a window's second half)
    rt.prefill(tokens)        # [vocab] next-token logits after the prompt; starts the runtime's cache
    rt.decode_one(token)      # [vocab] next-token logits after one more token; extends the cache
    rt.generate(prompt, 32, stop={eos}, on_token=print)                        # greedy, on prefill + decode_one
    rt.close()                # or ``with open_runtime(...) as rt:``

A runtime without a cache of its own inherits ``prefill`` / ``decode_one`` that recompute the whole sequence
(``kv_cache`` then says "full recompute"). Runtimes register on definition with ``@register_runtime``, each
naming the variant formats it runs; the first registered for a format is its default, and ``runtime=NAME``
picks another (ONNX folders: "onnxruntime" or "onnxruntime-genai").
"""
from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import EdgeTailorError


class Runtime(ABC):
    name: str = "?"                     # the engine, as results record it
    formats: tuple[str, ...] = ()       # the variant formats it runs
    kv_cache: str = "full recompute (Runtime.logits)"
    n_ctx: int | None = None

    @classmethod
    def open(cls, path: str | Path | None, *, n_ctx: int = 512, threads: int | None = None, **settings) -> "Runtime":
        """Load a variant's file or folder; ``settings`` are the runtime's own (llama.cpp: ``kv_type``)."""
        return cls(path, n_ctx=n_ctx, threads=threads, **settings)

    @abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for every position of one sequence, shape [len(tokens), vocab], float32 (fresh context)."""

    def logits_rows(self, tokens: Sequence[int], start: int, stop: int) -> np.ndarray:
        """Logits for positions ``start`` .. ``stop - 1`` of one sequence only, shape [stop - start, vocab] (fresh
        context). A runtime that can leave the output head out of the other positions does (llama.cpp, torch): the
        evaluator scores the second half of each window, and the head is a fifth of a small model's work."""
        return self.logits(tokens)[start:stop]

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self._tokens = list(tokens)
        return self.logits(self._tokens)[-1]

    def decode_one(self, token: int) -> np.ndarray:
        self._tokens.append(int(token))
        return self.logits(self._tokens)[-1]

    def stop_tokens(self) -> set[int]:
        """Tokens that end a generation by the model's own metadata (none unless the runtime knows)."""
        return set()

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop: int | Iterable[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy decoding: the new token ids, at most ``max_new_tokens``, ending after a ``stop`` token or when
        the context is full."""
        stop = {stop} if isinstance(stop, int) else set(stop or ())
        out: list[int] = []
        logits = self.prefill(prompt)
        while len(out) < max_new_tokens:
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if on_token:
                on_token(nxt)
            full = self.n_ctx is not None and len(prompt) + len(out) > self.n_ctx
            if nxt in stop or len(out) == max_new_tokens or full:
                break
            logits = self.decode_one(nxt)
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_tokens_per_second(rt: Runtime, prompt: Sequence[int], new_tokens: int, repeats: int) -> dict:
    """Median greedy decode speed after a prefill (the prefill is not timed); what the benchmarks report."""
    speeds = []
    for _ in range(repeats):
        logits = rt.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = rt.decode_one(int(np.argmax(logits)))
        speeds.append(new_tokens / (time.perf_counter() - t0))
    return {"decode_tps": round(statistics.median(speeds), 3)}


_RUNTIMES: dict[str, type[Runtime]] = {}
_DEFAULT_FOR_FORMAT: dict[str, str] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: the runtime is known by its ``name`` and serves its ``formats``."""
    _RUNTIMES[cls.name] = cls
    for fmt in cls.formats:
        _DEFAULT_FOR_FORMAT.setdefault(fmt, cls.name)
    return cls


def runtime_names(fmt: str | None = None) -> list[str]:
    return sorted(n for n, c in _RUNTIMES.items() if fmt is None or fmt in c.formats)


def open_runtime(fmt: str, path: str | Path | None = None, *, runtime: str | None = None, n_ctx: int = 512,
                 threads: int | None = None, **settings) -> Runtime:
    """Open a variant in a runtime: ``fmt`` is its format ("torch", "gguf", "onnx", ...); ``runtime`` one of the
    runtimes of that format (default: the format's first); ``settings`` are the runtime's own."""
    name = runtime or _DEFAULT_FOR_FORMAT.get(fmt)
    cls = _RUNTIMES.get(name or "")
    if cls is None or fmt not in cls.formats:
        known = ", ".join(sorted(_DEFAULT_FOR_FORMAT))
        raise EdgeTailorError(f"No runtime{f' named {runtime!r}' if runtime else ''} can run variants of format "
                              f"'{fmt}'.", f"Known formats: {known}; runtimes: {', '.join(runtime_names())}.")
    return cls.open(path, n_ctx=n_ctx, threads=threads, **settings)

"""Generate text from a variant, the way its runtime would (the app's "try it" panel, the CLI, tests).

    gen = Generator(threads=2)
    out = gen.generate(variant, run_folder, source_spec, "Once upon a time", max_tokens=48)
    out.text, out.tokens, out.seconds

GGUF variants run in llama.cpp (``create_completion``, its KV cache and sampler, greedy); the in-memory
baseline and torch variants run ``model.generate`` from the source folder; any other format with a
registered runtime (ONNX, ...) decodes greedily through ``Runtime.logits`` with the source's tokenizer.
Opened models are kept, so a second prompt does not load them again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeTailorError


@dataclass
class Generation:
    text: str
    tokens: int
    seconds: float
    runtime: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Generator:
    def __init__(self, threads: int = 2, n_ctx: int = 512):
        self.threads = threads
        self.n_ctx = n_ctx
        self._open: dict[tuple, object] = {}

    def generate(self, variant: dict, run_folder: str | Path | None, source_spec: str, prompt: str,
                 max_tokens: int = 48) -> Generation:
        """Continue ``prompt`` with ``variant`` (a manifest variant dict: name, format, path)."""
        fmt = variant.get("format", "torch")
        path = Path(run_folder) / variant["path"] if variant.get("path") else None
        if path is not None and not path.exists():
            raise EdgeTailorError(f"The file of variant '{variant['name']}' ({path}) is gone.",
                                  "Run the recipe again, or pick another variant.")
        if fmt == "gguf":
            return self._llama_cpp(path, prompt, max_tokens)
        if fmt == "torch":
            if variant.get("steps"):
                raise EdgeTailorError(f"Variant '{variant['name']}' existed only in memory during its run.",
                                      "Try one of its exported files (GGUF or ONNX) instead.")
            return self._torch(source_spec, prompt, max_tokens)
        return self._runtime_greedy(fmt, path, source_spec, prompt, max_tokens)

    def close(self) -> None:
        for obj in self._open.values():
            if hasattr(obj, "close"):
                obj.close()
        self._open.clear()

    # --- runtimes ------------------------------------------------------------------------------
    def _llama_cpp(self, path: Path, prompt: str, max_tokens: int) -> Generation:
        key = ("gguf", str(path))
        if key not in self._open:
            from llama_cpp import Llama

            try:
                self._open[key] = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.threads,
                                        n_threads_batch=self.threads, verbose=False)
            except (ValueError, RuntimeError) as exc:
                raise EdgeTailorError(f"llama.cpp could not load {path.name}: {exc}",
                                      "The file may be truncated; export the variant again.") from exc
        llm = self._open[key]
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        seconds = time.perf_counter() - t
        return Generation(out["choices"][0]["text"], int(out["usage"]["completion_tokens"]), seconds, "llama.cpp")

    def _loaded(self, source_spec: str):
        key = ("torch", source_spec)
        if key not in self._open:
            from .modeling import load_model
            from .sources import resolve

            self._open[key] = load_model(resolve(source_spec))
        return self._open[key]

    def _torch(self, source_spec: str, prompt: str, max_tokens: int) -> Generation:
        import torch

        torch.set_num_threads(self.threads)
        loaded = self._loaded(source_spec)
        tok = loaded.tokenizer
        ids = tok(prompt, return_tensors="pt").input_ids
        t = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        seconds = time.perf_counter() - t
        new = out[0, ids.shape[1]:]
        return Generation(tok.decode(new, skip_special_tokens=True), int(new.numel()), seconds, "torch")

    def _runtime_greedy(self, fmt: str, path: Path, source_spec: str, prompt: str, max_tokens: int) -> Generation:
        import numpy as np

        from .modeling import load_tokenizer
        from .runtimes import open_runtime
        from .sources import resolve

        key = (fmt, str(path))
        if key not in self._open:
            self._open[key] = open_runtime(fmt, path, n_ctx=self.n_ctx, threads=self.threads)
        rt = self._open[key]
        tok_key = ("tokenizer", source_spec)
        if tok_key not in self._open:
            self._open[tok_key] = load_tokenizer(resolve(source_spec))
        tok = self._open[tok_key]
        ids = list(tok(prompt).input_ids)
        start = len(ids)
        t = time.perf_counter()
        if hasattr(rt, "generate"):       # runtimes with a KV cache (ONNX) decode token by token
            ids += rt.generate(ids, min(max_tokens, self.n_ctx - len(ids)), tok.eos_token_id)
        else:
            for _ in range(max_tokens):
                if len(ids) >= self.n_ctx:
                    break
                nxt = int(np.argmax(rt.logits(ids)[-1]))
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        seconds = time.perf_counter() - t
        return Generation(tok.decode(ids[start:], skip_special_tokens=True), len(ids) - start, seconds,
                          getattr(rt, "name", fmt))

"""Generate text from a variant, the way its runtime would (the app's "try it" panel, the CLI, tests).

    gen = Generator(threads=2)
    out = gen.generate(variant, run_folder, source_spec, "Once upon a time", max_tokens=48,
                       chat=True, on_text=print)        # pieces of text as they are generated
    out.text, out.tokens, out.seconds

``chat``: the prompt is a user message put through the model's chat template (llama.cpp's from the GGUF,
the tokenizer's for torch and other runtimes) when the model has one; otherwise it is continued as it is.

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
                 max_tokens: int = 48, chat: bool = False, on_text=None) -> Generation:
        """Continue ``prompt`` with ``variant`` (a manifest variant dict: name, format, path); ``on_text`` gets
        each piece of text as it is generated."""
        self.chat, self.on_text = chat, on_text or (lambda piece: None)
        fmt = variant.get("format", "torch")
        path = Path(run_folder) / variant["path"] if variant.get("path") else None
        if path is not None and not path.exists():
            raise EdgeTailorError(f"The file of variant '{variant['name']}' ({path}) is gone.",
                                  "Run the recipe again, or pick another variant.")
        if fmt == "gguf":
            return self._llama_cpp(path, source_spec, prompt, max_tokens)
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
    def _llama_cpp(self, path: Path, source_spec: str, prompt: str, max_tokens: int) -> Generation:
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
        pieces = []
        # the same prompt tokens as the baseline gets: the source's tokenizer and chat template, special tokens
        # as tokens (llama-cpp-python's own chat handler renders the template as text)
        ids = self._prompt_ids(self._tokenizer(source_spec), prompt)
        stream = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True)
        for piece in (c["choices"][0]["text"] for c in stream):
            if piece:
                pieces.append(piece)
                self.on_text(piece)
        seconds = time.perf_counter() - t
        return Generation("".join(pieces), len(pieces), seconds, "llama.cpp")

    def _loaded(self, source_spec: str):
        key = ("torch", source_spec)
        if key not in self._open:
            from .modeling import load_model
            from .sources import resolve

            self._open[key] = load_model(resolve(source_spec))
        return self._open[key]

    def _tokenizer(self, source_spec: str):
        from .modeling import load_tokenizer
        from .sources import resolve

        key = ("tokenizer", source_spec)
        if key not in self._open:
            self._open[key] = load_tokenizer(resolve(source_spec))
        return self._open[key]

    def _prompt_ids(self, tok, prompt: str) -> list[int]:
        """The prompt's token ids: through the chat template when asked and the tokenizer has one."""
        if self.chat and getattr(tok, "chat_template", None):
            out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return list(tok(prompt).input_ids)

    def _torch(self, source_spec: str, prompt: str, max_tokens: int) -> Generation:
        import torch
        from transformers.generation.streamers import TextStreamer

        torch.set_num_threads(self.threads)
        loaded = self._loaded(source_spec)
        tok = loaded.tokenizer
        ids = torch.tensor([self._prompt_ids(tok, prompt)])
        on_text = self.on_text

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if text:
                    on_text(text)

        t = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                        streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True))
        seconds = time.perf_counter() - t
        new = out[0, ids.shape[1]:]
        return Generation(tok.decode(new, skip_special_tokens=True), int(new.numel()), seconds, "torch")

    def _runtime_greedy(self, fmt: str, path: Path, source_spec: str, prompt: str, max_tokens: int) -> Generation:
        import numpy as np

        from .runtimes import open_runtime

        key = (fmt, str(path))
        if key not in self._open:
            self._open[key] = open_runtime(fmt, path, n_ctx=self.n_ctx, threads=self.threads)
        rt = self._open[key]
        tok = self._tokenizer(source_spec)
        ids = self._prompt_ids(tok, prompt)
        start = len(ids)
        t = time.perf_counter()
        if hasattr(rt, "generate"):       # runtimes with a KV cache (ONNX) decode token by token
            ids += rt.generate(ids, min(max_tokens, self.n_ctx - len(ids)), tok.eos_token_id)
            self.on_text(tok.decode(ids[start:], skip_special_tokens=True))
        else:
            shown = ""
            for _ in range(max_tokens):
                if len(ids) >= self.n_ctx:
                    break
                nxt = int(np.argmax(rt.logits(ids)[-1]))
                ids.append(nxt)
                text = tok.decode(ids[start:], skip_special_tokens=True)
                if text.startswith(shown) and len(text) > len(shown):
                    self.on_text(text[len(shown):])
                    shown = text
                if nxt == tok.eos_token_id:
                    break
        seconds = time.perf_counter() - t
        return Generation(tok.decode(ids[start:], skip_special_tokens=True), len(ids) - start, seconds,
                          getattr(rt, "name", fmt))

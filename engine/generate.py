"""Generate text from a variant, the way its runtime would (the app's "try it" panel, the CLI, tests).

    gen = Generator(threads=2)
    out = gen.generate(variant, run_folder, source_spec, "Once upon a time", max_tokens=48,
                       chat=True, on_text=print)        # pieces of text as they are generated
    out.text, out.tokens, out.seconds

``chat``: the prompt is a user message put through the source tokenizer's chat template when it has one
(the same prompt tokens for the baseline and every variant); otherwise it is continued as it is.

Every variant runs in its format's runtime (``runtimes.open_runtime``: llama.cpp for GGUF, onnxruntime for
ONNX, torch for the baseline), greedily with the runtime's KV cache (``Runtime.generate``), until the
tokenizer's end-of-sequence or the model's own stop token. The text is decoded with the source's tokenizer
and handed out piece by piece. Opened runtimes are kept, so a second prompt does not load them again.
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
        fmt = variant.get("format", "torch")
        path = Path(run_folder) / variant["path"] if variant.get("path") else None
        if path is not None and not path.exists():
            raise EdgeTailorError(f"The file of variant '{variant['name']}' ({path}) is gone.",
                                  "Run the recipe again, or pick another variant.")
        if (fmt != "torch" and path is None) or (fmt == "torch" and variant.get("steps")):
            raise EdgeTailorError(f"Variant '{variant['name']}' existed only in memory during its run.",
                                  "Try one of its exported files (GGUF or ONNX) instead.")
        rt = self._runtime(fmt, path or source_spec)
        tok = self._tokenizer(source_spec)
        ids = self._prompt_ids(tok, prompt, chat)
        text = _IncrementalText(tok, on_text or (lambda piece: None))
        t = time.perf_counter()
        new = rt.generate(ids, max(0, min(max_tokens, self.n_ctx - len(ids))),
                          stop=rt.stop_tokens() | {tok.eos_token_id}, on_token=text.add)
        seconds = time.perf_counter() - t
        return Generation(tok.decode(new, skip_special_tokens=True), len(new), seconds, rt.name)

    def close(self) -> None:
        for obj in self._open.values():
            if hasattr(obj, "close"):
                obj.close()
        self._open.clear()

    def _runtime(self, fmt: str, path):
        from .runtimes import open_runtime

        key = (fmt, str(path))
        if key not in self._open:
            settings = {"all_logits": False} if fmt == "gguf" else {}
            self._open[key] = open_runtime(fmt, path, n_ctx=self.n_ctx, threads=self.threads, **settings)
        return self._open[key]

    def _tokenizer(self, source_spec: str):
        from .modeling import load_tokenizer
        from .sources import resolve

        key = ("tokenizer", source_spec)
        if key not in self._open:
            self._open[key] = load_tokenizer(resolve(source_spec))
        return self._open[key]

    @staticmethod
    def _prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
        """The prompt's token ids: through the chat template when asked and the tokenizer has one."""
        if chat and getattr(tok, "chat_template", None):
            out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return list(tok(prompt).input_ids)


class _IncrementalText:
    """Token ids in, new text out: decodes what was generated so far and hands on what it adds."""

    def __init__(self, tok, on_text):
        self.tok, self.on_text = tok, on_text
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text

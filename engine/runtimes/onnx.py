"""An exported ONNX folder (``model.onnx`` + ``genai_config.json``) in plain onnxruntime or in onnxruntime-genai.

Graph I/O (onnxruntime-genai's names, written by ``exporters.onnx``): ``input_ids`` [batch, seq] int64,
``attention_mask`` [batch, total] int64, ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim] ->
``logits`` [batch, seq, vocab], ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim].
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import EdgeTailorError
from .base import Runtime, register_runtime

MODEL_FILE = "model.onnx"


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.exists():
        raise EdgeTailorError(f"There is no ONNX model at {model_file}.", "Export the variant again.")
    return model_file


def empty_cache(n_layers, kv_heads, head_dim, dtype) -> dict:
    z = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
    return {f"past_key_values.{i}.{k}": z for i in range(n_layers) for k in ("key", "value")}


@register_runtime
class OnnxRuntime(Runtime):
    """The folder's graph in an onnxruntime session; ``prefill`` / ``decode_one`` feed its present KV back."""

    name = "onnxruntime"
    formats = ("onnx",)
    kv_cache = "onnxruntime cache"

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        import onnxruntime as ort

        model_file = _model_file(path)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgeTailorError(f"onnxruntime could not load {model_file}: {exc}",
                                  "The folder may be incomplete; export the variant again.") from exc
        self.n_ctx = n_ctx
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        genai = model_file.parent / "genai_config.json"
        if genai.exists():      # folders of other writers (the genai builder) may leave these dims symbolic
            decoder = json.loads(genai.read_text())["model"]["decoder"]
            self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        self.kv_heads, self.head_dim = int(self.kv_heads), int(self.head_dim)
        self.float_dtype = np.float16 if "float16" in past[0].type else np.float32
        self.past: dict | None = None
        self.seen = 0

    def _run(self, ids: Sequence[int], past: dict, seen: int):
        feed = {"input_ids": np.array([list(ids)], dtype=np.int64),
                "attention_mask": np.ones((1, seen + len(ids)), dtype=np.int64), **past}
        outs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        logits = outs[names.index("logits")][0].astype(np.float32)
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")}
        return logits, present

    def _empty(self) -> dict:
        return empty_cache(self.n_layers, self.kv_heads, self.head_dim, self.float_dtype)

    def logits(self, tokens):
        return self._run(tokens, self._empty(), 0)[0]

    def prefill(self, tokens):
        logits, self.past = self._run(tokens, self._empty(), 0)
        self.seen = len(tokens)
        return logits[-1]

    def decode_one(self, token):
        if self.past is None:
            raise RuntimeError("call prefill() before decode_one()")
        logits, self.past = self._run([int(token)], self.past, self.seen)
        self.seen += 1
        return logits[-1]

    def close(self) -> None:
        self.session = None
        self.past = None


@register_runtime
class OnnxGenaiRuntime(Runtime):
    """The folder in onnxruntime-genai, as a phone or laptop app runs it (its own KV cache and sampler state)."""

    name = "onnxruntime-genai"
    formats = ("onnx",)
    kv_cache = "onnxruntime-genai cache"

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise EdgeTailorError("onnxruntime-genai is not installed.",
                                  "pip install onnxruntime-genai, or use the 'onnxruntime' runtime.") from exc
        self.og = og
        folder = _model_file(path).parent
        try:
            config = og.Config(str(folder))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except Exception as exc:
            raise EdgeTailorError(f"onnxruntime-genai could not load {folder}: {exc}",
                                  "The folder may be incomplete; export the variant again.") from exc
        self.n_ctx = n_ctx
        self.generator = None

    def _new_generator(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        return self.og.Generator(self.model, params)

    def _last(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)

    def logits(self, tokens):
        """Position by position on the cache (the genai API exposes the last position's logits only)."""
        tokens = list(tokens)
        rows = [self.prefill(tokens[:1])]
        rows += [self.decode_one(t) for t in tokens[1:]]
        return np.stack(rows)

    def prefill(self, tokens):
        self.generator = self._new_generator()
        self.generator.append_tokens(np.array(list(tokens), dtype=np.int32))
        return self._last()

    def decode_one(self, token):
        self.generator.append_tokens(np.array([int(token)], dtype=np.int32))
        return self._last()

    def close(self) -> None:
        self.generator = None
        self.model = None

"""Runtimes: one model in one inference engine, one shape for all (``base.Runtime``).

    torch              TorchRuntime        format "torch" (the source model; the baseline)
    llama.cpp          LlamaCppRuntime     format "gguf"
    onnxruntime        OnnxRuntime         format "onnx" (default)
    onnxruntime-genai  OnnxGenaiRuntime    format "onnx" (``runtime="onnxruntime-genai"``)
    torch-early-exit   EarlyExitRuntime    format "torch-early-exit" (a model in memory + its exit heads)

The evaluator, the benchmark child, the "try it" generator, verification and the bench scripts open runtimes
only through ``open_runtime`` (or these classes); nothing else constructs an inference engine.
"""
from .base import Runtime, decode_tokens_per_second, open_runtime, register_runtime, runtime_names
from .early_exit import EarlyExitRuntime
from .llama_cpp import KV_TYPES, KvType, LlamaCppRuntime, llama_kv_settings
from .onnx import OnnxGenaiRuntime, OnnxRuntime
from .torch_runtime import TorchRuntime

__all__ = ["Runtime", "open_runtime", "register_runtime", "runtime_names", "decode_tokens_per_second",
           "TorchRuntime", "LlamaCppRuntime", "OnnxRuntime", "OnnxGenaiRuntime", "EarlyExitRuntime",
           "KV_TYPES", "KvType", "llama_kv_settings"]

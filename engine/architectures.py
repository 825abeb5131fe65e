"""Which decoder architectures EdgeTailor supports, and how each maps onto GGUF.

One table, read by the pre-flight check (what the user is told), the GGUF exporter (how tensors are
named and permuted) and the techniques (which need the Llama-style module layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    model_type: str            # Hugging Face config.model_type
    gguf_arch: str             # llama.cpp's general.architecture
    permute_qk: bool           # HF rotate-half rope -> llama.cpp interleaved rope for this arch
    qk_norm: bool = False      # per-head RMSNorm on q and k (qwen3)
    qkv_bias: bool = False     # biases on q/k/v projections (qwen2)
    notes: str = ""
    exporters: tuple[str, ...] = ("gguf", "onnx")
    extra: dict = field(default_factory=dict)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", permute_qk=True),
    "mistral": ArchSpec("mistral", "llama", permute_qk=True, notes="written as GGUF arch 'llama'"),
    "qwen2": ArchSpec("qwen2", "qwen2", permute_qk=False, qkv_bias=True),
    "qwen3": ArchSpec("qwen3", "qwen3", permute_qk=False, qk_norm=True),
}


def arch_spec(model_type: str) -> ArchSpec | None:
    return ARCHITECTURES.get(model_type)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def count_parameters(cfg: dict) -> dict:
    """Parameter count of a Llama-family config, without loading weights.

    Returns total, embedding (input embeddings + untied output head) and non-embedding counts.
    """
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    attn = h * heads * hd * 2 + h * kv * hd * 2
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += heads * hd + 2 * kv * hd
    if cfg.get("model_type") == "qwen3":
        attn += 2 * hd
    per_layer = attn + 3 * h * inter + 2 * h
    embedding = vocab * h * (1 if tied else 2)
    non_embedding = layers * per_layer + h
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}

"""Tiny random-initialised models of every supported family, built from their transformers configs.

Config values make each family's own features matter on a 64-token test window: sliding windows shorter than
the window, soft-capping that bites, query pre-attention scaling that differs from head_dim, biases that are
not zero, partial rotary, NoPE layers, local/global layers, experts with top-k routing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

# model_type -> (tokenizer: "sp" stories260K's SentencePiece | "bpe" the demo's BPE, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama_bias": ("sp", dict(model_type="llama", head_dim=16, attention_bias=True, mlp_bias=True)),
    "gemma": ("sp", dict(model_type="gemma", head_dim=16, num_key_value_heads=1, tie_word_embeddings=True)),
    "gemma2": ("sp", dict(model_type="gemma2", head_dim=16, sliding_window=16, attn_logit_softcapping=5.0,
                          final_logit_softcapping=3.0, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    "gemma3_text": ("sp", dict(model_type="gemma3_text", head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                               tie_word_embeddings=True, num_hidden_layers=6,     # Gemma 3's 5 local : 1 global
                               layer_types=["sliding_attention"] * 5 + ["full_attention"],
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # onnxruntime's attention needs the rotary half-width a multiple of 8 (Phi-4-mini: 128 x 0.75 / 2 = 48)
    "phi3": ("bpe", dict(model_type="phi3", hidden_size=128, partial_rotary_factor=0.5, pad_token_id=0,
                         original_max_position_embeddings=512,
                         tokenizer_class="GPT2Tokenizer")),     # Phi-4-mini: BPE tokenizer, partial rotary
    # Phi-4-mini's long-rope scaling (factors per rotary pair, an attention factor): tensors and keys in the GGUF
    "phi3_longrope": ("bpe", dict(model_type="phi3", hidden_size=128, partial_rotary_factor=0.5, pad_token_id=0,
                                  original_max_position_embeddings=256, max_position_embeddings=1024,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                   "original_max_position_embeddings": 256,
                                                   "long_factor": [1.0 + 0.5 * i for i in range(8)],
                                                   "short_factor": [1.0 + 0.05 * i for i in range(8)]},
                                  tokenizer_class="GPT2Tokenizer")),
    "granite": ("bpe", dict(model_type="granite", embedding_multiplier=6.0, residual_multiplier=0.3,
                            attention_multiplier=0.2, logits_scaling=2.0)),
    "olmo2": ("bpe", dict(model_type="olmo2")),
    "smollm3": ("bpe", dict(model_type="smollm3", no_rope_layers=[1, 1, 1, 0], pad_token_id=None)),
    "starcoder2": ("bpe", dict(model_type="starcoder2", sliding_window=None, use_bias=True, norm_epsilon=1e-5)),
    "stablelm": ("bpe", dict(model_type="stablelm", partial_rotary_factor=0.25, use_qkv_bias=True)),
    "qwen3_moe": ("bpe", dict(model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True)),
    # llama.cpp scales queries by 1/sqrt(head_dim) for Gemma 2 unless the model is the 27B: a scalar that
    # differs from head_dim in another size is a file that loads and is wrong (the verification must stop it).
    "gemma2_odd_scale": ("sp", dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=24,
                                    tie_word_embeddings=True)),
    "mixtral": ("sp", dict(model_type="mixtral", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=None)),
}


def make_family_model(folder: Path, family: str, sp_dir: Path, bpe_dir: Path, seed: int = 0) -> Path:
    """Write the family's tiny model (safetensors, fp32) with its tokenizer files into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, overrides = FAMILIES[family]
    tok_dir = sp_dir if kind == "sp" else bpe_dir
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    params = {**BASE, **overrides}
    model_type = params.pop("model_type")
    tokenizer_class = params.pop("tokenizer_class", "GemmaTokenizer" if model_type.startswith("gemma") else None)
    params.setdefault("tie_word_embeddings", False)
    cfg = AutoConfig.for_model(model_type, vocab_size=tok_cfg["vocab_size"],
                               bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"),
                               **params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.1)          # biases that are not zero
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "edgetailor.json"):
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, folder / f)
    if kind == "sp":
        # Real checkpoints ship tokenizer.json; transformers 5 reads a bare tokenizer.model under some model types
        # (mixtral) with a generic backend that splits whitespace differently from the declared class.
        import transformers

        cls = getattr(transformers, tokenizer_class or "LlamaTokenizer")
        cls.from_pretrained(str(tok_dir)).save_pretrained(str(folder))
    if tokenizer_class:
        # Gemma's SentencePiece tokenizer adds no dummy prefix (so does the borrowed one under Gemma's class);
        # the converter reads Phi-4-mini's BPE vocabulary when the class says GPT2Tokenizer.
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        tok_config["tokenizer_class"] = tokenizer_class
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder

"""Shared fixtures: a private data folder, the real stories260K model, tiny random Llama-family models,
and the bundled demo model (converted once per test session)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads sleep instead of spinning while they wait: on a busy 2-core machine spinning torch threads
# make small-model training steps ~20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def edgetailor_home(tmp_path_factory):
    """Every test session gets its own data folder (EDGETAILOR_TEST_HOME keeps one between sessions)."""
    home = Path(os.environ.get("EDGETAILOR_TEST_HOME") or tmp_path_factory.mktemp("edgetailor-home"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["EDGETAILOR_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not present")
    return STORIES


@pytest.fixture(scope="session")
def demo_source(edgetailor_home):
    from edgetailor.engine import resolve

    return resolve("demo")


TINY_SHAPES = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def make_tiny_model(folder: Path, model_type: str, tokenizer_dir: Path, seed: int = 0, tie: bool = False,
                    **shape) -> Path:
    """A random-initialised model of ``model_type`` with the tokenizer files of ``tokenizer_dir`` (``shape``
    overrides ``TINY_SHAPES``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    vocab = tok_cfg["vocab_size"]
    extra = {"head_dim": 16}
    if model_type == "qwen2":
        extra = {}
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, tie_word_embeddings=tie,
                               bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"),
                               **{**TINY_SHAPES, **extra, **shape})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
            else:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "edgetailor.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, stories_dir, demo_source):
    """llama and mistral with the SentencePiece tokenizer; qwen2 and qwen3 with the demo's BPE tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model(root / "llama", "llama", stories_dir),
        "mistral": make_tiny_model(root / "mistral", "mistral", stories_dir, seed=1),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", demo_source.path, seed=2, tie=True),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", demo_source.path, seed=3),
    }


def tiny_recipe(types=("F16", "Q4_K_M"), windows=2) -> dict:
    return {"name": "test", "steps": [{"step": "export", "params": {"format": "gguf", "types": list(types)}},
                                      {"step": "evaluate", "params": {"windows": windows, "ctx": 128}}]}


FOLDER_NAME = {"phi3": "phi4-mini", "phi3_longrope": "phi4-mini-longrope"}   # llama.cpp expects Phi-3's own special tokens in a model named "phi3"
# Seed 0's tiny Mixtral has two router logits 6e-5 apart at layer 0 on the check windows: any change of
# arithmetic (even F32 in llama.cpp) flips that expert, which is routing, not the file; another draw has no tie.
SEED = {"mixtral": 1}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, stories_dir, demo_source):
    """A function that makes (once per session) the tiny random model of a family in tests/family_models.py."""
    from family_models import make_family_model

    root = tmp_path_factory.mktemp("families")

    def make(family: str) -> Path:
        folder = root / FOLDER_NAME.get(family, family)
        if not folder.exists():
            make_family_model(folder, family, stories_dir, demo_source.path, seed=SEED.get(family, 0))
        return folder
    return make



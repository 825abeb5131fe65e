"""Loading a resolved source into torch, safely.

Safetensors are preferred. Pickled ``*.bin`` checkpoints are read only through
``torch.load(weights_only=True)``, which refuses anything but tensors. Remote code stays off unless the
user turned it on for this source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeTailorError
from .sources import ResolvedSource


@dataclass
class LoadedModel:
    model: object       # transformers PreTrainedModel, eval mode
    tokenizer: object   # transformers tokenizer
    source: ResolvedSource


def load_tokenizer(src: ResolvedSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=src.trust_remote_code)
    except Exception as exc:
        raise EdgeTailorError(f"Could not load the tokenizer of {src.path}: {type(exc).__name__}: {exc}",
                              "The folder needs tokenizer.json or tokenizer.model with tokenizer_config.json.") from exc


def load_model(src: ResolvedSource, dtype: str = "float32") -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    folder = Path(src.path)
    has_safetensors = any(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    try:
        if has_safetensors or not bins:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, trust_remote_code=src.trust_remote_code, use_safetensors=True)
        else:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=src.trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                     trust_remote_code=src.trust_remote_code)
            state = {}
            for b in bins:
                state.update(load_pickled_weights(b))
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("lm_head.weight")]
            if missing:
                raise EdgeTailorError(f"{folder} lacks weights for {missing[:3]}...", "The checkpoint is incomplete.")
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
    except EdgeTailorError:
        raise
    except Exception as exc:
        raise EdgeTailorError(f"Could not load the model in {folder}: {type(exc).__name__}: {exc}",
                              "Check that the folder is a complete causal language model.") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(src), source=src)


def load_pickled_weights(path: Path) -> dict:
    """Read a pickled checkpoint, refusing anything but plain tensors (no code runs)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EdgeTailorError(
            f"{path.name} holds Python objects besides tensors; EdgeTailor loads pickled checkpoints only with "
            "weights_only=True, so that a checkpoint cannot run code on your machine.",
            "Convert it to safetensors with a tool you trust, or download the model's .safetensors files.") from exc

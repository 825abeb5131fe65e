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


#: GGUF tensors that get importance-weighted blocks without GPTQ's error feedback. The projections into
#: attention (q, k, v) come out *worse* end to end with it, although their own output error halves, on
#: held-out text too (smollm2-dithered, wikitext-2, 20 windows: Q2_K mix +20.5% perplexity with weighted q/k/v
#: blocks vs +33.8% with GPTQ ones, the rest of the file llama.cpp's; whole files of ours with this rule and
#: the damping below: Q4_K_M +3.90% -> +3.38%, Q5_K_M +2.13% -> +1.36%). A layer-output objective does not
#: see what a small key/query error does to the softmax (the first token's attention sink above all: leaving
#: it out of the Hessian makes GPTQ worse still).
WEIGHTED_ONLY = (".attn_q.", ".attn_k.", ".attn_v.", ".attn_qkv.")
#: GPTQ's dampening, a fraction of the Hessian's mean diagonal: 0.1 generalizes from the ~10k tokens of
#: calibration text to other text better than the customary 0.01 (lower held-out output error and KL).
GPTQ_DAMP = 0.1


def quantize_tensors(sources: dict, types: dict[str, str], stats, method: str = "gptq",
                     progress: Callable[[float, str], None] | None = None,
                     cancelled: Callable[[], bool] | None = None) -> dict:
    """{gguf name: (bytes, GGMLQuantizationType)} for every tensor with a type EdgeTailor writes.

    ``gptq``: error feedback through the input Hessian, except for ``WEIGHTED_ONLY`` tensors and the output
    head; those (and every tensor under ``imatrix``) get the importance-weighted search alone.
    """
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
            if (method == "gptq" and not module.endswith("lm_head")
                    and not any(part in names[0] for part in WEIGHTED_ONLY)):
                h = stats.hessian(module)
                hess = None if h is None else h.numpy()
        W = np.concatenate([sources[n][1] for n in names], 0)
        data, _ = gguf_blocks.quantize_matrix(t, W, imp, hess, damp=GPTQ_DAMP)
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # many small tensor ops: one thread is several times faster than two
    try:
        encoded = quantize_tensors(sources, types, use, method,
                                   progress=(lambda f, m: progress(0.1 + 0.8 * f, m)) if progress else None,
                                   cancelled=cancelled)
    finally:
        torch.set_num_threads(threads)
    for n, (module, data) in sources.items():
        if n not in encoded:          # F16/F32 by llama.cpp's choice (rows too short for any block)
            encoded[n] = (data.astype(np.float16 if types.get(n) == "F16" else np.float32), None)
    info = write_gguf(model, tokenizer, tokenizer_dir, out, qtype, tensor_types=encoded,
                      cancelled=cancelled)
    info.update(type=qtype, quantized_by=f"EdgeTailor {method}",
                tensor_types={n: types.get(n) for n in sources})
    return info



# --- mixed precision to a size target ---------------------------------------------------------------
CANDIDATES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def metadata_bytes(model, tokenizer, tokenizer_dir, workdir: Path) -> int:
    """Bytes of everything in the file but the 2-D tensors' data: header, vocabulary, tensor infos, norms."""
    import gguf

    from .gguf import _add_hparams, _add_vocab

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    probe = Path(workdir) / "metadata.gguf"
    w = gguf.GGUFWriter(str(probe), spec.gguf_arch)
    _add_hparams(w, cfg, spec, int(cfg.num_hidden_layers))
    _add_vocab(w, tokenizer, tokenizer_dir, int(cfg.vocab_size))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    size = probe.stat().st_size
    probe.unlink()
    n_tensors = sum(1 for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq"))
    ones = sum(p.numel() * 4 for p in model.state_dict().values() if p.ndim == 1)
    return size + 96 * n_tensors + ones + 64            # name/dims/type/offset and alignment per tensor


def type_bytes(t: str, shape) -> int:
    bt = gguf_blocks.TYPES[t]
    return shape[0] * shape[1] // bt.block * bt.bytes


def plan_types(sources: dict, stats, budget: int, max_rows: int = 2048,
               progress: Callable[[float, str], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> dict[str, str]:
    """Each tensor's type so that the tensors fit ``budget`` bytes with the least importance-weighted error.

    Sensitivity of a tensor under a type: sum over inputs j of E[x_j^2] * (W - Q(W))_ij^2 (the expected
    squared error the layer's output gets), measured on up to ``max_rows`` rows. A greedy pass then buys,
    at every step, the upgrade with the largest error drop per byte until the budget is spent.
    """
    options: dict[str, list[tuple[str, int, float]]] = {}
    every: dict[str, list[tuple[str, int, float]]] = {}
    names = list(sources)
    for k, name in enumerate(names):
        if cancelled and cancelled():
            raise RunCancelled()
        module, W = sources[name]
        imp = stats.second_moment(module).numpy() if (stats is not None and module in stats.sum_sq) else np.ones(W.shape[1])
        rows = np.linspace(0, W.shape[0] - 1, min(max_rows, W.shape[0])).astype(int)
        sub = W[rows]
        opts = []
        for t in CANDIDATES:
            if W.shape[1] % gguf_blocks.TYPES[t].block:
                continue
            _, deq = gguf_blocks.quantize_matrix(t, sub, imp)
            err = float((((deq - sub) ** 2) * imp[None, :]).sum()) * W.shape[0] / len(rows)
            opts.append((t, type_bytes(t, W.shape), err))
        opts.sort(key=lambda o: o[1])
        # keep the lower convex hull of (bytes, error): the types worth buying in order
        hull = []
        for o in opts:
            if hull and o[2] >= hull[-1][2]:
                continue
            while len(hull) >= 2 and ((hull[-1][2] - o[2]) * (hull[-1][1] - hull[-2][1])
                                      >= (hull[-2][2] - hull[-1][2]) * (o[1] - hull[-1][1])):
                hull.pop()
            hull.append(o)
        options[name] = hull
        every[name] = opts
        if progress:
            progress((k + 1) / len(names), f"sensitivity of {name}")
    level = {n: 0 for n in names}
    total = sum(options[n][0][1] for n in names)
    if total > budget:
        raise EdgeTailorError(f"The target is too small: even the smallest types need {total / 1e6:.1f} MB of tensors.",
                              "Give a larger size or more bits per weight.")
    largest = sum(max(o[1] for o in every[n]) for n in names)
    if budget > 1.02 * largest:
        raise EdgeTailorError(f"The target is larger than the largest file of these types ({largest / 1e6:.1f} MB of tensors).",
                              "Give a smaller size, or export F16/BF16 with the plain export step.")
    while True:
        best, best_gain = None, 0.0
        for n in names:
            i = level[n]
            if i + 1 < len(options[n]):
                cur, nxt = options[n][i], options[n][i + 1]
                extra = nxt[1] - cur[1]
                if total + extra <= budget:
                    gain = (cur[2] - nxt[2]) / extra
                    if gain > best_gain:
                        best, best_gain = n, gain
        if best is None:
            break
        i = level[best]
        total += options[best][i + 1][1] - options[best][i][1]
        level[best] = i + 1
    chosen = {n: options[n][level[n]] for n in names}
    while True:          # fill what is left with upgrades off the hull that still fit
        best, best_gain = None, 0.0
        for n in names:
            cur = chosen[n]
            for o in every[n]:
                extra = o[1] - cur[1]
                if 0 < extra and total + extra <= budget and o[2] < cur[2] and (cur[2] - o[2]) / extra > best_gain:
                    best, best_gain = (n, o), (cur[2] - o[2]) / extra
        if best is None:
            break
        n, o = best
        total += o[1] - chosen[n][1]
        chosen[n] = o
    return {n: o[0] for n, o in chosen.items()}


def export_to_target(model, tokenizer, tokenizer_dir, out: Path, stats, target_bytes: int, method: str = "gptq",
                     progress=None, cancelled=None) -> dict:
    """A GGUF of about ``target_bytes`` (within 2%), each tensor's type chosen by its measured sensitivity."""
    out = Path(out)
    overhead = metadata_bytes(model, tokenizer, tokenizer_dir, out.parent)
    sources = tensor_sources(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        types = plan_types(sources, stats, target_bytes - overhead,
                           progress=(lambda f, m: progress(0.4 * f, m)) if progress else None, cancelled=cancelled)
    finally:
        torch.set_num_threads(threads)
    info = export_calibrated(model, tokenizer, tokenizer_dir, out, "Q4_K_M", stats, method, types=types,
                             progress=(lambda f, m: progress(0.4 + 0.6 * f, m)) if progress else None,
                             cancelled=cancelled)
    info["type"] = "mixed"
    info["target_bytes"] = int(target_bytes)
    return info

"""GGUF export for llama.cpp, Ollama and LM Studio.

The project's own converter on the ``gguf`` package: GGUFWriter for the file, its tensor-name map for
llama.cpp's names, and its vocab helpers for the tokenizer. F32, F16, BF16 and Q8_0 are written directly;
every other type llama.cpp offers (k-quants, IQ types, ...) is produced from an F16/F32 intermediate by
llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``). Each file is loaded back in llama.cpp
before it is called done.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from ..engine.architectures import (
    ModelDims,
    arch_spec,
    expert_count,
    gguf_layout_problem,
    gguf_tensor_names,
    gguf_writer_for,
    supported_model_types,
)
from ..engine.errors import EdgeTailorError, RunCancelled
from . import register_exporter
from .base import Exporter, ExportResult

DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0")
# llama.cpp refuses these without an importance matrix, which llama_model_quantize cannot take from Python.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S")
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


def quant_types() -> list[str]:
    """Every file type this llama.cpp build can write (direct or through its quantizer)."""
    import gguf

    names = [t.name.replace("MOSTLY_", "").replace("ALL_", "") for t in gguf.LlamaFileType if t.name != "GUESSED"]
    try:
        import llama_cpp

        have = {n.replace("LLAMA_FTYPE_MOSTLY_", "") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
        names = [n for n in names if n in DIRECT_TYPES or n in have]
    except ImportError:
        names = list(DIRECT_TYPES)
    return [n for n in names if n not in ("MXFP4_MOE",)]


def _ftype(name: str):
    import gguf

    key = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
    try:
        return gguf.LlamaFileType[key]
    except KeyError:
        raise EdgeTailorError(f"'{name}' is not a GGUF file type.",
                              f"Use one of: {', '.join(quant_types())}.") from None


class GGUFExporter(Exporter):
    format = "gguf"
    suffix = ".gguf"
    runtimes = ("llama.cpp", "Ollama", "LM Studio")

    def check_options(self, options: dict) -> None:
        qtype = str(options.get("type", "F16")).upper()
        _ftype(qtype)
        if qtype not in quant_types():
            raise EdgeTailorError(f"This llama.cpp build cannot write '{qtype}'.", f"Use one of: {', '.join(quant_types())}.")
        if qtype in NEEDS_IMATRIX:
            raise EdgeTailorError(
                f"llama.cpp writes {qtype} only with an importance matrix.",
                "Use a calibrated step (quant.gguf_calibrated) or a type like Q2_K, IQ3_S, IQ4_XS that needs none.")

    def export(self, model, tokenizer, tokenizer_dir, out, options, progress=None, cancelled=None):
        """``options``: ``type``; ``threads``; ``source_dir`` (the untouched source, read lazily by llama.cpp's
        converter); ``calibration`` (``gguf_calibrated.Calibration``: EdgeTailor's calibrated blocks instead of
        llama.cpp's quantizer)."""
        qtype = str(options.get("type", "F16")).upper()
        out = Path(out)
        if options.get("calibration") is not None:
            from .gguf_calibrated import export_with_calibration

            info = export_with_calibration(model, tokenizer, tokenizer_dir, out, qtype, options["calibration"],
                                           progress=progress, cancelled=cancelled)
        else:
            self.check_options(options)
            info = self._export_plain(model, tokenizer, tokenizer_dir, out, qtype, options, progress, cancelled)
        info["bytes"] = out.stat().st_size
        return ExportResult(path=out, files=[out], info=info)

    @staticmethod
    def _export_plain(model, tokenizer, tokenizer_dir, out: Path, qtype: str, options: dict, progress, cancelled):
        threads = options.get("threads")
        writer = gguf_writer_for(model.config)
        if not writer:
            raise unsupported_error(model.config.model_type)
        if writer == "llama.cpp":
            return export_converted(model, tokenizer_dir, out, qtype, source_dir=options.get("source_dir"),
                                    threads=threads, progress=progress, cancelled=cancelled)
        if qtype in DIRECT_TYPES:
            return write_gguf(model, tokenizer, tokenizer_dir, out, qtype, progress=progress, cancelled=cancelled)
        # llama.cpp's types and encoder, each tensor encoded as it is written: no intermediate file
        from .ggml_quant import write_llama_cpp_mix

        return write_llama_cpp_mix(model, tokenizer, tokenizer_dir, out, qtype, threads=threads, progress=progress,
                                   cancelled=cancelled)

    def verify(self, path):
        return verify_gguf(path)


register_exporter(GGUFExporter())


def export_converted(model, tokenizer_dir, out: Path, qtype: str, source_dir=None, threads=None,
                     progress=None, cancelled=None) -> dict:
    """A GGUF file of a family EdgeTailor's writer does not cover, written by llama.cpp's converter.

    ``source_dir``: the untouched source folder (the converter reads its safetensors lazily); otherwise the
    current model is saved to a scratch folder first. Types the converter does not write come from an
    F32 (small models) or F16 intermediate through llama.cpp's quantizer, as for the own writer.
    """
    from .hf_converter import OUTTYPES, convert
    from .hf_folder import model_folder

    with tempfile.TemporaryDirectory(prefix="edgetailor-gguf-", dir=out.parent) as tmp:
        folder = model_folder(model, tokenizer_dir, source_dir, Path(tmp))
        sub = (lambda f, m: progress(0.5 * f, m)) if progress else None
        if qtype in OUTTYPES:
            info = convert(folder, out, qtype, progress=progress, cancelled=cancelled)
        else:
            mid_type = intermediate_type(model)
            mid = Path(tmp) / f"intermediate-{mid_type}.gguf"
            info = convert(folder, mid, mid_type, progress=sub, cancelled=cancelled)
            if progress:
                progress(0.55, f"llama.cpp quantizes to {qtype}")
            info.update(llama_quantize(mid, out, qtype, threads=threads))
            info["quantized_by"] = "llama.cpp llama_model_quantize"
    info.update(type=qtype, arch=model.config.model_type)
    return info


def unsupported_error(model_type: str) -> EdgeTailorError:
    from ..engine.errors import UnsupportedModelError

    return UnsupportedModelError(
        f"Not supported yet: '{model_type}' models. Supported: {', '.join(supported_model_types())}.",
        "Pick a model of a supported family; ask for this one in an issue, naming the model.")


def intermediate_type(model) -> str:
    """The file llama.cpp's quantizer reads: BF16 for a source stored in bf16 (lossless, half of F32), F32 for
    small models, F16 above 2B parameters (as llama.cpp's own pipeline does)."""
    if getattr(model, "is_lazy", False):
        dtypes = {t.dtype for t in model.state_dict().values() if t.ndim == 2}
        if dtypes == {"BF16"}:
            return "BF16"
    return "F32" if _param_count(model) < 2_000_000_000 else "F16"


def _param_count(model) -> int:
    if getattr(model, "is_lazy", False):
        return model.parameter_count()
    return sum(p.numel() for p in model.parameters())


# --- metadata ---------------------------------------------------------------------------------------
def add_hparams(w, cfg, spec, n_layers: int) -> None:
    d = ModelDims.of(cfg)
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(int(n_layers))
    w.add_feed_forward_length(d.intermediate)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    _add_norm_eps(w, cfg)
    w.add_vocab_size(d.vocab)
    rotary = _rope_params(cfg).get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None) or 1.0
    w.add_rope_dimension_count(int(rotary * d.hidden) // d.heads if rotary < 1 else d.head_dim)
    if d.head_dim != d.hidden // d.heads:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    rope = _rope_params(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type") or rope.get("type")
    import gguf

    if rope_type == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in (None, "default", "llama3") and not (spec.gguf_arch == "phi3" and rope_type in ("longrope", "su")):
        raise EdgeTailorError(f"RoPE scaling '{rope_type}' is not supported by the GGUF exporter.",
                              "Export to ONNX instead, or use a model without this RoPE scaling.")
    for key, method in spec.gguf_scalars:
        if getattr(cfg, key, None):
            getattr(w, method)(float(getattr(cfg, key)))
    if spec.gguf_layer_types:
        _add_layer_types(w, cfg)
    if spec.gguf_arch == "phi3":
        _add_phi3(w, cfg)
    if spec.moe:
        _add_experts(w, cfg)


def _add_experts(w, cfg) -> None:
    """A mixture of experts' keys as llama.cpp's converter writes them: experts, experts per token, and (Qwen3-MoE)
    an expert's width where it differs from the dense ``intermediate_size``."""
    w.add_expert_count(expert_count(cfg))
    w.add_expert_used_count(int(cfg.num_experts_per_tok))
    if getattr(cfg, "moe_intermediate_size", None) is not None:
        w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))


def _add_norm_eps(w, cfg) -> None:
    """The norms' epsilon under the key llama.cpp reads for them: RMSNorm's, or LayerNorm's (StarCoder2, StableLM)."""
    layer_norm = next((getattr(cfg, k) for k in ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
                       if getattr(cfg, k, None) is not None), None)
    if layer_norm is not None:
        w.add_layer_norm_eps(float(layer_norm))
    if getattr(cfg, "rms_norm_eps", None) is not None or layer_norm is None:
        w.add_layer_norm_rms_eps(ModelDims.of(cfg).rms_eps)
    if getattr(cfg, "use_parallel_residual", None) is not None:
        w.add_parallel_residual(bool(cfg.use_parallel_residual))


def _add_phi3(w, cfg) -> None:
    """Phi-3's keys as llama.cpp's converter writes them: the trained context, the window (0: none), and for
    long-rope models the attention factor (its factors are tensors, ``_phi3_rope_factors``)."""
    rope = _rope_params(cfg)
    original = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    w.add_rope_scaling_orig_ctx_len(int(original))
    w.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
    if rope.get("long_factor"):
        scale = ModelDims.of(cfg).context / original
        if (rope.get("rope_type") or rope.get("type")) not in ("longrope", "su"):
            raise EdgeTailorError(f"Phi-3 RoPE scaling '{rope.get('rope_type')}' is not supported by the GGUF exporter.",
                                  "Export to ONNX instead.")
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _phi3_rope_factors(cfg) -> list[tuple[str, np.ndarray]]:
    rope = _rope_params(cfg)
    if not rope.get("long_factor"):
        return []
    return [("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))]


def _add_layer_types(w, cfg) -> None:
    """Local (sliding-window) and global blocks as llama.cpp reads them: the window, each block's kind (an explicit
    pattern, so a model with blocks removed keeps its own), the local blocks' rope base."""
    types = list(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    if not window or "sliding_attention" not in types:
        return
    w.add_sliding_window(int(window))
    w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_theta"):
        w.add_rope_freq_base_swa(float(local["rope_theta"]))


def _rope_params(cfg) -> dict:
    """The rope of the model's (global) attention: per block kind (Gemma 3), the full-attention blocks'."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rp = dict(rp.get("full_attention", rp))
    if "rope_theta" not in rp and getattr(cfg, "rope_theta", None) is not None:
        rp["rope_theta"] = cfg.rope_theta
    return rp


def _llama3_rope_factors(cfg) -> np.ndarray | None:
    rope = _rope_params(cfg)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = ModelDims.of(cfg).head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --- tokenizer --------------------------------------------------------------------------------------
def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _bpe_pre_name(tokenizer, tokenizer_dir: Path) -> str:
    override = Path(tokenizer_dir) / "edgetailor.json"
    if override.exists():
        pre = json.loads(override.read_text()).get("gguf_tokenizer_pre")
        if pre:
            return pre
    from ..engine.paths import asset_path

    table = json.loads(asset_path("gguf_pretokenizers.json").read_text())["hashes"]
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in table:
        raise EdgeTailorError(
            "llama.cpp does not know this tokenizer's pre-tokenizer (its check hash is not in llama.cpp's table), "
            "so the GGUF would tokenize differently from the original.",
            "Export to ONNX, or add {\"gguf_tokenizer_pre\": NAME} to edgetailor.json in the model folder "
            "if you know llama.cpp's name for it.")
    return table[chkhsh]


def add_vocab(w, tokenizer, tokenizer_dir: Path, vocab_size: int) -> str:
    import gguf

    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.model").exists():
        vocab = gguf.SentencePieceVocab(tokenizer_dir)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        for tid, tok in added.items():
            if tid < len(tokens):
                tokens[tid] = tok.content.encode("utf-8")
                types[tid] = gguf.TokenType.CONTROL if (tok.special or _looks_special(tok.content)) else gguf.TokenType.USER_DEFINED
        while len(tokens) < vocab_size:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_dir, n_vocab=len(tokens))
        kind = "sentencepiece"
    elif (tokenizer_dir / "tokenizer.json").exists():
        reverse = {i: t for t, i in tokenizer.get_vocab().items()}
        added_vocab = tokenizer.get_added_vocab()
        decoder = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            tok = reverse[i]
            if tok in added_vocab:
                if not decoder[i].normalized:
                    tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
                if decoder[i].special or _looks_special(tok):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    tok = tok.replace("\u2581", " ")
                    types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_bpe_pre_name(tokenizer, tokenizer_dir))
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True)
        kind = "bpe"
    else:
        raise EdgeTailorError(f"{tokenizer_dir} has neither tokenizer.model nor tokenizer.json.",
                              "The GGUF needs the model's tokenizer files beside its config.json.")
    special.add_to_gguf(w, quiet=True)
    return kind


# --- tensors ----------------------------------------------------------------------------------------
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows to llama.cpp's interleaved RoPE order (as convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_for_type(name: str, data: np.ndarray, qtype: str):
    """(array, raw ggml type or None) for one tensor under the file type, as convert_hf_to_gguf chooses."""
    import gguf

    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "rope_freqs.weight" or qtype == "F32":
        return data.astype(np.float32), None
    if qtype == "F16":
        return data.astype(np.float16), None
    if qtype == "BF16":
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if qtype == "Q8_0":
        if data.shape[-1] % 32:
            return data.astype(np.float16), None           # rows that do not split into blocks stay F16
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    raise AssertionError(qtype)


def _layout_for_type(name: str, shape: tuple, qtype: str) -> tuple[tuple, np.dtype, object]:
    """(numpy shape, dtype, raw ggml type or None) that ``_tensor_for_type`` will give, without the data."""
    import gguf

    shape = tuple(int(n) for n in shape)
    if len(shape) <= 1 or name.endswith("_norm.weight") or name == "rope_freqs.weight" or qtype == "F32":
        return shape, np.dtype(np.float32), None
    if qtype == "F16" or (qtype == "Q8_0" and shape[-1] % 32):
        return shape, np.dtype(np.float16), None
    raw = gguf.GGMLQuantizationType[qtype]
    return tuple(gguf.quant_shape_to_byte_shape(shape, raw)), np.dtype(np.uint8), raw


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's data as ``write_gguf`` writes it, produced only when its turn comes (``load``), so a file is
    never held in memory whole: ``shape``/``dtype`` of the array (rows x bytes for block types), ``raw`` its
    ggml type (None for F16/F32 arrays)."""
    shape: tuple
    dtype: np.dtype
    raw: object | None
    load: Callable[[], np.ndarray]


def hf_matrix(hf_name: str, tensor, spec, heads: int, kv_heads: int) -> np.ndarray:
    """A state-dict tensor as float32 numpy in llama.cpp's layout (q/k rows in its RoPE order)."""
    data = tensor.detach().to("cpu").float().numpy()
    if spec.gguf_norm_shift and hf_name.endswith("norm.weight"):
        data = data + np.float32(spec.gguf_norm_shift)
    if spec.permute_qk and hf_name.endswith("q_proj.weight"):
        data = _permute(data, heads)
    elif spec.permute_qk and hf_name.endswith("k_proj.weight"):
        data = _permute(data, kv_heads)
    return data


CHUNK_ELEMENTS = 1 << 24      # rows converted at a time: 64 MB of fp32 whatever the tensor's size


@dataclass(frozen=True)
class ExpertRows:
    """Rows ``lo:hi`` of every expert of a stacked experts weight (transformers fuses gate and up in
    ``experts.gate_up_proj`` [experts, 2 x width, hidden]; llama.cpp keeps ``ffn_gate_exps`` and ``ffn_up_exps``):
    one expert's matrix read at a time (``expert``), from a loaded tensor or the files."""
    tensor: object
    lo: int
    hi: int

    @property
    def shape(self) -> tuple:
        return (int(self.tensor.shape[0]), self.hi - self.lo, *map(int, self.tensor.shape[2:]))

    ndim = 3

    def expert(self, e: int):
        if hasattr(self.tensor, "expert"):          # the files: only the tensors these rows are in
            return self.tensor.expert(e, self.lo, self.hi)
        whole = self.tensor.rows(e, e + 1)[0] if hasattr(self.tensor, "rows") else self.tensor[e]
        return whole[self.lo:self.hi]


#: transformers' stacked experts weights -> (the name llama.cpp's tensor map knows each part by, which rows: the
#: gate's first half of gate_up_proj, the up projection's second)
EXPERT_PARTS = {"experts.gate_up_proj": (("experts.gate_proj.weight", 0), ("experts.up_proj.weight", 1)),
                "experts.down_proj": (("experts.down_proj.weight", None),)}


def expert_tensors(model) -> dict[str, ExpertRows]:
    """GGUF name -> ``ExpertRows`` for every stacked experts tensor of the model (none for a dense model)."""
    names = gguf_tensor_names(model.config)
    return {names.get_name(hf, try_suffixes=(".weight",)): part for k, v in model.state_dict().items()
            for hf, part in expert_parts(k, v) if isinstance(part, ExpertRows)}


def expert_parts(hf_name: str, tensor) -> list[tuple[str, object]]:
    """A state-dict entry as the GGUF tensors it becomes: itself, or a stacked experts weight's parts."""
    suffix = next((k for k in EXPERT_PARTS if hf_name.endswith(k)), None)
    if suffix is None or tensor.ndim != 3:
        return [(hf_name, tensor)]
    prefix, rows = hf_name[:-len(suffix)], int(tensor.shape[1])
    return [(prefix + name, ExpertRows(tensor, 0, rows) if half is None else
             ExpertRows(tensor, half * rows // 2, (half + 1) * rows // 2)) for name, half in EXPERT_PARTS[suffix]]


def encode_tensor(hf_name: str, name: str, tensor, qtype: str, spec, heads: int, kv_heads: int,
                  shape: tuple, dtype) -> np.ndarray:
    """One tensor as the file stores it under ``qtype``, converted a chunk of rows at a time, so no fp32 copy
    of a large matrix exists (the bytes are those of a whole-tensor conversion: every type here works per row).
    ``tensor`` is a torch tensor or a ``LazyTensor`` (read from its file chunk by chunk)."""
    if isinstance(tensor, ExpertRows):            # an expert at a time
        out = np.empty(shape, dtype=dtype)
        for e in range(tensor.shape[0]):
            out[e] = _tensor_for_type(name, tensor.expert(e).detach().to("cpu").float().numpy(), qtype)[0]
        return out
    permuted = spec.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight"))
    rows = int(tensor.shape[0]) if tensor.ndim == 2 else 0
    step = max(1, CHUNK_ELEMENTS // max(1, int(tensor.shape[-1]))) if rows else 0
    if permuted or not rows or rows <= step:
        whole = tensor.load() if hasattr(tensor, "load") else tensor
        return _tensor_for_type(name, hf_matrix(hf_name, whole, spec, heads, kv_heads), qtype)[0]
    out = np.empty(shape, dtype=dtype)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        part = tensor.rows(a, b) if hasattr(tensor, "rows") else tensor[a:b]
        out[a:b] = _tensor_for_type(name, part.detach().to("cpu").float().numpy(), qtype)[0]
    return out


#: tokens llama.cpp's vocabulary loader sets attributes on, by name, for a model whose ``general.name`` says Phi-3
#: (``llama-vocab.cpp``): a vocabulary without one of them does not load at all under such a name
PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def model_name(cfg, tokenizer) -> str:
    """``general.name``: the model's folder name; "phi3"/"phi-3" in it becomes "phi" when the vocabulary lacks the
    tokens llama.cpp then looks up (a Phi-4-mini-like vocabulary in a folder named phi3-...: the file would not load)."""
    import re

    name = str(getattr(cfg, "_name_or_path", "") and Path(cfg._name_or_path).name or "model")
    vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else None
    if vocab is not None and re.search(r"phi-?3", name, re.IGNORECASE) and any(t not in vocab for t in PHI3_NAMED_TOKENS):
        name = re.sub(r"phi-?3", "phi", name, flags=re.IGNORECASE)
    return name


def write_gguf(model, tokenizer, tokenizer_dir: Path, out: Path, qtype: str = "F16",
               progress: Callable[[float, str], None] | None = None,
               cancelled: Callable[[], bool] | None = None, extra_metadata: dict | None = None,
               tensor_types: dict[str, EncodedTensor] | None = None, vocabulary: bool = True) -> dict:
    """Write a Hugging Face Llama-family model as a GGUF file of type F32, F16, BF16 or Q8_0.

    Tensors are converted and written one at a time (the file is never assembled in memory).
    ``tensor_types`` maps GGUF tensor names to ``EncodedTensor`` s that replace the default encoding; the
    calibrated quantizer uses it to write its own blocks. ``vocabulary=False`` leaves the tokenizer out:
    only for probes that llama.cpp's quantizer reads (it never loads a vocabulary), not for a model to run.
    """
    import gguf

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    if gguf_writer_for(cfg) != "edgetailor":
        raise EdgeTailorError(f"EdgeTailor's own GGUF writer does not cover this '{cfg.model_type}' model "
                              "(its family, or biases the writer does not place).",
                              "Use the export step: it writes this family with llama.cpp's converter.")
    problem = gguf_layout_problem(cfg)
    if problem:
        raise EdgeTailorError(f"No GGUF file of this '{cfg.model_type}' model would compute what it computes: {problem}.",
                              "Export it to another format, or keep its blocks as trained.")
    n_layers = int(cfg.num_hidden_layers)
    names = gguf_tensor_names(cfg)
    tensor_types = tensor_types or {}

    w = gguf.GGUFWriter(str(out), spec.gguf_arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_name(cfg, tokenizer))
        add_hparams(w, cfg, spec, n_layers)
        w.add_file_type(_ftype(qtype))
        if qtype in ("Q8_0",) or tensor_types:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for k, v in (extra_metadata or {}).items():
            w.add_string(k, str(v))
        tok_kind = add_vocab(w, tokenizer, tokenizer_dir, int(cfg.vocab_size)) if vocabulary else None
        if tok_kind == "sentencepiece" and spec.gguf_space_prefix is not None:
            w.add_add_space_prefix(spec.gguf_space_prefix)
        plan, kept_f16, n_items = _tensor_plan(model, names, qtype, spec, tensor_types)
        _write_planned(w, plan, progress, cancelled)
    finally:
        w.close()
    if progress:
        progress(1.0, "written")
    return {"type": qtype, "tokenizer": tok_kind, "arch": spec.gguf_arch, "tensors": n_items,
            "kept_f16": kept_f16}


def _tensor_plan(model, names, qtype: str, spec, tensor_types: dict) -> tuple[list, list[str], int]:
    """(GGUF name, EncodedTensor) of every tensor in file order, loaded only when written; the matrices Q8_0
    keeps in F16; the count of the model's tensors."""
    cfg = model.config
    dims = ModelDims.of(cfg)
    items = [(k, v) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")]
    if dims.tied:
        items = [(k, v) for k, v in items if k != "lm_head.weight"]
    plan: list[tuple[str, EncodedTensor]] = []
    kept_f16 = []
    factors = _llama3_rope_factors(cfg)
    if factors is not None:
        plan.append(("rope_freqs.weight", EncodedTensor(factors.shape, factors.dtype, None, lambda: factors)))
    for name, values in (_phi3_rope_factors(cfg) if spec.gguf_arch == "phi3" else []):
        plan.append((name, EncodedTensor(values.shape, values.dtype, None, lambda values=values: values)))
    for hf_name, tensor in (part for k, v in items for part in expert_parts(k, v)):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgeTailorError(f"The GGUF exporter has no llama.cpp name for tensor '{hf_name}'.",
                                  "This model has modules llama.cpp's Llama graph lacks; export to ONNX instead.")
        if name in tensor_types:
            plan.append((name, tensor_types[name]))
            continue
        shape, dtype, raw = _layout_for_type(name, tuple(tensor.shape), qtype)
        if qtype == "Q8_0" and raw is None and tensor.ndim > 1:
            kept_f16.append(name)
        load = (lambda hf_name=hf_name, tensor=tensor, name=name, shape=shape, dtype=dtype:
                encode_tensor(hf_name, name, tensor, qtype, spec, dims.heads, dims.kv_heads, shape, dtype))
        plan.append((name, EncodedTensor(shape, dtype, raw, load)))
    return plan, kept_f16, len(items)


def _write_planned(w, plan: list, progress, cancelled) -> None:
    """Header, metadata and tensor infos, then each tensor's data as it is loaded (one in memory at a time)."""
    for name, enc in plan:
        w.add_tensor_info(name, enc.shape, np.dtype(enc.dtype), int(np.prod(enc.shape)) * np.dtype(enc.dtype).itemsize,
                          raw_dtype=enc.raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, enc) in enumerate(plan):
        if cancelled and cancelled():
            raise RunCancelled()
        arr = enc.load()
        if tuple(arr.shape) != tuple(enc.shape) or arr.dtype != enc.dtype:
            raise AssertionError(f"{name}: got {arr.dtype}{arr.shape}, declared {enc.dtype}{enc.shape}")
        w.write_tensor_data(arr)
        del arr
        if progress and i % 8 == 0:
            progress((i + 1) / len(plan), f"writing {name}")


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int | None = None, pure: bool = False,
                   head_type: str | None = None) -> dict:
    """llama.cpp's own quantizer, in-process. ``pure``: every matrix in the type's base type (no k-quant mix);
    ``head_type``: the output head and token embeddings in this ggml type (e.g. "Q8_0")."""
    import gguf
    import llama_cpp

    ft = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ft is None:
        raise EdgeTailorError(f"This llama.cpp build has no quantizer for '{qtype}'.",
                              f"Use one of: {', '.join(quant_types())}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ft
    params.nthread = int(threads or 0)
    params.pure = bool(pure)
    if head_type:
        params.output_tensor_type = params.token_embedding_type = int(gguf.GGMLQuantizationType[head_type])
    with _captured_stderr() as captured:
        Path(dst).touch()           # a disk with no file left to make says so here, as itself
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = captured["text"]
    if rc != 0 or not Path(dst).exists():
        _raise_if_no_room(Path(src), Path(dst))
        tail = " ".join(text.strip().splitlines()[-2:])[-300:]
        raise EdgeTailorError(f"llama.cpp failed to quantize to {qtype} (code {rc}): {tail}",
                              "Try another type; types marked as needing an importance matrix need the calibrated step.")
    import re

    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    return {"fallback_tensors": int(m.group(1)) if m else 0}


def _raise_if_no_room(src: Path, dst: Path) -> None:
    """llama_model_quantize returns only a failure code; a destination with no file left to make, or fewer free
    bytes than the source it quantizes (an upper bound of the output), is the disk's fault, not the type's."""
    import errno
    import os

    disk = os.statvfs(dst.parent)
    if disk.f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
    if disk.f_favail == 0 or disk.f_bavail * disk.f_frsize < src.stat().st_size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))


@contextlib.contextmanager
def _captured_stderr():
    """llama.cpp's quantizer prints a line per tensor to fd 2; keep it out of the user's terminal."""
    import os
    import sys

    captured = {"text": ""}
    with tempfile.TemporaryFile() as fh:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            fh.seek(0)
            captured["text"] = fh.read().decode("utf-8", "replace")


def verify_gguf(path: Path, n_tokens: int = 8) -> dict:
    """Load the file in llama.cpp and run a short forward pass; raise if anything is off."""
    from ..engine.runtimes import LlamaCppRuntime

    rt = LlamaCppRuntime(path, n_ctx=64, threads=None)
    try:
        n_vocab = rt.llm.n_vocab()
        ids = rt.tokenize("The quick brown fox jumps over the lazy dog.")[:n_tokens] or [0]
        logits = rt.logits(ids)
        if not np.isfinite(logits).all():
            raise EdgeTailorError(f"{Path(path).name} loads in llama.cpp but gives non-finite logits.",
                                  "The weights overflow this type; export to F32/BF16 or another type.")
        return {"loaded_by": "llama.cpp", "n_vocab": n_vocab, "tokens_run": len(ids)}
    finally:
        rt.close()

"""ONNX export for onnxruntime and onnxruntime-genai (phones, laptop apps); ``engine.runtimes.onnx`` runs it.

The graph is written directly with ``onnx.helper`` in the shape onnxruntime-genai's model builder emits for
CPU, so the same fused kernels run it: ``GroupQueryAttention`` (rotary inside, KV cache in and out),
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` and, once quantized,
``MatMulNBits`` (int4) with the tied embedding read from the quantized head by ``GatherBlockQuantized``.

Types: ``fp32``, ``fp16``, ``int8`` (onnxruntime's ``quantize_dynamic`` on the MatMul weights) and ``int4``
(onnxruntime's ``MatMulNBitsQuantizer``). Options: ``block_size`` (32, 64 or 128; a weight whose rows do not
fill whole blocks is padded by the quantizer), ``method`` ``rtn`` (symmetric round-to-nearest, the builder's
default), ``hqq`` (half-quadratic, asymmetric) or ``gptq`` (EdgeTailor's own GPTQ, calibrated on ``calibration_text``:
the inputs' X^T X of every MatMul collected in one onnxruntime pass per window, then error-feedback rounding
onto the MatMulNBits grid itself, see ``quantize_int4_gptq``),
``accuracy_level`` (MatMulNBits compute type, default 4 = int8 activations on CPU, as the builder uses).

The output folder holds ``model.onnx`` + ``model.onnx.data`` (weights as external data, so models over 2 GB
work), ``genai_config.json`` and the tokenizer files: ``onnxruntime_genai.Model(folder)`` runs it as it is.

The graph's inputs and outputs carry onnxruntime-genai's names (see ``engine/runtimes/onnx.py``, whose
``OnnxRuntime`` and ``OnnxGenaiRuntime`` run the folder with its KV cache).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.architectures import ModelDims, arch_spec
from ..engine.atomic import temp_prefix
from ..engine.errors import EdgeTailorError, RunCancelled
from ..engine.runtimes.onnx import MODEL_FILE, OnnxGenaiRuntime, OnnxRuntime, empty_cache
from . import register_exporter
from .base import Exporter, ExportResult

TYPES = ("fp32", "fp16", "int8", "int4")
INT4_METHODS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (32, 64, 128)
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
OPSET = 21


def parse_options(options: dict) -> dict:
    qtype = str(options.get("type", "fp32")).lower()
    if qtype not in TYPES:
        raise EdgeTailorError(f"'{qtype}' is not an ONNX export type.", f"Use one of: {', '.join(TYPES)}.")
    block = int(options.get("block_size", 32))
    if block not in BLOCK_SIZES:
        raise EdgeTailorError(f"An int4 block size of {block} is not supported.",
                              f"Use one of: {', '.join(map(str, BLOCK_SIZES))}.")
    method = str(options.get("method", "rtn")).lower()
    if method not in INT4_METHODS:
        raise EdgeTailorError(f"'{method}' is not an int4 method.", f"Use one of: {', '.join(INT4_METHODS)}.")
    if qtype == "int4" and method == "gptq" and not options.get("calibration_text"):
        raise EdgeTailorError("int4 method 'gptq' needs calibration text.",
                              "Run it through the export step (it passes the job's calibration text), "
                              "or give options.calibration_text.")
    return {"type": qtype, "block_size": block, "method": method,
            "accuracy_level": int(options.get("accuracy_level", 4)),
            "calibration_text": options.get("calibration_text"),
            "calibration_windows": int(options.get("calibration_windows", 20)),
            "calibration_ctx": int(options.get("calibration_ctx", 512)),
            "damp": float(options.get("damp", 0.01))}


class ONNXExporter(Exporter):
    format = "onnx"
    runtimes = ("onnxruntime", "onnxruntime-genai")

    def check_options(self, options: dict) -> None:
        parse_options(options)

    def export(self, model, tokenizer, tokenizer_dir, out, options, progress=None, cancelled=None):
        opts = parse_options(options)
        qtype = opts["type"]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)

        def step(f, m):
            if cancelled and cancelled():
                raise RunCancelled()
            if progress:
                progress(f, m)

        spec = arch_spec(model.config.model_type)
        if spec is not None and spec.onnx == "genai-builder":
            return export_with_builder(model, tokenizer_dir, out, opts, options.get("source_dir"), step, cancelled)
        step(0.0, "building the ONNX graph")
        float_type = "fp16" if qtype == "fp16" else "fp32"
        graph = build_graph(model, float_type, quantizable=qtype in ("int8", "int4"))
        info = {"type": qtype, "layers": graph.n_layers, "tied_embeddings": graph.tied}
        if qtype in ("fp32", "fp16"):
            proto = graph.proto
        elif qtype == "int8":
            step(0.3, "int8: onnxruntime quantize_dynamic")
            proto = quantize_int8(graph)
            info["quantized_by"] = "onnxruntime quantize_dynamic (MatMul weights, int8 per channel)"
        else:
            by = ("EdgeTailor GPTQ onto MatMulNBits" if opts["method"] == "gptq"
                  else f"onnxruntime MatMulNBitsQuantizer ({opts['method']})")
            step(0.3, f"int4 {opts['method']}: {by}")
            proto = quantize_int4(graph, opts, tokenizer, step)
            info.update(block_size=opts["block_size"], method=opts["method"], quantized_by=by)
        step(0.85, "writing model.onnx + model.onnx.data")
        save(proto, out)
        write_genai_config(model, tokenizer, out, graph)
        copy_tokenizer_files(Path(tokenizer_dir), out, tokenizer)
        files = sorted(p for p in out.iterdir())
        info["bytes"] = sum(p.stat().st_size for p in files)
        return ExportResult(path=out, files=files, info=info)

    def verify(self, path):
        return verify_onnx(path)


register_exporter(ONNXExporter())


# --- onnxruntime-genai's model builder, for the families EdgeTailor's graph does not cover ----------------
def export_with_builder(model, tokenizer_dir, out: Path, opts: dict, source_dir, step, cancelled) -> ExportResult:
    """The family's graph as onnxruntime-genai's model builder writes it (in a child process: it loads the model
    in torch itself), from the untouched source folder or the transformed model saved to scratch. Its int4 is
    MatMulNBits RTN at the given block size; EdgeTailor's GPTQ and HQQ need EdgeTailor's own graph."""
    from .hf_folder import model_folder

    if opts["type"] == "int4" and opts["method"] != "rtn":
        raise EdgeTailorError(
            f"int4 method '{opts['method']}' runs on EdgeTailor's own ONNX graph, which does not cover "
            f"'{model.config.model_type}' models; onnxruntime-genai's builder writes them with RTN.",
            "Use method: rtn for this model, or export it to GGUF.")
    step(0.0, "onnxruntime-genai's model builder writes the graph")
    with tempfile.TemporaryDirectory(prefix="edgetailor-onnx-", dir=out.parent) as tmp:
        folder = model_folder(model, tokenizer_dir, source_dir, Path(tmp))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
               "-p", opts["type"], "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if opts["type"] == "int4":
            cmd += ["--extra_options", f"int4_block_size={opts['block_size']}",
                    f"int4_accuracy_level={opts['accuracy_level']}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(Path(tmp) / "builder.log", "w+b") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    if cancelled and cancelled():
                        raise RunCancelled()
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        tail = " | ".join(ln for ln in text.strip().splitlines()[-3:])[-600:]
        raise EdgeTailorError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}): {tail}",
                              "Export this model to GGUF, or update onnxruntime-genai.")
    step(0.9, "written")
    info = {"type": opts["type"], "written_by": "onnxruntime-genai model builder",
            **({"block_size": opts["block_size"], "method": "rtn",
                "quantized_by": "onnxruntime-genai builder (MatMulNBits RTN)"} if opts["type"] == "int4" else {})}
    files = sorted(p for p in out.iterdir())
    info["bytes"] = sum(p.stat().st_size for p in files if p.is_file())
    return ExportResult(path=out, files=files, info=info)


# --- graph ------------------------------------------------------------------------------------------
class GraphBuilder:
    """Nodes, initializers and I/O of one decoder graph (names as onnxruntime-genai's builder writes them)."""

    def __init__(self, float_type: str):
        from onnx import TensorProto

        self.np_float = np.float16 if float_type == "fp16" else np.float32
        self.onnx_float = TensorProto.FLOAT16 if float_type == "fp16" else TensorProto.FLOAT
        self.nodes = []
        self.initializers = []
        self.inputs = []
        self.outputs = []
        self.consts: dict = {}

    def init(self, name: str, array: np.ndarray, dtype=None) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array.astype(dtype or self.np_float)), name))
        return name

    def const_i64(self, values) -> str:
        key = (str(values),)
        if key not in self.consts:
            name = f"/model/constants/INT64/{values}"
            self.init(name, np.array(values, dtype=np.int64), np.int64)
            self.consts[key] = name
        return self.consts[key]

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "", outputs=None,
             **attrs) -> list[str]:
        from onnx import helper

        outputs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs))
        return outputs

    def linear(self, name: str, inp: str, weight, bias=None) -> str:
        """x @ W^T (+ b), the weight stored transposed as the MatMul's initializer."""
        w = self.init(f"{name.strip('/').replace('/', '.')}.MatMul.weight", _np(weight).T)
        out = self.node("MatMul", [inp, w], f"{name}/MatMul")[0]
        if bias is not None:
            b = self.init(f"{name.strip('/').replace('/', '.')}.bias", _np(bias))
            out = self.node("Add", [out, b], f"{name}/Add")[0]
        return out


class DecoderGraph:
    def __init__(self, proto, n_layers, kv_heads, heads, head_dim, hidden, vocab, tied, float_type, context):
        self.proto = proto
        self.n_layers = n_layers
        self.kv_heads = kv_heads
        self.heads = heads
        self.head_dim = head_dim
        self.hidden = hidden
        self.vocab = vocab
        self.tied = tied
        self.float_type = float_type
        self.context = context


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def build_graph(model, float_type: str = "fp32", quantizable: bool = False) -> DecoderGraph:
    """The decoder as an ONNX graph with contrib ops. With ``quantizable`` the head keeps its own [hidden, vocab]
    weight (a MatMul the quantizers can take) even when it is tied to the embedding."""
    from onnx import helper

    cfg = model.config
    spec = _covered(cfg)
    inner, layers, dims = model.model, model.model.layers, ModelDims.of(cfg)
    # GroupQueryAttention takes head sizes in multiples of 16: smaller heads are zero-padded (same results)
    head_dim = -(-dims.head_dim // 16) * 16
    if head_dim != dims.head_dim and spec.qk_norm:
        raise EdgeTailorError(f"Heads of {dims.head_dim} dimensions with q/k norms cannot run in GroupQueryAttention.",
                              "Export this model to GGUF instead.")
    vocab = int(inner.embed_tokens.weight.shape[0])
    g = GraphBuilder(float_type)
    _declare_io(g, len(layers), dims.kv_heads, head_dim, vocab)
    shared = AttentionInputs(*_mask_lengths(g), *_rotary_caches(g, inner.rotary_emb, head_dim, dims.context),
                             window=_sliding_window(cfg, dims.context), head_dim=head_dim, true_head_dim=dims.head_dim,
                             kv_heads=dims.kv_heads, eps=dims.rms_eps, qk_norm=spec.qk_norm)
    g.init("model.embed_tokens.weight", _np(inner.embed_tokens.weight))
    residual = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")[0]
    normed = g.node("SimplifiedLayerNormalization", [residual, g.init("model.layers.0.input_layernorm.weight",
                                                                        _np(layers[0].input_layernorm.weight))],
                    "/model/layers.0/input_layernorm/LayerNorm", epsilon=dims.rms_eps, axis=-1, stash_type=1)[0]
    for i, layer in enumerate(layers):
        p = f"/model/layers.{i}"
        o = _attention(g, p, i, layer.self_attn, normed, shared)
        post_w = g.init(f"model.layers.{i}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight))
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, o, post_w],
                                        f"{p}/post_attention_layernorm/SkipLayerNorm", domain="com.microsoft",
                                        n_out=4, epsilon=dims.rms_eps)
        down = _mlp(g, p, layer.mlp, normed)
        if i + 1 < len(layers):
            nw = g.init(f"model.layers.{i + 1}.input_layernorm.weight", _np(layers[i + 1].input_layernorm.weight))
            name = f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm"
        else:
            nw = g.init("model.norm.weight", _np(inner.norm.weight))
            name = "/model/norm/SkipLayerNorm"
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, down, nw], name,
                                        domain="com.microsoft", n_out=4, epsilon=dims.rms_eps)
    _lm_head(g, model, normed, dims.tied and not quantizable)
    graph = helper.make_graph(g.nodes, "edgetailor-decoder", g.inputs, g.outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgetailor")
    proto.ir_version = 10
    return DecoderGraph(proto, len(layers), dims.kv_heads, dims.heads, head_dim, dims.hidden, vocab, dims.tied,
                        float_type, dims.context)


def _covered(cfg):
    spec = arch_spec(cfg.model_type)
    if spec is None or spec.onnx != "edgetailor":
        from ..engine.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"EdgeTailor's ONNX graph does not cover '{cfg.model_type}' models"
            + (f": {spec.onnx_note}." if spec is not None and spec.onnx_note else "."),
            "Export this model to GGUF; `edgetailor inspect MODEL` lists what applies to it.")
    return spec


def _sliding_window(cfg, context: int) -> int:
    """GroupQueryAttention's local window: the model's sliding window, or -1 for none."""
    window = getattr(cfg, "sliding_window", None)
    if not window or not getattr(cfg, "use_sliding_window", True) or window >= context:
        return -1
    return int(window)


def _declare_io(g: GraphBuilder, n_layers: int, kv_heads: int, head_dim: int, vocab: int) -> None:
    from onnx import TensorProto, helper

    fl = g.onnx_float
    g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    g.inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                  ["batch_size", "total_sequence_length"]))
    g.outputs.append(helper.make_tensor_value_info("logits", fl, ["batch_size", "sequence_length", vocab]))
    for i in range(n_layers):
        for kind in ("key", "value"):
            g.inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", fl, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
            g.outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", fl, ["batch_size", kv_heads, "total_sequence_length", head_dim]))


def _mask_lengths(g: GraphBuilder) -> tuple[str, str]:
    """attention mask -> seqlens_k (tokens seen - 1) and the total length, as GroupQueryAttention takes them."""
    from onnx import TensorProto

    base = "/model/attn_mask_reformat/attn_mask_subgraph"
    one = g.const_i64([1])
    rsum = g.node("ReduceSum", ["attention_mask", one], f"{base}/ReduceSum", keepdims=0)[0]
    sub = g.node("Sub", [rsum, one], f"{base}/Sub")[0]
    seqlens_k = g.node("Cast", [sub], f"{base}/Sub/Cast", to=TensorProto.INT32)[0]
    shape = g.node("Shape", ["attention_mask"], f"{base}/Shape")[0]
    total = g.node("Gather", [shape, g.const_i64(1)], f"{base}/Gather", axis=0)[0]
    return seqlens_k, g.node("Cast", [total], f"{base}/Gather/Cast", to=TensorProto.INT32)[0]


def _rotary_caches(g: GraphBuilder, rot, head_dim: int, context: int) -> tuple[str, str]:
    """cos/sin caches [positions, head_dim / 2] from the model's own rotary embedding (covers rope scaling)."""
    inv_freq = rot.inv_freq.detach().to("cpu").double().numpy()
    inv_freq = np.pad(inv_freq, (0, head_dim // 2 - len(inv_freq)))
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    freqs = np.outer(np.arange(context, dtype=np.float64), inv_freq)
    return g.init("cos_cache", np.cos(freqs) * scaling), g.init("sin_cache", np.sin(freqs) * scaling)


@dataclass
class AttentionInputs:
    """What every layer's GroupQueryAttention shares."""
    seqlens_k: str
    total_len: str
    cos_cache: str
    sin_cache: str
    window: int
    head_dim: int              # padded to a multiple of 16
    true_head_dim: int
    kv_heads: int
    eps: float
    qk_norm: bool


def _attention(g: GraphBuilder, p: str, i: int, att, normed: str, a: AttentionInputs) -> str:
    """One layer's attention: q/k/v (packed unless q/k norms), GroupQueryAttention with the KV cache, o_proj."""
    import torch

    n_heads = att.q_proj.weight.shape[0] // a.true_head_dim
    qw, qb = _pad_rope_heads(att.q_proj, n_heads, a.true_head_dim, a.head_dim)
    kw, kb = _pad_rope_heads(att.k_proj, a.kv_heads, a.true_head_dim, a.head_dim)
    vw, vb = _pad_heads(att.v_proj, a.kv_heads, a.true_head_dim, a.head_dim)
    if a.qk_norm:
        q = g.linear(f"{p}/attn/q_proj", normed, qw, qb)
        k = g.linear(f"{p}/attn/k_proj", normed, kw, kb)
        v = g.linear(f"{p}/attn/v_proj", normed, vw, vb)
        q = _head_norm(g, f"{p}/attn/q_norm", q, n_heads, a.head_dim, _np(att.q_norm.weight), a.eps)
        k = _head_norm(g, f"{p}/attn/k_norm", k, a.kv_heads, a.head_dim, _np(att.k_norm.weight), a.eps)
        qkv = [q, k, v]
    else:
        b = torch.cat([qb, kb, vb], 0) if qb is not None else None
        qkv = [g.linear(f"{p}/attn/qkv_proj", normed, torch.cat([qw, kw, vw], 0), b), "", ""]
    attn_out = g.node(
        "GroupQueryAttention",
        qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", a.seqlens_k, a.total_len, a.cos_cache,
               a.sin_cache],
        f"{p}/attn/GroupQueryAttention", domain="com.microsoft",
        outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=int(n_heads), kv_num_heads=a.kv_heads, scale=float(a.true_head_dim ** -0.5),
        local_window_size=int(a.window), do_rotary=1, rotary_interleaved=0)[0]
    ow = att.o_proj.weight
    if a.head_dim != a.true_head_dim:
        ow = _pad(ow.reshape(ow.shape[0], n_heads, a.true_head_dim), 2, a.head_dim).reshape(ow.shape[0], -1)
    return g.linear(f"{p}/attn/o_proj", attn_out, ow, att.o_proj.bias)


def _mlp(g: GraphBuilder, p: str, mlp, normed: str) -> str:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    gate = g.linear(f"{p}/mlp/gate_proj", normed, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = g.linear(f"{p}/mlp/up_proj", normed, mlp.up_proj.weight, mlp.up_proj.bias)
    sig = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
    act = g.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
    prod = g.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
    return g.linear(f"{p}/mlp/down_proj", prod, mlp.down_proj.weight, mlp.down_proj.bias)


def _lm_head(g: GraphBuilder, model, normed: str, read_tied: bool) -> None:
    """The output head; ``read_tied``: one [vocab, hidden] tensor on disk, transposed once by onnxruntime at load."""
    if read_tied:
        head_t = g.node("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])[0]
        g.node("MatMul", [normed, head_t], "/lm_head/MatMul", outputs=["logits"])
    else:
        head = g.init("lm_head.MatMul.weight", _np(model.lm_head.weight).T)
        g.node("MatMul", [normed, head], "/lm_head/MatMul", outputs=["logits"])


def _pad(t, dim: int, size: int):
    import torch.nn.functional as F

    pad = [0, 0] * (t.ndim - 1 - dim) + [0, size - t.shape[dim]]
    return F.pad(t.detach(), pad)


def _pad_rope_heads(proj, n_heads: int, true_dim: int, dim: int):
    """q/k rows padded per rotary half ([h, 2, d/2] -> [h, 2, dim/2]), so rotate-half pairs stay paired."""
    w, b = proj.weight.detach(), proj.bias
    if dim == true_dim:
        return w, (b.detach() if b is not None else None)
    w = _pad(w.reshape(n_heads, 2, true_dim // 2, -1), 2, dim // 2).reshape(n_heads * dim, -1)
    if b is not None:
        b = _pad(b.reshape(n_heads, 2, true_dim // 2), 2, dim // 2).reshape(-1)
    return w, b


def _pad_heads(proj, n_heads: int, true_dim: int, dim: int):
    w, b = proj.weight.detach(), proj.bias
    if dim == true_dim:
        return w, (b.detach() if b is not None else None)
    w = _pad(w.reshape(n_heads, true_dim, -1), 1, dim).reshape(n_heads * dim, -1)
    if b is not None:
        b = _pad(b.reshape(n_heads, true_dim), 1, dim).reshape(-1)
    return w, b


def _head_norm(g: GraphBuilder, name: str, x: str, n_heads: int, head_dim: int, weight: np.ndarray, eps: float) -> str:
    """RMSNorm over each head (qwen3's q_norm / k_norm): [b, s, h*d] -> [b, s, h, d] -> norm -> back."""
    r = g.node("Reshape", [x, g.const_i64([0, 0, n_heads, head_dim])], f"{name}/Reshape")[0]
    w = g.init(f"{name.strip('/').replace('/', '.')}.weight", weight)
    n = g.node("SimplifiedLayerNormalization", [r, w], f"{name}/LayerNorm", epsilon=eps, axis=-1, stash_type=1)[0]
    return g.node("Reshape", [n, g.const_i64([0, 0, n_heads * head_dim])], f"{name}/Reshape_back")[0]


# --- quantization -----------------------------------------------------------------------------------
def quantize_int8(graph: DecoderGraph):
    """onnxruntime's dynamic quantization of every MatMul weight (int8, per output channel)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix=temp_prefix("onnx-int8")) as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(graph.proto, src, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="fp32.onnx.data", size_threshold=1024)
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(dst)


def quantize_int4(graph: DecoderGraph, opts: dict, tokenizer, step):
    """Every MatMul (head included) to MatMulNBits: onnxruntime's MatMulNBitsQuantizer for rtn and hqq,
    EdgeTailor's GPTQ for gptq; a tied embedding then reads the quantized head through GatherBlockQuantized, as
    onnxruntime-genai's builder does."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    block, method = opts["block_size"], opts["method"]
    if method == "rtn":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True,
                                                accuracy_level=opts["accuracy_level"], quant_format=QuantFormat.QOperator,
                                                op_types_to_quantize=("MatMul",))
    elif method == "hqq":
        # HQQ's zero points are floats, which GatherBlockQuantized cannot read: the embedding stays float
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4, op_types_to_quantize=("MatMul",))
    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    if method == "gptq":
        proto = quantize_int4_gptq(graph, opts, tokenizer, step)
    else:
        q = mnq.MatMulNBitsQuantizer(graph.proto, block_size=block, is_symmetric=True,
                                     accuracy_level=opts["accuracy_level"], algo_config=algo)
        q.process()
        proto = q.model.model
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits" and opts["accuracy_level"] and not any(a.name == "accuracy_level" for a in n.attribute):
            from onnx import helper

            n.attribute.append(helper.make_attribute("accuracy_level", opts["accuracy_level"]))
    if graph.tied and method != "hqq":
        _embedding_from_quantized_head(proto, graph, block)
    return proto


def constant_matmuls(proto) -> list:
    """(MatMul node, its 2-D weight initializer) for every MatMul whose B is a constant."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [(n, inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def collect_input_hessians(proto, feeds, step=None) -> dict:
    """X^T X (float32, K x K) of the input of every constant-weight MatMul, summed over the feeds' tokens.

    One onnxruntime pass per feed fetches every such input at once (MatMuls sharing an input share one sum).
    """
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    names = sorted({n.input[0] for n, _ in constant_matmuls(proto)})
    with tempfile.TemporaryDirectory(prefix=temp_prefix("onnx-hessians")) as tmp:
        added = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names]
        proto.graph.output.extend(added)
        try:
            onnx.save_model(proto, Path(tmp) / "calib.onnx", save_as_external_data=True,
                            all_tensors_to_one_file=True, location="calib.onnx.data", size_threshold=1024)
        finally:
            for _ in added:
                proto.graph.output.pop()
            onnx.load_external_data_for_model(proto, tmp)     # saving moved the weights out of the proto
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(Path(tmp) / "calib.onnx"), so, providers=["CPUExecutionProvider"])
        sums: dict[str, torch.Tensor] = {}
        feeds = list(feeds)
        for k, feed in enumerate(feeds):
            if step:
                step(0.3 + 0.2 * k / len(feeds), f"int4 gptq: activations of calibration window {k + 1}/{len(feeds)}")
            for name, x in zip(names, sess.run(names, feed)):
                x2 = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32))
                sums[name] = sums[name] + x2.T @ x2 if name in sums else x2.T @ x2
        del sess
    return sums


def quantize_int4_gptq(graph: DecoderGraph, opts: dict, tokenizer, step):
    """Int4 MatMulNBits (symmetric, no zero points, the layout onnxruntime's RTN writes) with GPTQ rounding.

    onnxruntime's own GPTQ rounds with GPTQ's grid, then requantizes the result with a second, different
    scale (its ``quant_tensor``), which undoes much of the error feedback; here the codes and scales GPTQ
    chooses (``gguf_blocks.quantize_blocks`` on the symmetric int4 grid, scales fitted by weighted search)
    are what is written. A tied head (which is also the embedding table) is fitted without error feedback:
    GPTQ's compensation is for the head's inputs, not for embedding lookups.
    """
    from onnx import numpy_helper

    block = opts["block_size"]
    proto = graph.proto
    reader = CalibrationReader(graph, tokenizer, opts["calibration_text"], opts["calibration_windows"],
                               opts["calibration_ctx"])
    feeds = iter(reader.get_next, None)
    hessians = collect_input_hessians(proto, feeds, step)
    matmuls = constant_matmuls(proto)
    replaced, new_inits, drop = {}, [], set()
    for k, (node, init) in enumerate(matmuls):
        step(0.5 + 0.35 * k / len(matmuls), f"int4 gptq: {node.name} ({k + 1}/{len(matmuls)})")
        B = numpy_helper.to_array(init).astype(np.float32)          # [K, N]
        head_tied = graph.tied and "logits" in node.output
        H = None if head_tied else hessians[node.input[0]].double().numpy()
        packed, scales = int4_gptq_weights(B, H, block, opts["damp"])
        q_name, s_name = init.name + "_Q4", init.name + "_scales"
        new_inits += [numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)]
        replaced[node.name] = matmul_nbits_node(node, q_name, s_name, B.shape, block, opts["accuracy_level"])
        drop.add(init.name)
    del hessians
    nodes = [replaced.get(n.name, n) for n in proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep + new_inits)
    return proto


def int4_gptq_weights(B: np.ndarray, H: np.ndarray | None, block: int, damp: float = 0.01):
    """MatMulNBits' packed codes [N, blocks, block / 2] and scales [N, blocks] for a weight B [K, N].

    ``H``: X^T X of the inputs [K, K] (GPTQ error feedback, its diagonal as importance); None: scales
    fitted by plain least squares, no feedback. K is padded to whole blocks as onnxruntime does.
    """
    import torch

    from . import gguf_blocks

    K, N = B.shape
    kp = -(-K // block) * block
    W = np.zeros((N, kp), dtype=np.float32)
    W[:, :K] = B.T
    Hp = imp = None
    if H is not None:
        Hp = np.zeros((kp, kp), dtype=np.float64)
        Hp[:K, :K] = H
        imp = np.diag(Hp).copy()
    bt = gguf_blocks.symmetric_int4(block)
    codes, raws, _ = gguf_blocks.quantize_blocks(bt, W, imp, Hp, damp)
    u = (codes.to(torch.int32).numpy() - bt.qmin).astype(np.uint8)           # q + 8 in 0..15
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(N, kp // block, block // 2)
    scales = np.concatenate([r["scale"].numpy() for r in raws], 1).astype(np.float32)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales)


def matmul_nbits_node(node, q_name: str, s_name: str, shape, block: int, accuracy_level: int = 0):
    """The MatMulNBits (4 bits, no zero points) that replaces MatMul ``node`` with a weight of ``shape`` [K, N]."""
    from onnx import helper

    attrs = {"K": int(shape[0]), "N": int(shape[1]), "bits": 4, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                            name=node.name + "_Q4", domain="com.microsoft", **attrs)


def CalibrationReader(graph: DecoderGraph, tokenizer, text: str, windows: int, ctx: int):
    """Calibration windows (each with an empty KV cache) for onnxruntime's GPTQ quantizer."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            n = max(1, min(windows, len(ids) // ctx))
            self.items = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
            self.pos = 0

        def get_next(self):
            if self.pos >= len(self.items):
                return None
            w = self.items[self.pos]
            self.pos += 1
            feed = {"input_ids": np.array([w], dtype=np.int64), "attention_mask": np.ones((1, len(w)), dtype=np.int64)}
            feed.update(empty_cache(graph.n_layers, graph.kv_heads, graph.head_dim, np.float32))
            return feed

        def rewind(self):
            self.pos = 0

    return Reader()


def _remove_unused_initializers(proto) -> None:
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _embedding_from_quantized_head(proto, graph: DecoderGraph, block: int) -> None:
    """Replace the float embedding Gather with GatherBlockQuantized over the int4 head's weights."""
    from onnx import helper

    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
    b_name, scales = head.input[1], head.input[2]
    zp = head.input[3] if len(head.input) > 3 and head.input[3] else ""
    padded = -(-graph.hidden // block) * block
    blocks = padded // block
    gather = next(n for n in proto.graph.node if n.name == "/model/embed_tokens/Gather")
    out = gather.output[0]
    new = []

    def const(name, values):
        proto.graph.initializer.append(helper.make_tensor(name, 7, [len(values)], values))
        return name

    data = "/model/embed_tokens/Reshape/output_0"
    new.append(helper.make_node("Reshape", [b_name, const("/model/embed_tokens/shape_data", [graph.vocab, padded // 2])],
                                [data], name="/model/embed_tokens/Reshape"))
    s = "/model/embed_tokens/Reshape_scales/output_0"
    new.append(helper.make_node("Reshape", [scales, const("/model/embed_tokens/shape_scales", [graph.vocab, blocks])],
                                [s], name="/model/embed_tokens/Reshape_scales"))
    inputs = [data, "input_ids", s]
    if zp:
        z = "/model/embed_tokens/Reshape_zp/output_0"
        new.append(helper.make_node("Reshape", [zp, const("/model/embed_tokens/shape_zp", [graph.vocab, -(-blocks // 2)])],
                                    [z], name="/model/embed_tokens/Reshape_zp"))
        inputs.append(z)
    gathered = out if padded == graph.hidden else "/model/embed_tokens/GatherBlockQuantized/output_0"
    new.append(helper.make_node("GatherBlockQuantized", inputs, [gathered], name="/model/embed_tokens/GatherBlockQuantized",
                                domain="com.microsoft", bits=4, block_size=block, gather_axis=0, quantize_axis=1))
    if padded != graph.hidden:
        new.append(helper.make_node("Slice", [gathered, const("/model/embed_tokens/slice_start", [0]),
                                              const("/model/embed_tokens/slice_end", [graph.hidden]),
                                              const("/model/embed_tokens/slice_axis", [-1])],
                                    [out], name="/model/embed_tokens/Slice"))
    idx = list(proto.graph.node).index(gather)
    nodes = list(proto.graph.node)
    nodes[idx:idx + 1] = new
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _remove_unused_initializers(proto)


# --- files ------------------------------------------------------------------------------------------
def save(proto, out: Path) -> None:
    import onnx

    for p in (out / MODEL_FILE, out / DATA_FILE):
        p.unlink(missing_ok=True)
    onnx.save_model(proto, out / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def write_genai_config(model, tokenizer, out: Path, graph: DecoderGraph) -> None:
    cfg = model.config
    gen = getattr(model, "generation_config", None)

    def pick(name):
        v = getattr(gen, name, None) if gen is not None else None
        return v if v is not None else getattr(cfg, name, None)

    eos = pick("eos_token_id")
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config = {
        "model": {
            "bos_token_id": pick("bos_token_id"),
            "context_length": graph.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": graph.head_dim,
                "hidden_size": graph.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": graph.heads,
                "num_hidden_layers": graph.n_layers,
                "num_key_value_heads": graph.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": cfg.model_type,
            "vocab_size": graph.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": graph.context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (out / "genai_config.json").write_text(json.dumps(config, indent=4))


def copy_tokenizer_files(src: Path, out: Path, tokenizer) -> None:
    """The source's tokenizer files; onnxruntime-genai reads tokenizer.json, so a SentencePiece-only source gets
    the one its fast tokenizer converts to."""
    found = [f for f in TOKENIZER_FILES if (src / f).exists()]
    for f in found:
        shutil.copy(src / f, out / f)
    if "tokenizer.json" not in found:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise EdgeTailorError(f"{src} has no tokenizer.json, and its tokenizer cannot write one.",
                                  "Export from a folder with tokenizer.json (a fast tokenizer).")
        backend.save(str(out / "tokenizer.json"))




def verify_onnx(path: Path, n_tokens: int = 8) -> dict:
    """Load the folder in onnxruntime (and onnxruntime-genai when installed) and run a forward pass each."""
    path = Path(path)
    rt = OnnxRuntime(path, threads=1)
    try:
        ids = list(range(1, n_tokens + 1))
        logits = rt.logits(ids)
        if logits.shape[0] != n_tokens or not np.isfinite(logits).all():
            raise EdgeTailorError(f"{path.name} gave bad logits in onnxruntime.", "Export the variant again.")
        rt.prefill(ids[:-1])
        step = rt.decode_one(ids[-1])
        if step.shape != logits[-1].shape or not np.isfinite(step).all():
            raise EdgeTailorError(f"{path.name} gave bad logits when decoding with its KV cache.",
                                  "This is a bug in the ONNX exporter; please report it.")
    finally:
        rt.close()
    checked = {"loaded_by": "onnxruntime", "tokens": n_tokens}
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return checked
    with OnnxGenaiRuntime(path, n_ctx=n_tokens + 4) as genai:
        checked["genai_token"] = int(np.argmax(genai.prefill(ids)))
    checked["loaded_by"] = "onnxruntime and onnxruntime-genai"
    return checked

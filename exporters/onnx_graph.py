"""The decoder as an ONNX graph, written directly with ``onnx.helper`` in the shape onnxruntime-genai's model
builder emits for CPU: ``GroupQueryAttention`` (rotary inside, KV cache in and out), packed QKV,
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``; the names are the builder's."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..engine.architectures import ModelDims, arch_spec
from ..engine.errors import EdgeTailorError
from .onnx_quant import quantized_embedding

OPSET = 21
#: initializers up to this many bytes stay in model.onnx (as ``onnx.save_model``'s size_threshold does)
EXTERNAL_THRESHOLD = 1024


class GraphBuilder:
    """Nodes, initializers and I/O of one decoder graph (names as onnxruntime-genai's builder writes them). With
    ``data`` (an open file, ``model.onnx.data``) each initializer over 1 KB goes there as it is made, the graph
    keeping only its place: no copy of the weights accumulates in memory. ``nbits``: the MatMul weights
    quantized as they are written (``onnx_quant.NBits``); None: float MatMuls."""

    def __init__(self, float_type: str, data=None, data_name: str = "", nbits=None):
        from onnx import TensorProto

        self.np_float = np.float16 if float_type == "fp16" else np.float32
        self.onnx_float = TensorProto.FLOAT16 if float_type == "fp16" else TensorProto.FLOAT
        self.nodes = []
        self.initializers = []
        self.inputs = []
        self.outputs = []
        self.consts: dict = {}
        self.data, self.data_name = data, data_name
        self.nbits = nbits

    def init(self, name: str, array: np.ndarray, dtype=None) -> str:
        from onnx import numpy_helper

        array = np.ascontiguousarray(array.astype(dtype or self.np_float))
        if self.data is None or array.nbytes <= EXTERNAL_THRESHOLD:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            self.initializers.append(self._external(name, array))
        return name

    def _external(self, name: str, array: np.ndarray):
        """A TensorProto whose bytes are written to the data file now (as onnx's own external-data writer lays
        them out: one after another)."""
        from onnx import TensorProto, helper

        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        offset = self.data.tell()
        self.data.write(array.tobytes())
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

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

    def linear(self, name: str, inp: str, weight, bias=None, hessian=None, head: bool = False, outputs=None) -> str:
        """x @ W^T (+ b): a float MatMul with the weight stored transposed, or MatMulNBits (``nbits``; ``hessian``:
        X^T X of its input for GPTQ, ``head``: the output head, which may have its own bits)."""
        if self.nbits is not None:
            out = self.nbits.write(self, name, inp, weight, hessian, head, outputs)
        else:
            w = self.init(f"{name.strip('/').replace('/', '.')}.MatMul.weight", _np(weight).T)
            out = self.node("MatMul", [inp, w], f"{name}/MatMul", outputs=outputs)[0]
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


class ModelParts:
    """What the graph reads of a model, held or lazy: the embedding, the decoder layers one at a time from the
    block walker (a lazy model's: one layer's weights in memory at a time), the norms, the head, the rotary
    embedding. With calibration ``sequences`` the walk runs them through each layer before it is written, and
    ``hessian(module)`` is X^T X of that linear layer's input (GPTQ's statistics, the full-precision model's own
    activations); the head's is the final norm's output's, after the last layer."""

    def __init__(self, model, sequences=None, progress=None, cancelled=None):
        self.model, self.lazy = model, bool(getattr(model, "is_lazy", False))
        self.sequences, self.progress, self.cancelled = sequences, progress, cancelled
        self._hessians: dict[int, object] = {}
        self.head_hessian = None
        if self.lazy:
            from ..engine.walker import skeleton

            self.state = model.state_dict()
            self.rotary = skeleton(model.config).model.rotary_emb
            self.n_layers = ModelDims.of(model.config).layers
        else:
            self.rotary, self.n_layers = model.model.rotary_emb, len(model.model.layers)

    def tensor(self, name: str):
        if self.lazy:
            return self.state[name].load()
        return self.model.get_parameter(name)

    def layers(self):
        from ..engine.imatrix import InputCollector
        from ..engine.walker import BlockWalk

        walk = BlockWalk(self.model, self.sequences, cancelled=self.cancelled, progress=self.progress)
        for block in walk:
            if self.sequences is not None:
                linears = block.linears()
                acc = InputCollector(True)
                with acc.hooks(linears):
                    block.forward()
                acc.done()
                self._hessians = {id(m): acc.xtx[acc.input_of[n]] for n, m in linears.items()}
                del acc
            yield block.index, block.module
            self._hessians = {}
        if self.sequences is not None and not ModelDims.of(self.model.config).tied:
            self.head_hessian = sum(y.reshape(-1, y.shape[-1]).T @ y.reshape(-1, y.shape[-1])
                                    for y in walk.final_hidden())

    def hessian(self, module):
        """X^T X of ``module``'s input in the layer being written (None without calibration sequences)."""
        return self._hessians.get(id(module))

    def head(self):
        """The output head's weight [vocab, hidden]: a lazy model's unread (quantizers read it in row slices)."""
        name = "lm_head.weight"
        if self.lazy:
            return self.state[name] if name in self.state else self.state["model.embed_tokens.weight"]
        return self.model.lm_head.weight


def build_graph(model, float_type: str = "fp32", quantizable: bool = False, data=None, data_name: str = "",
                nbits=None, sequences=None, progress=None, cancelled=None) -> DecoderGraph:
    """The decoder as an ONNX graph with contrib ops. ``nbits`` (``onnx_quant.NBits``): every MatMul quantized as
    it is written, a tied embedding read from the quantized head (HQQ's float zero points cannot be: the embedding
    stays a float table); GPTQ's statistics from ``sequences`` (token ids [n, seq]) walked through each layer just
    before it is written. With ``quantizable`` (for a quantizer that takes the finished graph, as onnxruntime's
    ``MatMulNBitsQuantizer`` does) the head keeps its own [hidden, vocab] float weight even when tied. ``model``
    held in memory or lazy (one decoder layer read at a time); ``data``: the file the weights go to as they are
    made (``GraphBuilder``); ``progress`` and ``cancelled`` per decoder layer."""
    from onnx import helper

    cfg = model.config
    spec = _covered(cfg)
    dims = ModelDims.of(cfg)
    parts = ModelParts(model, sequences if nbits is not None and nbits.gptq else None, progress, cancelled)
    # GroupQueryAttention takes head sizes in multiples of 16: smaller heads are zero-padded (same results)
    head_dim = -(-dims.head_dim // 16) * 16
    if head_dim != dims.head_dim and spec.qk_norm:
        raise EdgeTailorError(f"Heads of {dims.head_dim} dimensions with q/k norms cannot run in GroupQueryAttention.",
                              "Export this model to GGUF instead.")
    g = GraphBuilder(float_type, data, data_name, nbits)
    vocab = int(parts.head().shape[0])
    _declare_io(g, parts.n_layers, dims.kv_heads, head_dim, vocab)
    shared = AttentionInputs(*_mask_lengths(g), *_rotary_caches(g, parts.rotary, head_dim, dims.context),
                             window=_sliding_window(cfg, dims.context), head_dim=head_dim, true_head_dim=dims.head_dim,
                             kv_heads=dims.kv_heads, eps=dims.rms_eps, qk_norm=spec.qk_norm)
    embedding_from_head = nbits is not None and dims.tied and not nbits.hqq
    if not embedding_from_head:
        g.init("model.embed_tokens.weight", _np(parts.tensor("model.embed_tokens.weight")))
    residual = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")[0]
    normed = g.node("SimplifiedLayerNormalization", [residual, g.init(
        "model.layers.0.input_layernorm.weight", _np(parts.tensor("model.layers.0.input_layernorm.weight")))],
                    "/model/layers.0/input_layernorm/LayerNorm", epsilon=dims.rms_eps, axis=-1, stash_type=1)[0]
    for i, layer in parts.layers():
        p = f"/model/layers.{i}"
        o = _attention(g, p, i, layer.self_attn, normed, shared, parts.hessian)
        post_w = g.init(f"model.layers.{i}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight))
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, o, post_w],
                                        f"{p}/post_attention_layernorm/SkipLayerNorm", domain="com.microsoft",
                                        n_out=4, epsilon=dims.rms_eps)
        down = _mlp(g, p, layer.mlp, normed, parts.hessian)
        nxt = (f"model.layers.{i + 1}.input_layernorm.weight", f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm") \
            if i + 1 < parts.n_layers else ("model.norm.weight", "/model/norm/SkipLayerNorm")
        nw = g.init(nxt[0], _np(parts.tensor(nxt[0])))
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, down, nw], nxt[1],
                                        domain="com.microsoft", n_out=4, epsilon=dims.rms_eps)
    _lm_head(g, parts, normed, dims.tied and nbits is None and not quantizable)
    if embedding_from_head:
        q, s = g.nodes[-1].input[1:3]
        quantized_embedding(g, q, s, vocab, dims.hidden, nbits.block, nbits.head_bits)
    graph = helper.make_graph(g.nodes, "edgetailor-decoder", g.inputs, g.outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgetailor")
    proto.ir_version = 10
    return DecoderGraph(proto, parts.n_layers, dims.kv_heads, dims.heads, head_dim, dims.hidden, vocab, dims.tied,
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


def _attention(g: GraphBuilder, p: str, i: int, att, normed: str, a: AttentionInputs, hessian) -> str:
    """One layer's attention: q/k/v (packed unless q/k norms), GroupQueryAttention with the KV cache, o_proj.
    ``hessian(module)``: X^T X of a linear layer's input, for GPTQ (None without)."""
    import torch

    n_heads = att.q_proj.weight.shape[0] // a.true_head_dim
    h_in = hessian(att.q_proj)          # q, k and v read the same input
    qw, qb = _pad_rope_heads(att.q_proj, n_heads, a.true_head_dim, a.head_dim)
    kw, kb = _pad_rope_heads(att.k_proj, a.kv_heads, a.true_head_dim, a.head_dim)
    vw, vb = _pad_heads(att.v_proj, a.kv_heads, a.true_head_dim, a.head_dim)
    if a.qk_norm:
        q = g.linear(f"{p}/attn/q_proj", normed, qw, qb, h_in)
        k = g.linear(f"{p}/attn/k_proj", normed, kw, kb, h_in)
        v = g.linear(f"{p}/attn/v_proj", normed, vw, vb, h_in)
        q = _head_norm(g, f"{p}/attn/q_norm", q, n_heads, a.head_dim, _np(att.q_norm.weight), a.eps)
        k = _head_norm(g, f"{p}/attn/k_norm", k, a.kv_heads, a.head_dim, _np(att.k_norm.weight), a.eps)
        qkv = [q, k, v]
    else:
        b = torch.cat([qb, kb, vb], 0) if qb is not None else None
        qkv = [g.linear(f"{p}/attn/qkv_proj", normed, torch.cat([qw, kw, vw], 0), b, h_in), "", ""]
    attn_out = g.node(
        "GroupQueryAttention",
        qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", a.seqlens_k, a.total_len, a.cos_cache,
               a.sin_cache],
        f"{p}/attn/GroupQueryAttention", domain="com.microsoft",
        outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=int(n_heads), kv_num_heads=a.kv_heads, scale=float(a.true_head_dim ** -0.5),
        local_window_size=int(a.window), do_rotary=1, rotary_interleaved=0)[0]
    ow, h_o = att.o_proj.weight, hessian(att.o_proj)
    if a.head_dim != a.true_head_dim:
        ow = _pad(ow.reshape(ow.shape[0], n_heads, a.true_head_dim), 2, a.head_dim).reshape(ow.shape[0], -1)
        h_o = None if h_o is None else _pad_gram(h_o, n_heads, a.true_head_dim, a.head_dim)
    return g.linear(f"{p}/attn/o_proj", attn_out, ow, att.o_proj.bias, h_o)


def _mlp(g: GraphBuilder, p: str, mlp, normed: str, hessian) -> str:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    h_in = hessian(mlp.gate_proj)
    gate = g.linear(f"{p}/mlp/gate_proj", normed, mlp.gate_proj.weight, mlp.gate_proj.bias, h_in)
    up = g.linear(f"{p}/mlp/up_proj", normed, mlp.up_proj.weight, mlp.up_proj.bias, h_in)
    del h_in
    sig = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
    act = g.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
    prod = g.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
    return g.linear(f"{p}/mlp/down_proj", prod, mlp.down_proj.weight, mlp.down_proj.bias, hessian(mlp.down_proj))


def _lm_head(g: GraphBuilder, parts: ModelParts, normed: str, read_tied: bool) -> None:
    """The output head; ``read_tied``: one [vocab, hidden] tensor on disk, transposed once by onnxruntime at load."""
    if read_tied:
        head_t = g.node("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])[0]
        g.node("MatMul", [normed, head_t], "/lm_head/MatMul", outputs=["logits"])
    else:
        g.linear("/lm_head", normed, parts.head(), hessian=parts.head_hessian, head=True, outputs=["logits"])


def _pad_gram(H, n_heads: int, true_dim: int, dim: int):
    """X^T X of an input whose heads are zero-padded from ``true_dim`` to ``dim`` (o_proj's, as the graph pads it)."""
    import torch

    idx = (torch.arange(n_heads)[:, None] * dim + torch.arange(true_dim)[None, :]).reshape(-1)
    out = torch.zeros(n_heads * dim, n_heads * dim, dtype=H.dtype)
    out[idx[:, None], idx[None, :]] = H
    return out


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

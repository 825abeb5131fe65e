"""Quantizing an ONNX decoder graph: int8 (``quantize_dynamic``), int4 RTN/HQQ (onnxruntime's
``MatMulNBitsQuantizer``) and EdgeTailor's int4 GPTQ onto ``MatMulNBits`` (calibration inputs' X^T X from one
onnxruntime pass per window, rounded by ``gguf_blocks.quantize_blocks`` on MatMulNBits' own grid)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..engine.atomic import temp_prefix
from ..engine.runtimes.onnx import empty_cache
from .onnx_graph import DecoderGraph


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
    EdgeTailor's GPTQ for gptq; with ``head_bits`` 8 the output head is 8-bit MatMulNBits instead (round to
    nearest: the head carries much of int4's loss, and GPTQ's feedback is not for a table that doubles as the
    embedding); a tied embedding then reads the quantized head through GatherBlockQuantized, as
    onnxruntime-genai's builder does."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    block, method = opts["block_size"], opts["method"]
    head = next(n.name for n in graph.proto.graph.node if n.op_type == "MatMul" and "logits" in n.output)
    apart = [head] if opts["head_bits"] == 8 else []
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
        proto = quantize_int4_gptq(graph, opts, tokenizer, step, skip=set(apart))
    else:
        q = mnq.MatMulNBitsQuantizer(graph.proto, block_size=block, is_symmetric=True,
                                     accuracy_level=opts["accuracy_level"], algo_config=algo, nodes_to_exclude=apart)
        q.process()
        proto = q.model.model
    if apart:
        head8 = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=8,
                                                 accuracy_level=opts["accuracy_level"],
                                                 quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
        q = mnq.MatMulNBitsQuantizer(proto, bits=8, block_size=block, is_symmetric=True,
                                     accuracy_level=opts["accuracy_level"], nodes_to_include=apart, algo_config=head8)
        q.process()
        proto = q.model.model
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits" and opts["accuracy_level"] and not any(a.name == "accuracy_level" for a in n.attribute):
            from onnx import helper

            n.attribute.append(helper.make_attribute("accuracy_level", opts["accuracy_level"]))
    if graph.tied and method != "hqq":
        _embedding_from_quantized_head(proto, graph, block, opts["head_bits"])
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


def quantize_int4_gptq(graph: DecoderGraph, opts: dict, tokenizer, step, skip: set[str] = frozenset()):
    """Int4 MatMulNBits (symmetric, no zero points, the layout onnxruntime's RTN writes) with GPTQ rounding.

    onnxruntime's own GPTQ rounds with GPTQ's grid, then requantizes the result with a second, different
    scale (its ``quant_tensor``), which undoes much of the error feedback; here the codes and scales GPTQ
    chooses (``gguf_blocks.quantize_blocks`` on the symmetric int4 grid, scales fitted by weighted search)
    are what is written. A tied head (which is also the embedding table) is fitted without error feedback:
    GPTQ's compensation is for the head's inputs, not for embedding lookups. MatMuls named in ``skip`` stay
    float.
    """
    from onnx import numpy_helper

    block = opts["block_size"]
    proto = graph.proto
    reader = CalibrationReader(graph, tokenizer, opts["calibration_text"], opts["calibration_windows"],
                               opts["calibration_ctx"])
    feeds = iter(reader.get_next, None)
    hessians = collect_input_hessians(proto, feeds, step)
    matmuls = [(n, i) for n, i in constant_matmuls(proto) if n.name not in skip]
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
    """Calibration windows (each with an empty KV cache) for onnxruntime's GPTQ quantizer, at most as long as the
    graph's rotary tables (the model's context)."""
    from onnxruntime.quantization import CalibrationDataReader

    ctx = min(ctx, graph.context)

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


def _embedding_from_quantized_head(proto, graph: DecoderGraph, block: int, bits: int = 4) -> None:
    """Replace the float embedding Gather with GatherBlockQuantized over the quantized head's weights."""
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
    new.append(helper.make_node("Reshape", [b_name, const("/model/embed_tokens/shape_data", [graph.vocab, padded * bits // 8])],
                                [data], name="/model/embed_tokens/Reshape"))
    s = "/model/embed_tokens/Reshape_scales/output_0"
    new.append(helper.make_node("Reshape", [scales, const("/model/embed_tokens/shape_scales", [graph.vocab, blocks])],
                                [s], name="/model/embed_tokens/Reshape_scales"))
    inputs = [data, "input_ids", s]
    if zp:
        z = "/model/embed_tokens/Reshape_zp/output_0"
        new.append(helper.make_node("Reshape", [zp, const("/model/embed_tokens/shape_zp", [graph.vocab, -(-blocks * bits // 8)])],
                                    [z], name="/model/embed_tokens/Reshape_zp"))
        inputs.append(z)
    gathered = out if padded == graph.hidden else "/model/embed_tokens/GatherBlockQuantized/output_0"
    new.append(helper.make_node("GatherBlockQuantized", inputs, [gathered], name="/model/embed_tokens/GatherBlockQuantized",
                                domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
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

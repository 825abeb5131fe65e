"""The decoder graph's weights quantized as the graph is written, one MatMul at a time: ``MatMulNBits`` int4 or int8
(weight-only, symmetric blocks, no zero points: the layout onnxruntime-genai's model builder writes for ``-p int4``
and ``-p int8``), rounded to nearest by onnxruntime's own kernels (``quantize_matmul_4bits`` / ``_8bits``, so the
codes are onnxruntime's RTN bit for bit) or by EdgeTailor's GPTQ (error feedback through the inputs' X^T X, which
the block walker measures as the graph's layers are written, see ``onnx_graph.ModelParts``); a tied embedding is
read from the quantized head through ``GatherBlockQuantized``. Nothing holds more than one weight at a time.

HQQ (int4, asymmetric: float zero points) is onnxruntime's own half-quadratic quantizer applied to each weight as
it is written (``hqq_weights``: its ``quantize_internal`` and packing, so the codes, scales and zero points are
what ``MatMulNBitsQuantizer`` writes for the whole float graph, byte for byte, for every weight of up to
``SLICE_ELEMENTS``). GatherBlockQuantized cannot read float zero points: a tied embedding stays a float table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: weights rounded at once (a slice of a matrix's rows, float32): the output head of a 128k vocabulary in slices
SLICE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class NBits:
    """How every MatMul weight is stored: ``bits`` (4 or 8) in blocks of ``block`` inputs, the output head in
    ``head_bits``; ``method`` ``rtn`` or ``gptq``."""

    bits: int
    block: int
    method: str = "rtn"
    head_bits: int = 4
    accuracy_level: int = 4
    damp: float = 0.01

    @property
    def gptq(self) -> bool:
        return self.method == "gptq"

    @property
    def hqq(self) -> bool:
        return self.method == "hqq"

    def write(self, g, name: str, inp: str, weight, hessian=None, head: bool = False, outputs=None) -> str:
        """The MatMulNBits node for ``weight`` [N, K] (a torch tensor, or a lazy one read in row slices), its codes
        and scales written as initializers; returns its output."""
        bits = self.head_bits if head else self.bits
        packed, scales, *zeros = self.weights(weight, bits, hessian)
        base = f"{name.strip('/').replace('/', '.')}.MatMul.weight"
        inputs = [inp, g.init(f"{base}_Q{bits}", packed, np.uint8), g.init(f"{base}_scales", scales, np.float32)]
        if zeros:                                                  # HQQ's float zero points
            inputs.append(g.init(f"{base}_zero_points", zeros[0], np.float32))
        N, K = (int(d) for d in weight.shape)
        attrs = {"K": K, "N": N, "bits": bits, "block_size": self.block}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        return g.node("MatMulNBits", inputs, f"{name}/MatMul_Q{bits}", domain="com.microsoft", outputs=outputs,
                      **attrs)[0]

    def weights(self, weight, bits: int, hessian=None) -> tuple[np.ndarray, ...]:
        """(codes [N, blocks, block * bits / 8], scales [N, blocks]) of ``weight`` [N, K], a slice of rows at a time;
        HQQ: (codes, scales [N * blocks], zero points [N * blocks]). GPTQ without a ``hessian`` (a tied head: it is
        also the embedding table) fits the scales by least squares."""
        N, K = (int(d) for d in weight.shape)
        factor = gptq_factor(hessian, K, self.block, self.damp) if self.gptq and hessian is not None else None
        step = max(1, SLICE_ELEMENTS // K)
        parts = []
        for a in range(0, N, step):
            rows = _rows(weight, a, min(a + step, N))
            if self.gptq:
                parts.append(gptq_weights(rows.T, factor, self.block, bits=bits))
            elif self.hqq:
                parts.append(hqq_weights(rows, self.block))
            else:
                parts.append(rtn_weights(rows.T, self.block, bits))
            del rows
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _rows(weight, a: int, b: int) -> np.ndarray:
    rows = weight.rows(a, b) if getattr(weight, "is_lazy", False) else weight[a:b]
    return rows.detach().to("cpu").float().numpy()


def rtn_weights(B: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round to nearest of ``B`` [K, N] by onnxruntime's own kernel (what ``MatMulNBitsQuantizer``'s
    default algorithm calls): codes [N, blocks, block * bits / 8], scales [N, blocks]; K padded to whole blocks."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    K, N = B.shape
    blocks = -(-K // block)
    B = np.ascontiguousarray(np.pad(B, ((0, blocks * block - K), (0, 0))), dtype=np.float32)
    packed = np.zeros((N, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((N, blocks), dtype=np.float32)
    zero_points = np.zeros((N, -(-blocks * bits // 8)), dtype=np.uint8)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, B, scales, zero_points, block, N, blocks * block, True)
    return packed, scales


def hqq_weights(W: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int4 HQQ of ``W`` [N, K] by onnxruntime's own code (``HQQWeightOnlyQuantizer.quantize_internal``: asymmetric
    blocks of ``block`` inputs, the zero points refined by its half-quadratic solver, then its packing): codes
    [N, blocks, block / 2], scales and zero points [N * blocks], as ``MatMulNBitsQuantizer`` writes them. Its solver
    stops when the mean error over what it is given stops falling, so a weight given in slices of rows may stop at
    another step than the whole: the same bytes for every weight of up to ``SLICE_ELEMENTS``."""
    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    quantizer = mnq.HQQWeightOnlyQuantizer(mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    N, K = W.shape
    W = torch.from_numpy(np.ascontiguousarray(W))
    codes, scales, zeros = quantizer.quantize_internal(W, bits=4, group_size=block)
    packed = torch.zeros((codes.shape[0], codes.shape[1] // 2), dtype=torch.uint8)
    quantizer.pack_on_row_fast_248bit(packed, codes.contiguous(), 4)
    del codes
    return (packed.reshape(N, -(-K // block), block // 2).numpy(), scales.contiguous().numpy().reshape(-1),
            zeros.contiguous().numpy().reshape(-1))


def gptq_factor(H, K: int, block: int, damp: float):
    """GPTQ's factor of ``H`` (X^T X, K x K) padded to whole blocks, and its diagonal (the inputs'
    importance): computed once per weight, shared by its row slices."""
    import torch

    from . import gguf_blocks

    kp = -(-K // block) * block
    H = torch.as_tensor(H)
    Hp = torch.zeros(kp, kp, dtype=H.dtype)          # padded in its own precision; reversed into float64 below
    Hp[:K, :K] = H
    importance = torch.diagonal(Hp).double().numpy()
    reversed_hp = gguf_blocks.reversed_hessian(Hp)
    del Hp
    return gguf_blocks.factor_in_place(reversed_hp, damp), importance


def gptq_weights(B: np.ndarray, factor, block: int, damp: float = 0.01, bits: int = 4):
    """MatMulNBits' codes and scales for ``B`` [K, N] rounded by GPTQ onto the symmetric ``bits`` grid itself.

    ``factor``: ``gptq_factor``'s result (or X^T X [K, K], factored here): the columns are rounded in order with
    error feedback, the inputs' second moments as importance; None: the scales fitted by plain least squares, no
    feedback. onnxruntime's own GPTQ rounds on GPTQ's grid and then requantizes with a second, different scale,
    which undoes much of the feedback; here the codes and scales GPTQ chooses are what is written.
    """
    import torch

    from . import gguf_blocks

    K, N = B.shape
    kp = -(-K // block) * block
    W = np.zeros((N, kp), dtype=np.float32)
    W[:, :K] = B.T
    if factor is not None and not isinstance(factor, tuple):
        factor = gptq_factor(factor, K, block, damp)
    hess, imp = factor if factor is not None else (None, None)
    bt = gguf_blocks.symmetric_grid(bits, block)
    codes, raws, _ = gguf_blocks.quantize_blocks(bt, W, imp, hess, damp)
    u = (codes.to(torch.int32).numpy() - bt.qmin).astype(np.uint8)           # q + 2^(bits-1)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)                                       # low nibble first along K
    packed = u.reshape(N, kp // block, block * bits // 8)
    scales = np.concatenate([r["scale"].numpy() for r in raws], 1).astype(np.float32)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales)


def quantized_embedding(g, head_codes: str, head_scales: str, vocab: int, hidden: int, block: int, bits: int) -> None:
    """The embedding Gather (``/model/embed_tokens/Gather``) replaced by GatherBlockQuantized over the quantized
    head's codes and scales, as onnxruntime-genai's builder reads a tied embedding."""
    from onnx import helper

    padded = -(-hidden // block) * block
    blocks = padded // block
    idx = next(i for i, n in enumerate(g.nodes) if n.name == "/model/embed_tokens/Gather")
    out = g.nodes[idx].output[0]
    p = "/model/embed_tokens"
    data = helper.make_node("Reshape", [head_codes, g.const_i64([vocab, padded * bits // 8])],
                            [f"{p}/Reshape/output_0"], name=f"{p}/Reshape")
    scales = helper.make_node("Reshape", [head_scales, g.const_i64([vocab, blocks])],
                              [f"{p}/Reshape_scales/output_0"], name=f"{p}/Reshape_scales")
    gathered = out if padded == hidden else f"{p}/GatherBlockQuantized/output_0"
    new = [data, scales, helper.make_node(
        "GatherBlockQuantized", [data.output[0], "input_ids", scales.output[0]], [gathered],
        name=f"{p}/GatherBlockQuantized", domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
        quantize_axis=1)]
    if padded != hidden:
        new.append(helper.make_node("Slice", [gathered, g.const_i64([0]), g.const_i64([hidden]), g.const_i64([-1])],
                                    [out], name=f"{p}/Slice"))
    g.nodes[idx:idx + 1] = new

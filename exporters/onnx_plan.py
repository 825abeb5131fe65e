"""What each ONNX quantization the exporter writes costs a model, tensor by tensor: bytes in the folder and the
expected loss cost, priced as ``gguf_plan.price_types`` prices GGUF types (the same sensitivity-weighted error
on the same sampled rows), so that the planner weighs ONNX files and GGUF files on one scale.

A scheme is uniform over the model's matrices, as the exporter writes it (``exporters/onnx.py``):

* ``int4-<block>``: ``MatMulNBits``, 4-bit symmetric blocks of ``block`` inputs with a float32 scale each (no
  zero points), the head included; a tied embedding is read from the quantized head (``GatherBlockQuantized``),
  an untied one stays a float32 table; ``int4-<block>-head8``: the same with an 8-bit head (``head_bits: 8``);
* ``int8``: the same layout with 8-bit codes in blocks of 32 (head included), as onnxruntime-genai's builder
  writes ``-p int8``.

The error priced is round-to-nearest on that grid; GPTQ (``method: gptq``) lowers it, which the fitted scale
absorbs too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMBEDDING = "token_embd.weight"
HEAD = "output.weight"


@dataclass(frozen=True)
class OnnxScheme:
    type: str                   # int4 | int8
    block_size: int = 32
    head_bits: int = 4          # int4: 8 for an 8-bit output head; int8: 8

    @property
    def name(self) -> str:
        if self.type != "int4":
            return self.type
        return f"int4-{self.block_size}" + ("-head8" if self.head_bits == 8 else "")

    @property
    def bits(self) -> int:
        return 8 if self.type == "int8" else 4

    def export_options(self) -> dict:
        if self.type != "int4":
            return {"type": self.type, "block_size": self.block_size}
        return {"type": "int4", "block_size": self.block_size, "head_bits": self.head_bits}

    def matrix_bytes(self, shape, bits: int = 4) -> int:
        """A matrix [out, in] as MatMulNBits stores it in ``bits``: codes and a float32 scale per block."""
        out, inp = int(shape[0]), int(shape[1])
        blocks = -(-inp // self.block_size)
        return out * blocks * (self.block_size * bits // 8 + 4)

    def dequantized(self, W: np.ndarray, bits: int = 4) -> np.ndarray:
        """``W`` [rows, in] through the scheme's ``bits`` grid (round to nearest), in float32."""
        W = np.asarray(W, dtype=np.float32)
        b, half = self.block_size, 2 ** (bits - 1)
        pad = (-W.shape[1]) % b
        Wp = np.pad(W, ((0, 0), (0, pad))).reshape(W.shape[0], -1, b)
        idx = np.abs(Wp).argmax(axis=2)[..., None]
        scale = np.take_along_axis(Wp, idx, axis=2) / -half       # the signed largest magnitude maps to -half
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(Wp / safe), -half, half - 1) * scale
        return q.reshape(W.shape[0], -1)[:, :W.shape[1]]

    def bits_of(self, name: str, tied: bool) -> int:
        """The bits the scheme stores this tensor in (an int4 scheme's head may have 8)."""
        return self.head_bits if name == (EMBEDDING if tied else HEAD) else self.bits

    def tensor(self, name: str, shape, tied: bool) -> tuple[int, bool]:
        """(bytes the folder holds for this GGUF-named tensor, whether the scheme quantizes it)."""
        table = int(shape[0]) * int(shape[1]) * 4
        if name == EMBEDDING and not tied:
            return table, False                    # a float32 Gather table
        return self.matrix_bytes(shape, self.bits_of(name, tied)), True


SCHEMES = {s.name: s for s in (*(OnnxScheme("int4", b, h) for h in (4, 8) for b in (32, 64, 128)),
                               OnnxScheme("int8", 32, 8))}


def scheme(name: str) -> OnnxScheme:
    from ..engine.errors import EdgeTailorError

    if name not in SCHEMES:
        raise EdgeTailorError(f"'{name}' is not an ONNX scheme the planner knows.", f"Use {', '.join(SCHEMES)}.")
    return SCHEMES[name]


def price_tensor(s: OnnxScheme, name: str, W: np.ndarray, sub: np.ndarray, imp: np.ndarray, rw: np.ndarray,
                 tied: bool) -> tuple[int, float]:
    """(bytes, expected loss cost) of one tensor under ``s``: ``sub`` are its sampled rows, ``rw`` their weights,
    ``imp`` the inputs' second moments (as ``price_types``)."""
    nbytes, quantized = s.tensor(name, W.shape, tied)
    if not quantized:
        return nbytes, 0.0
    err = float(rw @ (((s.dequantized(sub, s.bits_of(name, tied)) - sub) ** 2) * imp[None, :]).sum(1))
    return nbytes, err

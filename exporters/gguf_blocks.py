"""EdgeTailor's own writers for llama.cpp's block types, guided by importance statistics.

Every type here is a grid ``w ~= scale_g * q - min_g`` over groups of ``group`` weights along a row, with
integer ``q`` in ``[qmin, qmax]`` (IQ4_NL: ``q`` indexes a fixed non-uniform set of 16 levels); the k-quants
(Q2_K..Q6_K) store each group's scale (and min) as a small integer times a per-256-weight fp16 factor. The writer works in two layers:

* ``fit_params(type, x, importance)`` chooses every group's scale and min for a block of columns (a
  weighted least-squares search over candidate scales, then the k-quant integer scales and their fp16
  factors, also weighted), and returns the *effective* float scales/mins llama.cpp will reconstruct.
* ``round_q`` / ``pack`` turn values into integers with those scales and lay them out byte for byte as
  ggml does (``block_q4_K`` etc.); the tests decode them with gguf-py's dequantizers and llama.cpp.

``quantize_matrix`` runs the whole matrix, either with the importance weights alone (what llama.cpp's
imatrix does) or with GPTQ-style error feedback through the factored Hessian of the layer's inputs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int          # weights per block (32) or super-block (256)
    group: int          # weights sharing one scale (and min)
    qmin: int
    qmax: int
    affine: bool        # has a min per group
    scale_bits: int     # 0: fp16 scale per group (legacy types); else bits of the integer group scale
    signed_scale: bool  # integer group scales are signed (Q3_K, Q6_K)
    bytes: int          # bytes per block
    values: tuple | None = None   # a non-uniform grid: q indexes these levels (IQ4_NL), w ~= scale * values[q]

    @property
    def groups(self) -> int:
        return self.block // self.group


TYPES = {t.name: t for t in (
    BlockType("Q8_0", 32, 32, -128, 127, False, 0, False, 34),
    BlockType("Q4_0", 32, 32, -8, 7, False, 0, False, 18),
    BlockType("Q5_0", 32, 32, -16, 15, False, 0, False, 22),
    BlockType("Q4_1", 32, 32, 0, 15, True, 0, False, 20),
    BlockType("Q5_1", 32, 32, 0, 31, True, 0, False, 24),
    # ggml's kvalues_iq4nl: Q4_0's size (fp16 scale, 32 four-bit codes) on a grid denser near zero
    BlockType("IQ4_NL", 32, 32, 0, 15, False, 0, False, 18,
              (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)),
    BlockType("Q2_K", QK_K, 16, 0, 3, True, 4, False, 84),
    BlockType("Q3_K", QK_K, 16, -4, 3, False, 6, True, 110),
    BlockType("Q4_K", QK_K, 32, 0, 15, True, 6, False, 144),
    BlockType("Q5_K", QK_K, 32, 0, 31, True, 6, False, 176),
    BlockType("Q6_K", QK_K, 16, -32, 31, False, 8, True, 210),
)}


def ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


# --- choosing scales ------------------------------------------------------------------------------
# Long by design: llama.cpp's make_qkx3 search in closed form, kept whole to compare with it line by line.
def _fit_groups(bt: BlockType, x: torch.Tensor, w: torch.Tensor, ntry: int = 10):
    """Float scale and min per group minimizing the weighted squared error. x, w: (N, g).

    Errors come from the weighted sums in closed form, so each candidate costs a few passes over x.
    """
    # long: the closed-form error terms of the candidate search, named one by one as in ggml's make_qkx2
    eps = 1e-30
    best_err = torch.full(x.shape[:1], float("inf"), dtype=x.dtype)
    best_s = torch.zeros(x.shape[:1], dtype=x.dtype)
    best_m = torch.zeros(x.shape[:1], dtype=x.dtype)
    wx = w * x
    sw = w.sum(1)
    sx = wx.sum(1)
    sxx = (wx * x).sum(1)
    wq = torch.empty_like(x)         # weighted codes, overwritten by each candidate
    if not bt.affine:
        idx = x.abs().argmax(1, keepdim=True)
        mx = x.gather(1, idx).squeeze(1)
        if bt.values:          # as ggml's IQ4_NL search: the largest magnitude near either end of the grid
            # (12 candidates: within 0.1% of the weighted error of ggml's 15 per side, at half the time)
            denoms = [bt.values[0] + t for t in range(-7, 8, 2)] + [bt.values[-1] + t for t in (-6, -2, 2, 6)]
        else:                  # the largest magnitude onto the wider negative side (as ggml does), or the positive
            denoms = [bt.qmin + bt.qmin * t for t in np.linspace(-0.12, 0.12, ntry)]
            denoms += [bt.qmax + bt.qmax * t for t in np.linspace(-0.12, 0.12, ntry // 2)]
        for den in denoms:
            s = mx / den
            q = level(bt, round_q(bt, x, s[:, None], torch.zeros_like(s)[:, None]))
            sq = torch.mul(w, q, out=wq).mul_(q).sum(1)
            sxq = torch.mul(wx, q, out=wq).sum(1)
            s2 = torch.where(sq > 0, sxq / (sq + eps), torch.zeros_like(sq))
            err = sxx - s2 * sxq
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s2, best_s)
        return best_s, best_m
    lo = x.min(1).values
    hi = x.max(1).values
    if bt.scale_bits:                       # k-quant mins are stored as non-negative offsets
        lo = torch.clamp(lo, max=0.0)
    rng = hi - lo
    nmax = bt.qmax
    q = torch.empty_like(x)          # the candidates' codes, overwritten by each
    for t in np.linspace(-0.1, 0.25, ntry):
        s = rng / (nmax + t * nmax / 4)
        b = lo
        for it in range(2):
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
            torch.sub(x, b[:, None], out=q).mul_(inv[:, None]).round_().clamp_(0, nmax)
            sq = torch.mul(w, q, out=wq).sum(1)
            sqq = wq.mul_(q).sum(1)
            sxq = torch.mul(wx, q, out=wq).sum(1)
            det = sw * sqq - sq * sq
            a = torch.where(det > 0, (sw * sxq - sq * sx) / (det + eps), s)
            b2 = torch.where(det > 0, (sqq * sx - sq * sxq) / (det + eps), b)
            if bt.scale_bits:
                neg = b2 > 0
                a = torch.where(neg, torch.where(sqq > 0, sxq / (sqq + eps), s), a)
                b2 = torch.where(neg, torch.zeros_like(b2), b2)
            a = torch.clamp(a, min=0.0)
            err = sxx - 2 * a * sxq - 2 * b2 * sx + a * a * sqq + 2 * a * b2 * sq + b2 * b2 * sw
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, a, best_s)
            best_m = torch.where(better, -b2, best_m)
            s, b = a, b2
    return best_s, best_m


def _quantize_scales(vals: torch.Tensor, weight: torch.Tensor, bits: int, signed: bool, ntry: int = 12):
    """Integer codes L and a per-row fp16 factor d with vals ~= d * L, weighted. vals, weight: (N, G)."""
    eps = 1e-30
    if signed:
        lmin, lmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        idx = vals.abs().argmax(1, keepdim=True)
        mx = vals.gather(1, idx).squeeze(1)
        dens = [lmin * (1 + t) for t in np.linspace(-0.1, 0.1, ntry)] + [lmax * (1 + t) for t in np.linspace(-0.1, 0.1, ntry // 2)]
    else:
        lmin, lmax = 0, (1 << bits) - 1
        mx = vals.max(1).values
        dens = [lmax * (1 + t) for t in np.linspace(-0.15, 0.1, ntry)]
    best_err = torch.full(vals.shape[:1], float("inf"), dtype=vals.dtype)
    best_d = torch.zeros_like(best_err)
    for den in dens:
        d = mx / den
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        L = torch.clamp(torch.round(vals * inv[:, None]), lmin, lmax)
        sll = (weight * L * L).sum(1)
        d2 = torch.where(sll > 0, (weight * vals * L).sum(1) / (sll + eps), torch.zeros_like(sll))
        if not signed:
            d2 = torch.clamp(d2, min=0.0)
        d2 = d2.to(torch.float16).to(vals.dtype)
        inv2 = torch.where(d2 != 0, 1 / d2, torch.zeros_like(d2))
        L2 = torch.clamp(torch.round(vals * inv2[:, None]), lmin, lmax)
        err = (weight * (vals - d2[:, None] * L2) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d2, best_d)
    inv = torch.where(best_d != 0, 1 / best_d, torch.zeros_like(best_d))
    L = torch.clamp(torch.round(vals * inv[:, None]), lmin, lmax)
    return L, best_d


@dataclass
class BlockParams:
    scale: torch.Tensor          # (R, G) effective float scale per group
    minv: torch.Tensor           # (R, G) effective min (x ~= scale*q - minv)
    raw: dict                    # what gets packed: fp16 factors and integer codes


def fit_params(bt: BlockType, x: torch.Tensor, imp: torch.Tensor) -> BlockParams:
    """Scales and mins for one block of columns of every row. x: (R, block); imp: (block,) or (R, block)."""
    R = x.shape[0]
    G = bt.groups
    xg = x.reshape(R * G, bt.group)
    wg = (imp.expand_as(x) if imp.dim() == 1 else imp).reshape(R * G, bt.group)
    s, m = _fit_groups(bt, xg, wg)
    s = s.reshape(R, G)
    m = m.reshape(R, G)
    if not bt.scale_bits:
        d = s.to(torch.float16)
        raw = {"d": d}
        if bt.affine:
            mm = (-m).to(torch.float16)
            raw["m"] = mm
            return BlockParams(d.float(), -mm.float(), raw)
        return BlockParams(d.float(), torch.zeros_like(s), raw)
    # how much a group's error grows with its scale / min error: sum of weights times q^2 (or 1)
    wsum = wg.sum(1).reshape(R, G)
    q_est = torch.where(s[..., None] > 0, (x.reshape(R, G, bt.group) + m[..., None]) /
                        torch.where(s[..., None] != 0, s[..., None], torch.ones_like(s[..., None])),
                        torch.zeros_like(x.reshape(R, G, bt.group)))
    wq2 = (wg.reshape(R, G, bt.group) * q_est.clamp(bt.qmin, bt.qmax) ** 2).sum(-1) + 1e-12
    Ls, d = _quantize_scales(s, wq2, bt.scale_bits, bt.signed_scale)
    if bt.affine:
        Lm, dmin = _quantize_scales(m, wsum + 1e-12, bt.scale_bits, False)
    else:
        Lm, dmin = torch.zeros_like(Ls), torch.zeros_like(d)
    Ls, Lm = _refine_codes(bt, x.reshape(R, G, bt.group), wg.reshape(R, G, bt.group), Ls, d, Lm, dmin)
    raw = {"d": d.to(torch.float16), "Ls": Ls}
    scale = d[:, None] * Ls
    minv = dmin[:, None] * Lm
    if bt.affine:
        raw["dmin"] = dmin.to(torch.float16)
        raw["Lm"] = Lm
    return BlockParams(scale, minv, raw)


def _refine_codes(bt: BlockType, x, w, Ls, d, Lm, dmin):
    """Move each group's integer scale (and min) by one step where that lowers the group's actual error."""
    lo = -(1 << (bt.scale_bits - 1)) if bt.signed_scale else 0
    hi = (1 << (bt.scale_bits - 1)) - 1 if bt.signed_scale else (1 << bt.scale_bits) - 1
    best_err = None
    best_s, best_m = Ls, Lm
    for ds in (0, -1, 1):
        for dm in ((0, -1, 1) if bt.affine else (0,)):
            ls = torch.clamp(Ls + ds, lo, hi)
            lm = torch.clamp(Lm + dm, 0, hi)
            sc = (d[:, None] * ls)[..., None]
            mn = (dmin[:, None] * lm)[..., None]
            q = round_q(bt, x, sc, mn)
            err = torch.sub(x, q.mul_(sc).sub_(mn), out=q).square_().mul_(w).sum(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, ls, best_s)
            best_m = torch.where(better, lm, best_m)
    return best_s, best_m


def round_q(bt: BlockType, x: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> torch.Tensor:
    """Nearest grid integer (the level's index on a non-uniform grid) for values x given the effective
    scale/min broadcast to x's shape."""
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    y = (x + minv) * inv
    if bt.values:
        lut, step, reach = _nearest_table(bt)
        return lut[(y * step).round().clamp(-reach, reach).long() + reach].to(x.dtype)
    return y.round_().clamp_(bt.qmin, bt.qmax)


def level(bt: BlockType, q: torch.Tensor) -> torch.Tensor:
    """The grid value a code stands for (the code itself on a uniform grid)."""
    if bt.values:
        return _levels(bt).to(q.dtype)[q.long()]
    return q


def dequant(bt: BlockType, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> torch.Tensor:
    return scale * level(bt, q) - minv


@functools.lru_cache(maxsize=None)
def _levels(bt: BlockType) -> torch.Tensor:
    return torch.tensor(bt.values, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _nearest_table(bt: BlockType, step: int = 8):
    """The nearest level's index for every value on a 1/step grid over the levels' range (a table lookup is
    several times faster than a binary search; a value within 1/(2*step) of a midpoint may take the other of
    two nearly equidistant levels, which costs nothing in exactness: the codes are whatever is packed)."""
    v = _levels(bt)
    reach = int(step * (float(v.abs().max()) + 8))
    grid = torch.arange(-reach, reach + 1, dtype=torch.float32) / step
    return torch.bucketize(grid, (v[1:] + v[:-1]) / 2), step, reach


# --- packing ----------------------------------------------------------------------------------------
def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(n, 2, k) values < 16 -> (n, k) bytes: low nibble from [:,0], high from [:,1]."""
    return (u[:, 0] | (u[:, 1] << 4)).astype(np.uint8)


#: ggml's byte layout of each block type: (block type, integer codes (nb, block), the fit's raw codes, the
#: fp16 block scales) -> bytes (nb, bytes per block); one packer per layout, registered on definition
PACKERS: dict[str, Callable[[BlockType, np.ndarray, dict, np.ndarray], np.ndarray]] = {}


def packs(*names: str):
    def register(fn):
        for n in names:
            PACKERS[n] = fn
        return fn
    return register


def pack(bt: BlockType, q: torch.Tensor, raw: dict) -> np.ndarray:
    """ggml's bytes for blocks. q: (nb, block) integers; raw: the fit's codes per block (nb, ...)."""
    return PACKERS[bt.name](bt, q.to(torch.int32).numpy(), raw, _f16(raw["d"].reshape(-1)))


def _bits_across(hb: np.ndarray) -> np.ndarray:
    """(nb, 8, 32) single bits -> (nb, 32) bytes, bit j from row j (the high-bit masks of Q3_K and Q5_K)."""
    out = np.zeros((hb.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        out |= (hb[:, j] << j).astype(np.uint8)
    return out


def _crumbs(u: np.ndarray) -> np.ndarray:
    """(nb, 2, 4, 32) values < 4 -> (nb, 64) bytes, four 2-bit values a byte (Q2_K, Q3_K's low bits)."""
    return (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).reshape(u.shape[0], 64)


@packs("Q8_0")
def _pack_q8_0(bt, qi, raw, d):
    return np.concatenate([d, qi.astype(np.int8).view(np.uint8)], 1)


@packs("IQ4_NL")
def _pack_iq4_nl(bt, qi, raw, d):
    return np.concatenate([d, _nibbles(qi.astype(np.uint8).reshape(qi.shape[0], 2, 16))], 1)


@packs("Q4_0", "Q5_0", "Q4_1", "Q5_1")
def _pack_legacy(bt, qi, raw, d):
    u = (qi - bt.qmin).astype(np.uint8)
    parts = [d]
    if bt.affine:
        parts.append(_f16(raw["m"].reshape(-1)))
    if bt.qmax - bt.qmin == 31:
        parts.append(np.packbits((u >> 4).astype(np.uint8), axis=-1, bitorder="little"))
    return np.concatenate(parts + [_nibbles((u & 0xF).reshape(qi.shape[0], 2, 16))], 1)


@packs("Q2_K")
def _pack_q2_k(bt, qi, raw, d):
    nb = qi.shape[0]
    qs = _crumbs(qi.astype(np.uint8).reshape(nb, 2, 4, 32))
    sc = (raw["Ls"].numpy().astype(np.uint8) | (raw["Lm"].numpy().astype(np.uint8) << 4)).reshape(nb, 16)
    return np.concatenate([sc, qs, d, _f16(raw["dmin"].reshape(-1))], 1)


@packs("Q3_K")
def _pack_q3_k(bt, qi, raw, d):
    nb = qi.shape[0]
    u = (qi + 4).astype(np.uint8)
    qs = _crumbs((u & 3).reshape(nb, 2, 4, 32))
    hmask = _bits_across((u >> 2).reshape(nb, 8, 32))
    s = (raw["Ls"].numpy().astype(np.int32) + 32).astype(np.uint8).reshape(nb, 16)
    low = s & 0xF
    sc = np.zeros((nb, 12), dtype=np.uint8)
    sc[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    hi = (s >> 4).reshape(nb, 4, 4)          # [k, b] for sub-block k*4+b
    sc[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return np.concatenate([hmask, qs, sc, d], 1)


@packs("Q4_K", "Q5_K")
def _pack_q4_k_q5_k(bt, qi, raw, d):
    nb = qi.shape[0]
    ls = raw["Ls"].numpy().astype(np.uint8).reshape(nb, 8)
    lm = raw["Lm"].numpy().astype(np.uint8).reshape(nb, 8)
    sc = np.zeros((nb, 12), dtype=np.uint8)
    sc[:, 0:4] = (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    u = qi.astype(np.uint8)
    qs = _nibbles((u & 0xF).reshape(nb, 4, 2, 32).transpose(0, 2, 1, 3).reshape(nb, 2, 128))
    parts = [d, _f16(raw["dmin"].reshape(-1)), sc]
    if bt.name == "Q5_K":
        parts.append(_bits_across((u >> 4).reshape(nb, 8, 32)))
    return np.concatenate(parts + [qs], 1)


@packs("Q6_K")
def _pack_q6_k(bt, qi, raw, d):
    nb = qi.shape[0]
    u = (qi + 32).astype(np.uint8).reshape(nb, 2, 2, 64)    # [half, nibble k, l64]
    ql = (u[:, :, 0] & 0xF) | ((u[:, :, 1] & 0xF) << 4)      # (nb, 2, 64)
    qh = _crumbs((u >> 4).reshape(nb, 2, 4, 32))
    sc = raw["Ls"].numpy().astype(np.int8).view(np.uint8).reshape(nb, 16)
    return np.concatenate([ql.reshape(nb, 128), qh, sc, d], 1)


# --- whole matrices ---------------------------------------------------------------------------------
def _cat_raw(parts: list[dict]) -> dict:
    return {k: torch.stack([p[k] for p in parts], 1) for k in parts[0]}


def quantize_matrix(name: str, W: np.ndarray, importance: np.ndarray | None = None,
                    hessian: np.ndarray | None = None, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Encode W (rows, cols) as ggml blocks of type ``name``; returns (bytes (rows, row_bytes), dequantized W).

    ``importance``: per-column weights (second moments of the inputs, llama.cpp's imatrix), or per row and column
    (rows whose inputs differ: experts'; not with a Hessian); ``hessian``:
    the inputs' X^T X, which turns on GPTQ error feedback (columns in order, blocks' scales fitted just
    before their columns are rounded).
    """
    bt = TYPES[name]
    R, C = np.shape(W)
    codes, raws, Q = quantize_blocks(bt, W, importance, hessian, damp)
    nbr = C // bt.block
    raw = _cat_raw(raws)      # each (R, nbr, ...)
    raw = {k: v.reshape(R * nbr, *v.shape[2:]) for k, v in raw.items()}
    data = pack(bt, codes.reshape(R * nbr, bt.block), raw)
    return data.reshape(R, nbr * bt.bytes), Q.numpy()


def symmetric_grid(bits: int, block: int) -> BlockType:
    """onnxruntime's MatMulNBits grid without zero points: w = scale * q, q in [-2^(bits-1), 2^(bits-1) - 1]
    (stored q + 2^(bits-1)); int4: [-8, 7]."""
    half = 1 << (bits - 1)
    return BlockType(f"INT{bits}_B{block}", block, block, -half, half - 1, False, 0, False, block * bits // 8 + 4)


#: columns GPTQ's error feedback updates one by one before the rest of a (256-wide) block gets the sub-block's
#: errors at once
SUB_BLOCK = 32


# Long by design: GPTQ's column loop (fit, round, feed the error forward) kept whole, as in the paper's Algorithm 1.
def quantize_blocks(bt: BlockType, W: np.ndarray, importance: np.ndarray | None = None,
                    hessian: np.ndarray | None = None, damp: float = 0.01):
    """Integer codes (R, C), each block's fitted parameters (``BlockParams.raw`` per block of columns, with the
    effective float ``scale``) and the dequantized matrix, for any grid ``bt`` (ggml's types, ONNX int4).

    With ``hessian`` (X^T X of the inputs, or its ``hessian_factor``) the columns are rounded in order
    with GPTQ error feedback, and each block's scales are fitted to the already-corrected weights just before
    its columns are rounded.
    """
    # long: GPTQ's column loop with the per-block fit inside it; split, the error feedback's state would be shared
    W0 = np.ascontiguousarray(W, dtype=np.float32)
    W0 = torch.from_numpy(W0 if W0.flags.writeable else W0.copy())     # the original weights, read only
    Wt = W0.clone()
    R, C = Wt.shape
    if C % bt.block:
        raise ValueError(f"{bt.name} needs rows of a multiple of {bt.block} values, not {C}")
    if importance is None:
        imp = torch.ones(C)
    elif np.ndim(importance) == 2:        # a row's own (rows of several experts, each weighted by its own inputs)
        imp = torch.tensor(np.asarray(importance, dtype=np.float32))
        imp = imp + 1e-6 * imp.mean(1, keepdim=True) + 1e-30
    else:
        imp = torch.tensor(np.asarray(importance, dtype=np.float32))
        imp = imp + 1e-6 * float(imp.mean()) + 1e-30
    if hessian is None:         # no error feedback: every block at once (the groups are independent)
        nb = C // bt.block
        x = Wt.reshape(R * nb, bt.block)
        per_row = imp.reshape(R, nb, bt.block) if imp.ndim == 2 else imp.reshape(1, nb, bt.block).expand(R, nb, bt.block)
        p = fit_params(bt, x, per_row.reshape(R * nb, bt.block))
        sc = p.scale.repeat_interleave(bt.group, 1)
        mn = p.minv.repeat_interleave(bt.group, 1)
        q = round_q(bt, x, sc, mn)
        per_block = {k: v.reshape(R, nb, *v.shape[1:]) for k, v in {**p.raw, "scale": p.scale}.items()}
        raws = [{k: v[:, b] for k, v in per_block.items()} for b in range(nb)]
        return q.reshape(R, C), raws, dequant(bt, q, sc, mn).reshape(R, C)
    V, dead = hessian if isinstance(hessian, tuple) else hessian_factor(hessian, damp)
    Wt[:, dead] = 0           # dead inputs' rows of V are zero: their columns' errors go nowhere
    out_q = torch.empty_like(Wt)
    Q = torch.empty_like(Wt)
    raws = []
    for c0 in range(0, C, bt.block):
        c1 = c0 + bt.block
        p = fit_params(bt, _as_inverse_feedback(Wt, W0, V, c0, c1), imp[c0:c1])
        raws.append({**p.raw, "scale": p.scale})
        # the block's columns as contiguous rows: each step below reads and writes one of them
        sc = p.scale.T.repeat_interleave(bt.group, 0).contiguous()         # (block, R)
        mn = p.minv.T.repeat_interleave(bt.group, 0).contiguous()
        inv = torch.where(sc != 0, 1 / sc, torch.zeros_like(sc))
        Wb = Wt[:, c0:c1].T.contiguous()
        Vb = V[c0:c1, c0:c1]
        qb = torch.empty_like(Wb)
        dqb = torch.empty_like(Wb)
        err = W0[:, c0:c1].T.contiguous()       # the original weights, less their codes' values as they are set
        rows = zip(Wb.unbind(0), qb.unbind(0), dqb.unbind(0), err.unbind(0), sc.unbind(0), mn.unbind(0),
                   inv.unbind(0))
        for j, (w, q, dq, e, s_j, m_j, i_j) in enumerate(rows):
            if bt.values:
                q.copy_(round_q(bt, w, s_j, m_j))
                torch.mul(level(bt, q), s_j, out=dq)
            else:
                torch.round((w + m_j) * i_j, out=q)
                q.clamp_(bt.qmin, bt.qmax)
                torch.mul(q, s_j, out=dq)
            dq.sub_(m_j)
            e.sub_(dq)
            # feedback to the rest of this sub-block now, to the rest of the block once the sub-block is done
            s1 = min((j // SUB_BLOCK + 1) * SUB_BLOCK, bt.block)
            if j + 1 < s1:
                Wb[j + 1:s1].addr_(Vb[j, j + 1:s1], e)
            elif s1 < bt.block:
                s0 = s1 - SUB_BLOCK
                Wb[s1:].addmm_(Vb[s0:s1, s1:].T, err[s0:s1])
        out_q[:, c0:c1] = qb.T
        Q[:, c0:c1] = dqb.T
        if c1 < C:
            Wt[:, c1:].addmm_(err.T, V[c0:c1, c1:])
    return out_q, raws, Q


def _as_inverse_feedback(Wt: torch.Tensor, W0: torch.Tensor, V: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Columns c0:c1 as GPTQ's inverse-factor feedback leaves them once every earlier column is rounded: the
    weights the block's scales are fitted to. ``Wt`` holds them plus the earlier columns' errors fed through V
    alone (what each column is rounded at once the block's own earlier columns are done); the errors reach the
    block's later columns through its own earlier ones too: w + (Wt - w) V_bb^-1 (V_bb: V's diagonal block)."""
    if c0 == 0:
        return Wt[:, c0:c1]
    eye = torch.eye(c1 - c0, dtype=V.dtype)
    through = torch.linalg.solve_triangular(V[c0:c1, c0:c1], eye, upper=True, unitriangular=True)
    w = W0[:, c0:c1]
    return torch.addmm(w, Wt[:, c0:c1] - w, through)


def hessian_factor(hessian, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's factor of the inputs' Hessian H (X^T X; its upper triangle is read), damped by ``damp`` x its mean
    diagonal, and the mask of dead inputs (never nonzero: their columns are zeroed). One factorization serves
    every matrix fed by the same inputs (q/k/v, gate/up). See ``factor_in_place``."""
    return factor_in_place(reversed_hessian(torch.as_tensor(np.asarray(hessian))), damp)


#: rows of the reversed Hessian and of the factor copied at once (float64 strips instead of n x n temporaries)
COPY_STRIP = 1024


def reversed_hessian(H: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
    """J H J / ``divisor`` (J: the reversal permutation) in float64 from H's upper triangle (which becomes the
    lower one, the triangle Cholesky reads), a strip of rows at a time."""
    n = H.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for a in range(0, n, COPY_STRIP):
        b = min(a + COPY_STRIP, n)
        out[a:b] = H[n - b:n - a].flip(0, 1)
        if divisor != 1.0:
            out[a:b].div_(divisor)
    return out


def cholesky_in_place(A: torch.Tensor, block: int = COPY_STRIP) -> torch.Tensor:
    """A's lower Cholesky factor written over A (its lower triangle read; the upper one zeroed), right-looking a
    panel of ``block`` columns at a time: one panel's copy at most, where ``torch.linalg.cholesky`` copies A
    whole even with ``out=A`` (measured: 8192 inputs, 82 MB instead of 512 MB, and no slower)."""
    n = A.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        L11 = torch.linalg.cholesky(A[a:b, a:b])
        A[a:b, a:b] = L11
        if b < n:
            A[b:, a:b] = torch.linalg.solve_triangular(L11.T, A[b:, a:b], upper=True, left=False)
            P = A[b:, a:b]
            for r0 in range(b, n, block):        # the trailing matrix's lower triangle, a strip of rows at a time
                r1 = min(r0 + block, n)
                A[r0:r1, b:r1].addmm_(P[r0 - b:r1 - b], P[:r1 - b].T, alpha=-1)
    return A.tril_()


def factor_in_place(R: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's factor from ``reversed_hessian``'s float64 J H J, which the call consumes (its lower triangle is
    read and overwritten): the unit upper triangular V (float32) of H = V D V^T, and the dead inputs' mask.

    GPTQ rounds column j of a row at w_j - sum_{i<j} e_i U_ij / U_ii (U: the upper Cholesky factor of H^-1,
    e_i: column i's error). Since H = U^-1 U^-T, that is w_j + sum_{k<j} (w_k - q_k) V_kj with V = U^-1 scaled
    to a unit diagonal: the original weights minus their codes, fed forward through H's own factor, which is
    J chol(J H J) J. One Cholesky (in place) and no inverse: half the time of Cholesky plus triangular inverse,
    and one n x n float64 matrix instead of two and a quarter.
    """
    n = R.shape[0]
    diag = R.diagonal()
    dead = diag == 0
    diag[dead] = 1
    diag.add_(damp * float(diag.mean()))
    cholesky_in_place(R)
    R.div_(R.diagonal().clone())                        # unit diagonal: column m of L over L_mm
    V = torch.empty(n, n, dtype=torch.float32)
    for a in range(0, n, COPY_STRIP):
        b = min(a + COPY_STRIP, n)
        V[a:b] = R[n - b:n - a].flip(0, 1)
    return V, dead.flip(0)

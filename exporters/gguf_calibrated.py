"""Calibration-aware GGUF quantization: llama.cpp's type mixes, EdgeTailor's blocks.

For a named llama.cpp mix (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, ...) llama.cpp itself decides which type
every tensor gets (its quantizer runs on a probe file with the model's names and row lengths, fallbacks for
rows that do not split into 256 included), so the files have exactly llama.cpp's types and size. EdgeTailor
then writes the blocks of every tensor whose type it has a writer for (``gguf_blocks``), walking the model one
decoder block at a time on the calibration text: the block's input statistics (second moments, X^T X) give
importance-weighted scales and mins and GPTQ error feedback; tensors that share an input and a type (q/k/v,
gate/up) are quantized together. Only one block's Hessians and one tensor's blocks are in memory at a time;
the blocks go to a scratch file and from there into the GGUF. ``types`` maps tensor names to types
explicitly instead (mixed precision to a size target).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine.architectures import ModelDims, arch_spec, gguf_tensor_names, gguf_writer_for
from ..engine.errors import EdgeTailorError, RunCancelled
from ..engine.memory import release_pages, trim_heap
from . import gguf_blocks
from .gguf import EncodedTensor, expert_parts, expert_tensors, hf_matrix, llama_quantize, write_gguf
from .gguf_plan import ALIGN, metadata_bytes, plan_types, tensor_bytes

#: rows per tensor in the probe file llama.cpp's quantizer types (its choice reads names and row lengths only)
PROBE_ROWS = 32


def llama_cpp_types(model, tokenizer, tokenizer_dir, qtype: str, workdir: Path) -> dict[str, str]:
    """The type llama.cpp's quantizer gives every tensor for the file type ``qtype`` (e.g. Q4_K_M).

    llama.cpp decides from a tensor's name, its row length and the model's hyperparameters, never from the
    values or the row count (``llama_tensor_get_type``), so the probe it quantizes has every matrix cut to
    ``PROBE_ROWS`` zero rows: a file of a few MB instead of an F16 copy of the model. The quantizer never
    loads a vocabulary, so the probe has none (reading a 49k-token vocabulary back took seconds).
    """
    import gguf

    mid = Path(workdir) / "types-probe.gguf"
    dst = Path(workdir) / f"types-{qtype}.gguf"
    shapes = {name: (min(src.shape[0], PROBE_ROWS), src.shape[1]) for name, src in tensor_sources(model).items()}
    shapes.update({name: (1, min(e.shape[1], PROBE_ROWS), e.shape[2]) for name, e in expert_tensors(model).items()})
    probe = {name: EncodedTensor(shape, np.dtype(np.float16), None, lambda shape=shape: np.zeros(shape, dtype=np.float16))
             for name, shape in shapes.items()}      # experts: one (llama.cpp's choice reads the name, not the count)
    try:
        write_gguf(model, tokenizer, tokenizer_dir, mid, "F16", tensor_types=probe, vocabulary=False)
        llama_quantize(mid, dst, qtype)
        reader = gguf.GGUFReader(str(dst))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        del reader
    finally:
        mid.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return types


@dataclass(frozen=True)
class Source:
    """A 2-D tensor of the model as a GGUF tensor: the HF module whose inputs it sees and its matrix."""
    module: str | None        # HF module name (``lm_head`` for a tied embedding; None: no calibrated input)
    hf_name: str
    shape: tuple
    tensor: torch.Tensor
    spec: object
    heads: tuple

    def matrix(self) -> np.ndarray:
        """The matrix as llama.cpp stores it (float32; q/k rows in its RoPE order), made when asked for."""
        return hf_matrix(self.hf_name, self.tensor, self.spec, *self.heads)


def tensor_sources(model) -> dict[str, Source]:
    """GGUF tensor name -> ``Source`` for every matrix the file holds."""

    cfg = model.config
    spec = arch_spec(cfg.model_type)
    names = gguf_tensor_names(cfg)
    dims = ModelDims.of(cfg)
    heads, kv_heads, tied = dims.heads, dims.kv_heads, dims.tied
    out = {}
    for hf_name, p in model.state_dict().items():
        if p.ndim != 2 or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        module = hf_name[:-len(".weight")]
        if module.endswith("embed_tokens"):
            module = "lm_head" if tied else None     # a tied embedding is also the output head
        out[name] = Source(module, hf_name, tuple(p.shape), p, spec, (heads, kv_heads))
    return out


@dataclass(frozen=True)
class ExpertSource:
    """A stacked experts tensor as a GGUF tensor (``[experts, rows, cols]``): each expert's matrix, and the name
    its statistics go by (``{module}.{e}.{proj}``, as ``imatrix.InputCollector.add_experts`` and the sensitivity
    pass name them)."""
    module: str               # the HF experts module (``model.layers.3.mlp.experts``)
    proj: str                 # gate_proj, up_proj, down_proj
    rows: object              # ``gguf.ExpertRows``
    active: float = 1.0       # the share of the experts a token is routed to (k of E)

    @property
    def shape(self) -> tuple:
        return self.rows.shape

    def key(self, e: int) -> str:
        return f"{self.module}.{e}.{self.proj}"

    def expert(self, e: int) -> np.ndarray:
        return self.rows.expert(e).detach().float().numpy()


def expert_sources(model) -> dict[str, ExpertSource]:
    """GGUF tensor name -> ``ExpertSource`` for every stacked experts tensor (none in a dense model)."""
    from .gguf import ExpertRows

    cfg = model.config
    names = gguf_tensor_names(cfg)
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 1
    active = min(1.0, (getattr(cfg, "num_experts_per_tok", None) or n_exp) / n_exp)
    out = {}
    for k, v in model.state_dict().items():
        for hf, part in expert_parts(k, v):
            if isinstance(part, ExpertRows):
                module, proj = hf[:-len(".weight")].rsplit(".", 1)
                out[names.get_name(hf, try_suffixes=(".weight",))] = ExpertSource(module, proj, part, active)
    return out


#: GGUF tensors that get importance-weighted blocks without GPTQ's error feedback. The projections into
#: attention (q, k, v) come out *worse* end to end with it, although their own output error halves, on
#: held-out text too (smollm2-dithered, wikitext-2, 20 windows: Q2_K mix +20.5% perplexity with weighted q/k/v
#: blocks vs +33.8% with GPTQ ones, the rest of the file llama.cpp's; whole files of ours with this rule and
#: the damping below: Q4_K_M +3.90% -> +3.38%, Q5_K_M +2.13% -> +1.36%). A layer-output objective does not
#: see what a small key/query error does to the softmax (the first token's attention sink above all: leaving
#: it out of the Hessian makes GPTQ worse still).
#: Split further (block-by-block writer, 20 windows; all three weighted: Q4_K_M +3.38%, Q2_K +21.55%): GPTQ on
#: v alone gives +4.40% / +39.68%, GPTQ on q and k alone +3.74% / +21.39%.
WEIGHTED_ONLY = (".attn_q.", ".attn_k.", ".attn_v.", ".attn_qkv.")
#: GPTQ's dampening, a fraction of the Hessian's mean diagonal: 0.1 generalizes from the ~10k tokens of
#: calibration text to other text better than the customary 0.01 (lower held-out output error and KL).
GPTQ_DAMP = 0.1
#: rows quantized at once: rows are independent (GPTQ's feedback runs along a row), so a large matrix
#: (the embedding) is done in slices instead of holding several float copies of it
ROW_CHUNK = 4096
#: weights quantized at once per thread (32 MB of float32; a 8192-wide matrix goes 1024 rows at a time)
CHUNK_ELEMENTS = 1 << 23


def add_gram_upper(acc: torch.Tensor, x: torch.Tensor, strips: int = 4) -> None:
    """acc += x^T x on and above the diagonal (below it: whatever the strips' products leave; mirror before
    use). Wide inputs go in row strips, each multiplied only from its diagonal on: ~5/8 of the full product's
    work at four strips."""
    C = x.shape[1]
    if C < 1024:
        acc.addmm_(x.T, x)
        return
    edges = [i * C // strips for i in range(strips + 1)]
    for a, b in zip(edges, edges[1:]):
        acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def quantize_rows(t: str, W: np.ndarray, importance=None, hessian=None, release: bool = False,
                  threads: int = 1) -> np.ndarray:
    """``gguf_blocks.quantize_matrix``'s bytes, a slice of rows at a time (at most ``ROW_CHUNK`` rows and
    ``CHUNK_ELEMENTS`` weights), on ``threads`` threads at once. Rows are independent (GPTQ's feedback runs
    along a row), so the bytes are those of one whole-matrix call whatever the slicing. ``release``: each slice
    of W is dropped from resident memory once encoded (see ``engine.memory``)."""
    rows = W.shape[0]
    step = max(1, min(ROW_CHUNK, CHUNK_ELEMENTS // max(W.shape[1], 1), -(-rows // max(threads, 1))))

    def one(r: int) -> np.ndarray:
        out = gguf_blocks.quantize_matrix(t, W[r:r + step], importance, hessian, damp=GPTQ_DAMP)[0]
        if release:
            release_pages([torch.from_numpy(np.ascontiguousarray(W[r:r + step]))])
        return out

    starts = range(0, rows, step)
    if threads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:    # torch's kernels let go of the GIL: slices run side by side
            parts = list(pool.map(one, starts))
    else:
        parts = [one(r) for r in starts]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, 0)


def writable(src: Source, t: str | None) -> bool:
    return t in gguf_blocks.TYPES and src.shape[1] % gguf_blocks.TYPES[t].block == 0


class EncodedCache:
    """Encoded tensors kept between files written from the same model with the same calibration (the planner's
    candidates): a tensor's bytes depend only on its weights, its type, the method and the full-precision
    model's own activations (never on the other tensors' types), so a later file reuses them. One ``.npy`` per
    (tensor, type), written atomically, so worker processes may share the folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0

    def _path(self, name: str, t: str) -> Path:
        return self.folder / f"{name}.{t}.npy"

    def has(self, name: str, t: str) -> bool:
        return self._path(name, t).exists()

    def get(self, name: str, t: str) -> np.ndarray | None:
        try:
            data = np.load(self._path(name, t))
        except (OSError, ValueError):
            return None
        self.hits += 1
        return data

    def put(self, name: str, t: str, data: np.ndarray) -> None:
        from ..engine import atomic

        with atomic.atomic_path(self._path(name, t)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(data, dtype=np.uint8))


def _encoded(cache: EncodedCache | None, names: list[str], sources: dict, t: str, make) -> dict[str, np.ndarray]:
    """Each name's encoded rows: from ``cache`` where it holds them, the rest made in one ``make(W)`` call over
    their rows (rows are independent) and put in the cache."""
    out = {n: cache.get(n, t) for n in names} if cache else {}
    todo = [n for n in names if out.get(n) is None]
    if todo:
        data = make(np.concatenate([sources[n].matrix() for n in todo], 0) if len(todo) > 1 else sources[todo[0]].matrix())
        row = 0
        for n in todo:
            rows = sources[n].shape[0]
            out[n] = data[row:row + rows]
            row += rows
            if cache:
                cache.put(n, t, out[n])
    return out


class BlockSink:
    """Encoded tensors appended to a scratch file as they are made; ``encoded()`` hands them to write_gguf."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh = open(self.path, "wb")
        self.where: dict[str, tuple[int, tuple, object]] = {}

    def put(self, name: str, data: np.ndarray, t: str) -> None:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        self.where[name] = (self.fh.tell(), data.shape, gguf_blocks.ggml_type(t))
        data.tofile(self.fh)

    def encoded(self) -> dict[str, EncodedTensor]:
        self.fh.close()
        path = self.path

        def load(offset, shape):
            return np.fromfile(path, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
        return {n: EncodedTensor(shape, np.dtype(np.uint8), raw, lambda o=off, s=shape: load(o, s))
                for n, (off, shape, raw) in self.where.items()}

    def close(self) -> None:
        self.fh.close()


def _quantize_block(block, sources, gguf_of, types, sink, method, threads, sum_sq, count, cancelled,
                    cache: EncodedCache | None = None) -> None:
    """Measure one decoder block's linear inputs as the walk runs it, then write its tensors' blocks."""
    from ..engine.imatrix import InputCollector

    mods, experts = block.linears(), block.experts()
    cached = {m for m in mods if cache and m in gguf_of and cache.has(gguf_of[m], types.get(gguf_of[m], ""))}
    # GPTQ's Hessians only where a tensor uses one (not for q/k/v's input: WEIGHTED_ONLY) and is not cached
    needs_hessian = {m for m in mods if method == "gptq" and m in gguf_of and m not in cached
                     and not any(part in gguf_of[m] for part in WEIGHTED_ONLY)}
    acc = InputCollector(needs_hessian.__contains__, gram=add_gram_upper)
    torch.set_num_threads(threads)
    with acc.hooks(mods, experts):
        block.forward()
    acc.done()
    trim_heap()
    sum_sq.update(acc.sum_sq)
    for name, n in acc.count.items():
        count[name] = count.get(name, 0) + n
    torch.set_num_threads(1)
    for name, module in experts.items():
        _quantize_experts(name, module, block.walk.source.config, types, acc, sink, threads)
    key_of, xtx = acc.input_of, acc.xtx
    groups: dict[tuple, list[str]] = {}
    factors: dict[str, tuple] = {}
    for module in mods:
        name = gguf_of.get(module)
        if name is not None and writable(sources[name], types.get(name)):
            weighted = any(part in name for part in WEIGHTED_ONLY)
            groups.setdefault((key_of[module], types[name], weighted), []).append(name)
    torch.set_num_threads(1)      # many small tensor ops: one thread is several times faster
    for (key, t, weighted), names in groups.items():
        if cancelled and cancelled():
            raise RunCancelled()
        n = max(acc.count[key], 1)
        imp = (acc.sum_sq[key] / n).numpy()

        def make(W, key=key, t=t, weighted=weighted, imp=imp, n=n):
            if method != "gptq" or weighted:
                return quantize_rows(t, W, imp, threads=threads)
            # GPTQ: one slice at a time, its large products and fits on torch's threads (a pool of slices is
            # slower: the column loop's many small operations contend for the interpreter)
            torch.set_num_threads(threads)
            try:
                if key not in factors:          # once per input (gate and up may differ in type)
                    factors[key] = gguf_blocks.factor_in_place(gguf_blocks.reversed_hessian(xtx.pop(key), n),
                                                               GPTQ_DAMP)
                return quantize_rows(t, W, imp, factors[key], threads=1)
            finally:
                torch.set_num_threads(1)

        for name, data in _encoded(cache, names, sources, t, make).items():
            sink.put(name, data, t)
        trim_heap()


def _quantize_experts(name: str, experts: torch.nn.Module, config, types: dict, acc, sink, threads: int) -> None:
    """A block's stacked experts into ``sink``, expert by expert, each weighted by the inputs the router sent that
    expert (its importance statistics; GPTQ's Hessian per expert would be a block's worth of memory each, and most
    experts see few calibration tokens). A projection whose type EdgeTailor does not write is left to llama.cpp's
    encoder (``export_calibrated``)."""
    names = gguf_tensor_names(config)
    stacked = {f"{name}.{p}": getattr(experts, p).detach() for p in ("gate_up_proj", "down_proj")}
    for hf_name, part in (x for k, v in stacked.items() for x in expert_parts(k, v)):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        proj = hf_name.rsplit(".", 2)[-2]                         # gate_proj, up_proj, down_proj
        t = types.get(gguf_name)
        if t not in gguf_blocks.TYPES or part.shape[2] % gguf_blocks.TYPES[t].block:
            continue
        parts = []
        for e in range(part.shape[0]):
            key = f"{name}.{e}.{proj}"                            # InputCollector.add_experts' statistics
            imp = (acc.sum_sq[key] / max(acc.count[key], 1)).numpy() if key in acc.sum_sq else None
            parts.append(quantize_rows(t, part.expert(e).float().numpy(), imp, threads=threads))
        sink.put(gguf_name, np.stack(parts), t)
        trim_heap()


def _last_block_to_walk(model, sources: dict, types: dict, cache: EncodedCache | None, n_blocks: int) -> int:
    """How far the calibration must walk: ``n_blocks`` when the output head is to be encoded (its importance is the
    last hidden states') or the model has experts (never cached), else the last block with a tensor ``cache``
    lacks; -1 when ``cache`` holds every tensor (a file whose types an earlier one had)."""
    import re

    todo = [name for name, src in sources.items() if writable(src, types.get(name))
            and not (cache and cache.has(name, types[name]))]
    if cache is None or any(sources[n].module == "lm_head" for n in todo) or expert_sources(model):
        return n_blocks
    blocks = [int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", n) for n in todo) if m]
    return max(blocks, default=-1)


def _head_importance(walk, threads: int, sum_sq: dict, count: dict):
    """The output head's input statistics: the final norm's output over the calibration (kept in ``sum_sq``)."""
    torch.set_num_threads(threads)
    sq, n = None, 0
    for y in walk.final_hidden():
        y = y.reshape(-1, y.shape[-1]).double()
        sq = (y ** 2).sum(0) if sq is None else sq + (y ** 2).sum(0)
        n += y.shape[0]
    sum_sq["lm_head"], count["lm_head"] = sq, n
    return (sq / max(n, 1)).numpy()


# Long by design: one block's pass (run, collect, encode, release) reads in order; each part is a call.
def quantize_blockwise(model, sequences: torch.Tensor | None, types: dict[str, str], sink: BlockSink,
                       method: str = "gptq", batch_size: int = 4,
                       progress: Callable[[float, str], None] | None = None,
                       cancelled: Callable[[], bool] | None = None, cache: EncodedCache | None = None):
    """Quantize every tensor with a type EdgeTailor writes into ``sink``, one decoder block at a time.

    The calibration sequences' hidden states enter block 0; each block's linear inputs are measured as the
    block runs (the full-precision model's own activations, exactly what a whole-model pass sees), its
    tensors are quantized (``gptq``: error feedback through the input Hessian, except ``WEIGHTED_ONLY``
    tensors; ``imatrix``: the importance-weighted search alone), and its outputs feed the next block. The
    output head (and a tied embedding) is weighted by the final norm's output. ``plain`` (no sequences):
    no statistics at all. Returns the importance statistics measured (second moments of every linear
    input, the head's included), to be saved with the run; None for ``plain``. ``cache``: tensors encoded for
    an earlier file of the same model and calibration are taken from it (their Hessians not collected, and the
    walk stops after the last block with a tensor to encode: the statistics then cover the blocks walked).
    """
    # long: the walk's one loop (measure, quantize, feed forward, report) over blocks, then the head
    from ..engine.calibration import decoder_layers
    from ..engine.imatrix import ImportanceStats
    from ..engine.walker import BlockWalk

    sources = tensor_sources(model)
    gguf_of = {src.module: name for name, src in sources.items() if src.module}
    threads = torch.get_num_threads()
    sum_sq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    head_imp = None
    lazy = bool(getattr(model, "is_lazy", False))
    if not lazy:
        was_training = model.training
        model.eval()
        # Start from nothing resident: loading a model whose file is in the page cache maps much of it at once
        # (fault-around), ~270 MB here, which would otherwise stay until each block is done.
        release_pages(p.data for p in model.parameters())
    try:
        n_blocks = len(decoder_layers(model)) if not lazy else int(model.config.num_hidden_layers)
        last = _last_block_to_walk(model, sources, types, cache, n_blocks) if method != "plain" else -1
        if last >= 0:
            walk = BlockWalk(model, sequences, batch_size, cancelled=cancelled,        # reports blocks done, ETA
                             progress=(lambda f, m: progress(f * n_blocks / (n_blocks + 1), m)) if progress else None)
            for block in walk:
                _quantize_block(block, sources, gguf_of, types, sink, method, threads, sum_sq, count, cancelled, cache)
                if not lazy:
                    release_pages(p.data for p in block.module.parameters())     # done with this block's weights
                trim_heap()
                if block.index == last:
                    break
            if last == n_blocks:
                head_imp = _head_importance(walk, threads, sum_sq, count)
            del walk
        torch.set_num_threads(1)
        for name, src in sources.items():
            t = types.get(name)
            if name in sink.where or not writable(src, t):
                continue
            if cancelled and cancelled():
                raise RunCancelled()
            imp = head_imp if src.module == "lm_head" else None
            data = _encoded(cache, [name], sources, t, lambda W, imp=imp: quantize_rows(t, W, imp, release=True,
                                                                                        threads=threads))[name]
            sink.put(name, data, t)
            trim_heap()
        if progress:
            progress(1.0, "quantized")
    finally:
        torch.set_num_threads(threads)
        if not lazy:
            model.train(was_training)
    if method == "plain":
        return None
    return ImportanceStats(sum_sq, count, tokens=int(sequences.numel()))


def export_calibrated(model, tokenizer, tokenizer_dir, out: Path, qtype: str, sequences: torch.Tensor | None,
                      method: str = "gptq", types: dict[str, str] | None = None, progress=None,
                      cancelled=None, cache: EncodedCache | None = None) -> dict:
    """Write ``out`` as a GGUF of llama.cpp's mix ``qtype`` (or the explicit ``types``) with EdgeTailor's blocks.

    ``sequences``: calibration token ids [n, seq_len] (not needed for ``plain``). The returned info holds
    the importance statistics measured on the way (``stats``).
    """
    if method not in ("gptq", "imatrix", "plain"):
        raise EdgeTailorError(f"Unknown calibrated method '{method}'.", "Use gptq, imatrix or plain.")
    if method != "plain" and sequences is None:
        raise EdgeTailorError(f"The {method} method needs calibration text.", "Give calibration sequences.")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgetailor-calibrated-", dir=out.parent) as tmp:
        if types is None:
            if progress:
                progress(0.0, f"llama.cpp's {qtype} type mix")
            types = llama_cpp_types(model, tokenizer, tokenizer_dir, qtype, Path(tmp))
            trim_heap()
        sources = tensor_sources(model)
        missing = sorted(n for n in sources if types.get(n) not in gguf_blocks.TYPES and types.get(n) not in ("F16", "F32"))
        if missing:
            raise EdgeTailorError(f"{qtype} puts types EdgeTailor does not write on {len(missing)} tensors "
                                  f"(e.g. {missing[0]}: {types.get(missing[0])}).",
                                  "Use a k-quant mix (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) or the plain export step.")
        sink = BlockSink(Path(tmp) / "blocks.bin")
        try:
            stats = quantize_blockwise(model, sequences, types, sink, method,
                                       progress=(lambda f, m: progress(0.05 + 0.85 * f, m)) if progress else None,
                                       cancelled=cancelled, cache=cache)
            encoded = sink.encoded()
        finally:
            sink.close()
        for n, src in sources.items():
            if n not in encoded:      # F16/F32 by llama.cpp's choice (rows too short for any block)
                dt = np.dtype(np.float16 if types.get(n) == "F16" else np.float32)
                encoded[n] = EncodedTensor(src.shape, dt, None, lambda src=src, dt=dt: src.matrix().astype(dt))
        from .ggml_quant import encoded_experts

        for n, enc in encoded_experts(model, types, torch.get_num_threads()).items():
            encoded.setdefault(n, enc)     # experts in a type EdgeTailor does not write: llama.cpp's encoder
        info = write_gguf(model, tokenizer, tokenizer_dir, out, qtype, tensor_types=encoded,
                          progress=(lambda f, m: progress(0.9 + 0.1 * f, m)) if progress else None,
                          cancelled=cancelled)
    info.update(type=qtype, quantized_by=f"EdgeTailor {method}",
                tensor_types={n: types.get(n) for n in sources}, stats=stats)
    return info



@dataclass
class Calibration:
    """The GGUF exporter's ``calibration`` option: EdgeTailor's own blocks, fitted on calibration text."""
    sequences: torch.Tensor | None          # calibration token ids [n, seq_len] (None only for method "plain")
    method: str = "gptq"                    # gptq (error feedback through the Hessian), imatrix, plain
    mix: str = "llama.cpp"                  # llama.cpp's types per tensor, or "measured": by measured sensitivity
    target_bytes: int | None = None         # one measured mix of this size, instead of the type's size
    sensitivity: object | None = None       # engine.sensitivity's measurements, when a step shares them
    types: dict | None = None               # each tensor's type, chosen already (the planner's candidates)
    cache: str | None = None                # a folder of tensors encoded for earlier files (``EncodedCache``)

    @property
    def planned(self) -> bool:
        return self.target_bytes is not None or self.mix == "measured"


def require_own_writer(config) -> None:
    """Calibrated blocks go into EdgeTailor's GGUF writer: refuse a model it does not write, before any work."""
    from ..engine.errors import UnsupportedModelError

    if gguf_writer_for(config) != "edgetailor":
        raise UnsupportedModelError(
            f"Calibrated GGUF blocks go into EdgeTailor's own GGUF writer, which does not cover this "
            f"'{config.model_type}' model (its family, or attention/MLP biases).",
            "Use the export step with llama.cpp's types (Q4_K_M, ...) for this model.")


def export_with_calibration(model, tokenizer, tokenizer_dir, out: Path, qtype: str, cal: Calibration,
                            progress=None, cancelled=None) -> dict:
    """A calibrated file of llama.cpp's mix ``qtype``, of a measured mix at its size, or of a size target."""
    require_own_writer(model.config)
    if cal.types is not None:
        return export_calibrated(model, tokenizer, tokenizer_dir, out, qtype, cal.sequences, cal.method,
                                 types=cal.types, progress=progress, cancelled=cancelled,
                                 cache=EncodedCache(cal.cache) if cal.cache else None)
    if cal.planned:
        return export_to_target(model, tokenizer, tokenizer_dir, out, cal.target_bytes, cal.sequences, cal.method,
                                progress=progress, cancelled=cancelled,
                                like=None if cal.target_bytes else qtype, sensitivity=cal.sensitivity)
    return export_calibrated(model, tokenizer, tokenizer_dir, out, qtype, cal.sequences, cal.method,
                             progress=progress, cancelled=cancelled)


def export_to_target(model, tokenizer, tokenizer_dir, out: Path, target_bytes: int | None,
                     sequences: torch.Tensor | None, method: str = "gptq", progress=None, cancelled=None,
                     like: str | None = None, sensitivity=None) -> dict:
    """A GGUF of about ``target_bytes`` (within 2%), each tensor's type chosen by its measured sensitivity.

    ``like``: instead of a byte count, the size of llama.cpp's file of that mix (e.g. Q4_K_M) - the planned
    file is then never larger than llama.cpp's. ``sequences``: the calibration text, for the sensitivity
    pass (``engine.sensitivity``, unless ``sensitivity`` is given) and for the blocks themselves, as in
    ``export_calibrated``.
    """
    from ..engine.sensitivity import measure_sensitivity

    out = Path(out)
    sources, experts = tensor_sources(model), expert_sources(model)
    shapes = {**{n: s.shape for n, s in sources.items()},
              **{n: (s.shape[0] * s.shape[1], s.shape[2]) for n, s in experts.items()}}
    with tempfile.TemporaryDirectory(prefix="edgetailor-plan-", dir=out.parent) as tmp:
        overhead = metadata_bytes(model, tokenizer, tokenizer_dir, Path(tmp))
        if like is not None:
            # the same metadata as llama.cpp's file, so its tensors' bytes are the budget (less worst-case padding)
            llama_types = llama_cpp_types(model, tokenizer, tokenizer_dir, like, Path(tmp))
            budget = sum(tensor_bytes(llama_types[n], shape) for n, shape in shapes.items()) - ALIGN * len(shapes)
            target_bytes = budget + overhead
        else:
            budget = target_bytes - overhead
    if sensitivity is None:
        if sequences is None:
            raise EdgeTailorError("A size target needs calibration text to measure sensitivities.",
                                  "Give calibration sequences.")
        sensitivity = measure_sensitivity(model, sequences, progress=(lambda f, m: progress(0.15 * f, m)) if progress else None,
                                          cancelled=cancelled)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        types = plan_types(sources, sensitivity, budget,
                           progress=(lambda f, m: progress(0.15 + 0.25 * f, m)) if progress else None, cancelled=cancelled,
                           experts=experts)
    finally:
        torch.set_num_threads(threads)
    info = export_calibrated(model, tokenizer, tokenizer_dir, out, like or "Q4_K_M", sequences, method, types=types,
                             progress=(lambda f, m: progress(0.4 + 0.6 * f, m)) if progress else None,
                             cancelled=cancelled)
    info["type"] = f"mixed like {like}" if like else "mixed"
    info["target_bytes"] = int(target_bytes)
    return info

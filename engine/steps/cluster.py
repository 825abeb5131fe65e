"""Weight clustering and sharing: every selected tensor keeps at most k distinct values (a k-entry codebook).

Per tensor, an exact 1-D k-means (Lloyd's algorithm on the sorted values: in one dimension each cluster
is a contiguous run of the sorted values, so an iteration is a binary search of the k-1 boundaries and
prefix sums, O(k log n)), started from equal-mass quantiles. Optionally each weight counts by the
importance of its input channel (E[x_j^2] on calibration text), so the codebook fits the weights that
move the outputs most.

The model keeps the de-clustered values as plain weights, so it exports natively: GGUF and ONNX files
hold them like any other weights (F16 keeps the k values up to F16 rounding; k-quants re-quantize them).
Neither format has a palette type, so the size saving shows only in a palette format: the step writes
one (``palette.safetensors``: packed indices + float16 codebooks per tensor, other tensors in float16),
whose real size is reported, and ``load_palette`` reads it back.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..context import RunContext
from ..errors import EdgeTailorError, RunCancelled
from ..footprint import scratch_bytes, streamed_transform_need
from ..registry import register_step


@dataclass
class ClusterConfig:
    clusters: int = field(default=16, metadata={"help": "codebook entries per tensor (2..256; 16 = 4-bit, 256 = 8-bit indices)"})
    iterations: int = field(default=30, metadata={"help": "Lloyd iterations at most (stops earlier when stable)"})
    activation_weighted: bool = field(default=False, metadata={
        "help": "weight each value by its input channel's E[x^2] on calibration text"})
    include_embeddings: bool = field(default=False, metadata={"help": "also cluster the token embeddings / output head"})
    write_palette: bool = field(default=True, metadata={"help": "write palette.safetensors (indices + codebooks)"})
    calibration_sequences: int = field(default=16, metadata={"help": "calibration sequences (activation-weighted)"})
    calibration_length: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self):
        if not 2 <= self.clusters <= 256:
            raise ValueError("clusters must be between 2 and 256")
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1")


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (weighted) 1-D k-means: (codebook [<=k] ascending, index of each value [same shape, int64])."""
    flat = values.detach().reshape(-1).double()
    order = torch.argsort(flat)
    x = flat[order]
    w = torch.ones_like(x) if weights is None else weights.detach().reshape(-1).double()[order].clamp_min(1e-12)
    cw = torch.cat([x.new_zeros(1), torch.cumsum(w, 0)])
    cwx = torch.cat([x.new_zeros(1), torch.cumsum(w * x, 0)])
    n = x.numel()
    # initial centroids: the weighted means of k equal-mass slices
    cuts = torch.searchsorted(cw, torch.linspace(0, float(cw[-1]), k + 1, dtype=x.dtype)[1:-1].contiguous())
    bounds = torch.cat([torch.tensor([0]), cuts.clamp(0, n), torch.tensor([n])])
    centroids = None
    for _ in range(iterations):
        mass = cw[bounds[1:]] - cw[bounds[:-1]]
        keep = mass > 0
        new = ((cwx[bounds[1:]] - cwx[bounds[:-1]])[keep] / mass[keep])
        if centroids is not None and new.shape == centroids.shape and torch.equal(new, centroids):
            break
        centroids = new
        mids = (centroids[1:] + centroids[:-1]) / 2
        bounds = torch.cat([torch.tensor([0]), torch.searchsorted(x, mids), torch.tensor([n])])
    idx = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat).reshape(values.shape)
    return centroids, idx


def cluster_targets(model, include_embeddings: bool) -> dict[str, nn.Parameter]:
    from ..calibration import decoder_layers

    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"model.layers.{i}.{name}.weight"] = mod.weight
    if include_embeddings:
        emb = model.get_input_embeddings().weight
        out["model.embed_tokens.weight"] = emb
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb:
            out["lm_head.weight"] = head.weight
    return out


def _channel_importance(model, tokenizer, text, cfg, progress, cancelled) -> dict[str, torch.Tensor]:
    from ..calibration import linear_input_stats, token_sequences

    seqs = token_sequences(tokenizer, text, cfg.calibration_length, cfg.calibration_sequences)
    stats = linear_input_stats(model, seqs, progress=progress, cancelled=cancelled)
    return {f"{name}.weight": s.second_moment for name, s in stats.items()}


def cluster_model(model, cfg: ClusterConfig, importance: dict | None = None, progress=None, cancelled=None) -> dict:
    """Replace every target tensor by its k-means de-clustered values (in place); return codebooks + indices."""
    targets = cluster_targets(model, cfg.include_embeddings)
    palette = {}
    for k, (name, p) in enumerate(targets.items()):
        if cancelled and cancelled():
            raise RunCancelled()
        weights = None
        if importance is not None and name in importance:
            weights = importance[name].to(p.dtype)[None, :].expand_as(p)
        codebook, idx = kmeans_1d(p.data, cfg.clusters, cfg.iterations, weights)
        with torch.no_grad():
            p.copy_(codebook.to(p.dtype)[idx])
        palette[name] = (codebook.float(), idx)
        if progress:
            progress((k + 1) / len(targets), f"k-means {k + 1}/{len(targets)}: {name}")
    return palette


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices as uint8 bytes: two per byte for 4 bits or fewer, one per byte up to 8 bits."""
    flat = idx.reshape(-1).to(torch.uint8)
    if bits <= 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return flat[0::2] | (flat[1::2] << 4)
    return flat


def unpack_indices(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits <= 4:
        return torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1)[:numel].long()
    return packed[:numel].long()


class PaletteWriter:
    """``palette.safetensors`` without the model in memory: per clustered tensor ``<name>.indices`` (packed uint8)
    and ``<name>.codebook`` (float16), every other tensor in float16, shapes and k in the metadata. Each block's
    indices and codebooks go to a scratch file as a walk passes (``add``, ``flush``); ``finish`` writes the file
    in one pass, its header first, then one tensor at a time."""

    def __init__(self, scratch: Path, k: int):
        self.scratch, self.k, self.bits = Path(scratch), k, index_bits(k)
        self.pending: dict[str, torch.Tensor] = {}
        self.where: dict[str, Path] = {}          # "<name>.indices" / "<name>.codebook" -> scratch file
        self.shapes: dict[str, list[int]] = {}
        self.codebook_entries = 0               # over all clustered tensors (their float16 codebooks)
        self.most_distinct = 0

    def add(self, name: str, codebook: torch.Tensor, idx: torch.Tensor) -> None:
        self.pending[f"{name}.indices"] = pack_indices(idx, self.bits).contiguous()
        self.pending[f"{name}.codebook"] = codebook.half().contiguous()
        self.shapes[name] = list(idx.shape)
        self.codebook_entries += len(codebook)
        self.most_distinct = max(self.most_distinct, len(codebook))

    def flush(self, key: str) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"{key}.safetensors"
        save_file(self.pending, str(path))
        self.where.update(dict.fromkeys(self.pending, path))
        self.pending = {}

    def finish(self, state: dict, path) -> None:
        """The file at ``path`` (a temporary path of ``RunContext.artifact``) from the clustered model's
        ``state`` (tensors or lazy tensors; a tied tensor is stored once)."""
        import json
        import struct

        from safetensors import safe_open

        from ..lazy import read_header

        self.flush("last")
        entries, seen = [], set()               # (key, dtype, shape, bytes of the tensor when written)
        for name, t in state.items():
            ident = t.data_ptr() if isinstance(t, torch.Tensor) else id(t)
            if ident in seen or name.endswith("rotary_emb.inv_freq"):
                continue
            seen.add(ident)
            if name in self.shapes:
                for key in (f"{name}.indices", f"{name}.codebook"):
                    info = read_header(self.where[key])[key]
                    entries.append((key, info["dtype"], info["shape"],
                                    lambda key=key: _raw(safe_open(str(self.where[key]), "pt").get_tensor(key))))
            else:
                entries.append((name, "F16", list(t.shape), lambda t=t: _raw(_loaded(t).detach().half())))
        header, offset = {}, 0
        for key, dtype, shape, _ in entries:
            n = math.prod(shape) * (2 if dtype == "F16" else 1)
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "edgetailor-palette", "clusters": str(self.k),
                                  "index_bits": str(self.bits), "shapes": json.dumps(self.shapes)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for _, _, _, data in entries:
                fh.write(data())


def _loaded(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.load()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def write_palette(model, palette: dict, k: int, path, scratch: Path) -> None:
    """The palette file of a model held in memory, its codebooks and indices from ``cluster_model``."""
    writer = PaletteWriter(scratch, k)
    for name, (codebook, idx) in palette.items():
        writer.add(name, codebook, idx)
    writer.finish(model.state_dict(), path)


def load_palette(path) -> dict[str, torch.Tensor]:
    """A palette file back as a plain state dict (float32)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        if (meta or {}).get("format") != "edgetailor-palette":
            raise EdgeTailorError(f"{path} is not an EdgeTailor palette file.", "Pick a palette.safetensors from a cluster.kmeans run.")
        bits, shapes = int(meta["index_bits"]), json.loads(meta["shapes"])
        out = {}
        for key in f.keys():
            if key.endswith(".codebook"):
                continue
            if key.endswith(".indices"):
                name = key[: -len(".indices")]
                shape = shapes[name]
                idx = unpack_indices(f.get_tensor(key), bits, math.prod(shape)).reshape(shape)
                out[name] = f.get_tensor(f"{name}.codebook").float()[idx]
            else:
                out[key] = f.get_tensor(key).float()
    return out


def _cluster_need(cfg: ClusterConfig, shape):
    """Streamed (decoder blocks only): one block, the calibration walk when activation-weighted, and the 1-D
    k-means of the block's largest matrix (its values sorted in float64 with their order, weights, prefix sums
    and the indices found)."""
    if cfg.include_embeddings:
        return None
    tokens = cfg.calibration_sequences * cfg.calibration_length if cfg.activation_weighted else 0
    need = streamed_transform_need("cluster.kmeans", shape, tokens, cfg.calibration_length)
    largest = max(shape.intermediate, shape.q_dim) * shape.hidden
    # measured: 7.0 float64 copies of a 8192 x 2048 matrix over the process before (``kmeans_1d`` with weights)
    need.parts["k-means of its largest matrix (float64)"] = largest * 8 * 7
    need.ram_bytes += largest * 8 * 7 - need.parts["scores of its largest matrix"]
    return need


def _cluster_disk(cfg: ClusterConfig, shape) -> float:
    """The clustered blocks in fp32 (scratch) and the palette: its indices and codebooks in scratch while the walk
    runs, then the file (the other tensors in float16)."""
    blocks = max(shape.params - shape.embedding_params, 0)
    palette = blocks * index_bits(cfg.clusters) / 8 * 2 + shape.embedding_params * 2 if cfg.write_palette else 0
    return scratch_bytes(shape, exact=False) + palette


@register_step("cluster.kmeans", ClusterConfig, kind="transform",
               summary="Per-tensor k-means weight clustering (16 or 256 shared values per tensor), palette file",
               exports="GGUF and ONNX natively as plain weights (the k values per tensor are kept; no palette "
                       "type in those formats, so no size saving there); palette.safetensors holds the real "
                       "compressed form (indices + codebooks)",
               streamed_ram=_cluster_need, disk_bytes=lambda cfg, shape: _cluster_disk(cfg, shape))
def cluster_kmeans(ctx: RunContext, cfg: ClusterConfig) -> None:
    writer = PaletteWriter(ctx.record.folder / "scratch" / "palette", cfg.clusters)
    if cfg.include_embeddings:          # the embeddings and the head are not decoder blocks: the model is held
        _cluster_held(ctx, cfg, writer)
    else:
        _cluster_streamed(ctx, cfg, writer)
    _finish(ctx, cfg, writer)


def _cluster_streamed(ctx: RunContext, cfg: ClusterConfig, writer: PaletteWriter) -> None:
    """Block by block: the block's inputs measured first (activation-weighted: the untouched blocks' outputs feed
    the next, as one pass over the source would), then its linear layers clustered and kept."""
    from ..calibration import recording_channel_stats, token_sequences

    torch.set_num_threads(ctx.options.resolved_threads())
    seqs = (token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.calibration_length,
                            cfg.calibration_sequences) if cfg.activation_weighted else None)
    walk = ctx.transform_walk(seqs)
    for block in walk:
        linears = block.linears()
        importance = {}
        if seqs is not None:
            with recording_channel_stats(linears) as stats:
                block.forward()
            importance = {name: stats[name].second_moment for name in linears}
        for name, lin in linears.items():
            weights = importance[name].to(lin.weight.dtype)[None, :].expand_as(lin.weight) if importance else None
            codebook, idx = kmeans_1d(lin.weight.data, cfg.clusters, cfg.iterations, weights)
            with torch.no_grad():
                lin.weight.copy_(codebook.to(lin.weight.dtype)[idx])
            writer.add(f"{name}.weight", codebook.float(), idx)
        block.keep(linears)
        writer.flush(f"block-{block.index:05d}")
    ctx.mark_applied(_label(cfg), walk.result())


def _cluster_held(ctx: RunContext, cfg: ClusterConfig, writer: PaletteWriter) -> None:
    importance = None
    if cfg.activation_weighted:
        importance = _channel_importance(ctx.model, ctx.tokenizer, ctx.calibration_text(), cfg,
                                         lambda f, m: ctx.progress(0.2 * f, m), ctx.cancel.is_set)
    palette = cluster_model(ctx.model, cfg, importance,
                            lambda f, m: ctx.progress(0.2 + 0.7 * f, m), ctx.cancel.is_set)
    for name, (codebook, idx) in palette.items():
        writer.add(name, codebook, idx)
    ctx.mark_applied(_label(cfg))


def _label(cfg: ClusterConfig) -> str:
    return f"km{cfg.clusters}" + ("a" if cfg.activation_weighted else "")


def _finish(ctx: RunContext, cfg: ClusterConfig, writer: PaletteWriter) -> None:
    clustered = sum(math.prod(shape) for shape in writer.shapes.values())
    codebooks = writer.codebook_entries
    bits = index_bits(cfg.clusters)
    report = {"clusters": cfg.clusters, "tensors": len(writer.shapes), "clustered_weights": clustered,
              "index_bits": bits, "bits_per_weight": round((clustered * bits + 16 * codebooks) / clustered, 4),
              "max_distinct_values": writer.most_distinct}
    label = _label(cfg)
    if cfg.write_palette:
        name = f"{ctx.source.display_name}-{ctx.current_variant_name()}-palette.safetensors"
        with ctx.artifact(name) as tmp:
            writer.finish(ctx.weights().state_dict(), tmp)
        report["palette_file_bytes"] = (ctx.record.artifacts_dir / name).stat().st_size
        report["palette_file"] = name
    shutil.rmtree(writer.scratch, ignore_errors=True)        # the per-block pieces (now in the file, if one)
    ctx.report(**report)
    ctx.log(f"{label}: {len(writer.shapes)} tensors, {clustered:,} weights at {report['bits_per_weight']:.3f} bits "
            f"each (index {bits} bits + float16 codebook)"
            + (f"; palette file {report['palette_file_bytes'] / 1e6:.1f} MB" if cfg.write_palette else ""))
    ctx.progress(1.0, f"{label}: clustered")

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
from dataclasses import dataclass, field

import torch
from torch import nn

from ..context import RunContext
from ..errors import EdgeTailorError, RunCancelled
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


def write_palette(model, palette: dict, k: int, path) -> None:
    """Palette file: per clustered tensor ``<name>.indices`` (packed uint8) + ``<name>.codebook`` (float16);
    every other tensor in float16; shapes and k in the metadata."""
    import json

    from safetensors.torch import save_file

    bits = index_bits(k)
    tensors, shapes = {}, {}
    seen = set()                      # tied tensors (embeddings = output head) are stored once
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or name.endswith("rotary_emb.inv_freq"):
            continue
        seen.add(t.data_ptr())
        if name in palette:
            codebook, idx = palette[name]
            tensors[f"{name}.indices"] = pack_indices(idx, bits).contiguous()
            tensors[f"{name}.codebook"] = codebook.half().contiguous()
            shapes[name] = list(idx.shape)
        else:
            tensors[name] = t.detach().half().contiguous().clone()
    save_file(tensors, str(path), metadata={"format": "edgetailor-palette", "clusters": str(k),
                                            "index_bits": str(bits), "shapes": json.dumps(shapes)})


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


@register_step("cluster.kmeans", ClusterConfig, kind="transform",
               summary="Per-tensor k-means weight clustering (16 or 256 shared values per tensor), palette file",
               exports="GGUF and ONNX natively as plain weights (the k values per tensor are kept; no palette "
                       "type in those formats, so no size saving there); palette.safetensors holds the real "
                       "compressed form (indices + codebooks)")
def cluster_kmeans(ctx: RunContext, cfg: ClusterConfig) -> None:
    importance = None
    if cfg.activation_weighted:
        importance = _channel_importance(ctx.model, ctx.tokenizer, ctx.calibration_text(), cfg,
                                         lambda f, m: ctx.progress(0.2 * f, m), ctx.cancel.is_set)
    palette = cluster_model(ctx.model, cfg, importance,
                            lambda f, m: ctx.progress(0.2 + 0.7 * f, m), ctx.cancel.is_set)
    clustered = sum(idx.numel() for _, idx in palette.values())
    bits = index_bits(cfg.clusters)
    codebook_bits = 16 * sum(len(c) for c, _ in palette.values())
    report = {"clusters": cfg.clusters, "tensors": len(palette), "clustered_weights": clustered,
              "index_bits": bits, "bits_per_weight": round((clustered * bits + codebook_bits) / clustered, 4),
              "max_distinct_values": max(len(c) for c, _ in palette.values())}
    label = f"km{cfg.clusters}" + ("a" if cfg.activation_weighted else "")
    ctx.mark_applied(label)
    if cfg.write_palette:
        name = f"{ctx.source.display_name}-{ctx.current_variant_name()}-palette.safetensors"
        with ctx.artifact(name) as tmp:
            write_palette(ctx.model, palette, cfg.clusters, tmp)
        report["palette_file_bytes"] = (ctx.record.artifacts_dir / name).stat().st_size
        report["palette_file"] = name
    ctx.report(**report)
    ctx.log(f"{label}: {len(palette)} tensors, {clustered:,} weights at {report['bits_per_weight']:.3f} bits each "
            f"(index {bits} bits + float16 codebook)"
            + (f"; palette file {report['palette_file_bytes'] / 1e6:.1f} MB" if cfg.write_palette else ""))
    ctx.progress(1.0, f"{label}: clustered")

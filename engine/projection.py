"""What a variant needs on a device: predicted memory, projected decode speed and energy per token.

Memory (predicted) = weights the runtime keeps resident
                   + KV cache at the chosen context (2 x layers x kv heads x head dim x tokens x bytes/element;
                     llama.cpp allocates f16 for its whole context, transformers grows an fp32 cache)
                   + runtime overhead, measured per runtime on this machine (``measure_overhead``: a one-layer
                     model with the variant's own vocabulary and tokenizer runs the same benchmark; overhead =
                     its peak minus its weights and KV cache)
  GGUF weights: every tensor byte (llama.cpp maps the file; a forward pass touches every weight except the
  token-embedding rows it does not look up, unless the embedding doubles as the output matrix), plus the
  copies llama.cpp's CPU backend makes when it repacks matrices for its SIMD kernels (ggml-cpu/repack.cpp:
  Q4_0, Q4_K and IQ4_NL matrices whose row count is a multiple of 8, not the token embedding; the mapped
  originals were read to make them, so both stay resident) when this llama.cpp build reports REPACK = 1.
  torch weights: parameters x bytes of the load dtype.

Decode speed (projected): per token, the roofline time max(bytes read / bandwidth, FLOPs / compute) with the
device profile's bandwidth and compute (measured ones for this machine), plus, on this machine, the runtime's
fixed latency per token measured on the same probe (its decode time per token minus its own roofline time);
energy per token (projected) = the profile's typical power / projected tokens per second. Every figure is labelled "predicted"/"projected".

The measurements these predictions use (the runtime's overhead, its decode cost model) are made on probes by
``engine/probes.py``; this module is the arithmetic only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .architectures import ModelDims
from .errors import EdgeTailorError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class WeightsInfo:
    """What a forward pass of one token reads and computes, and what stays resident."""

    fmt: str
    resident_bytes: int          # weights in memory while it runs
    bytes_per_token: int         # weight bytes read per generated token
    matmul_params: int           # weights multiplied per token (FLOPs = 2 x this + attention)
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_vocab: int
    repacked_bytes: int = 0      # llama.cpp: copies of repacked matrices, resident beside the mapped file
    type_elements: dict = field(default_factory=dict)   # the blocks' multiplied weights per storage type (Q4_K, ...)
    head_type: str = ""          # storage type of the output matrix (the token embedding when tied)
    head_elements: int = 0

    def storage_types(self) -> set[str]:
        return set(self.type_elements) | ({self.head_type} if self.head_type else set())

    def to_dict(self) -> dict:
        return asdict(self)


def gguf_info(path: str | Path, tokens_used: int = 0) -> WeightsInfo:
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def field(key, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else default

    tensors = {t.name: t for t in r.tensors}
    total = sum(int(t.n_bytes) for t in r.tensors)
    emb = tensors.get("token_embd.weight")
    tied = "output.weight" not in tensors
    n_vocab = int(emb.shape[-1]) if emb is not None else int(field("vocab_size", 0))
    two_d = [t for t in r.tensors if len(t.shape) >= 2 and int(t.shape[1]) > 1]
    used, count = int(field("expert_used_count", 0) or 0), int(field("expert_count", 0) or 0)

    def active(t) -> float:          # a mixture's stacked experts: a token reads k of E
        return used / count if count and "_exps." in t.name else 1.0

    unread = sum(int(t.n_bytes) * (1 - active(t)) for t in r.tensors)
    matmul = sum(int(t.n_elements * active(t)) for t in two_d if tied or t.name != "token_embd.weight")
    emb_bytes = int(emb.n_bytes) if emb is not None else 0
    if tied:
        per_token, resident = total, total
    else:
        row = emb_bytes // max(n_vocab, 1)
        per_token = total - emb_bytes + row
        resident = total - emb_bytes + row * min(n_vocab, tokens_used)
    per_token = int(per_token - unread)
    repacked = 0
    if llama_cpp_repacks():
        repacked = sum(int(t.n_bytes) for t in two_d if t.name != "token_embd.weight"
                       and t.tensor_type.name in REPACKED_TYPES and int(t.shape[1]) % 8 == 0)
    types: dict[str, int] = {}
    for t in two_d:
        if t.name.startswith("blk."):
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements * active(t))
    head = tensors.get("output.weight", emb)
    n_head = int(field("attention.head_count"))
    n_embd = int(field("embedding_length"))
    return WeightsInfo("gguf", resident + repacked, per_token, matmul, int(field("block_count")), n_head,
                       int(field("attention.head_count_kv", n_head)),
                       int(field("attention.key_length", n_embd // n_head)), n_vocab, repacked, types,
                       head.tensor_type.name if head is not None else "", int(head.n_elements) if head is not None else 0)


REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL")


def llama_cpp_repacks() -> bool:
    """Whether this llama.cpp build repacks weights for its CPU kernels (its system info says REPACK = 1)."""
    try:
        import llama_cpp

        return b"REPACK = 1" in llama_cpp.llama_print_system_info()
    except (ImportError, AttributeError):
        return False


def hf_info(folder: str | Path, dtype: str = "float32") -> WeightsInfo:
    from .preflight import safetensors_parameter_count

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    counted = safetensors_parameter_count(folder)
    if not counted:
        raise EdgeTailorError(f"{folder} has no safetensors weights to size.", "Use a safetensors model folder.")
    params = counted[0]
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    params_model = params          # a tied matrix is saved (and held) once
    bpe = DTYPE_BYTES[dtype]
    dims = ModelDims.of(cfg)
    emb = vocab * h
    matmul = params_model - (0 if tied else emb) - _norm_params(cfg)
    per_token = (params_model if tied else params_model - emb + h) * bpe
    return WeightsInfo("torch", params_model * bpe, per_token, matmul, dims.layers, dims.heads, dims.kv_heads,
                       dims.head_dim, vocab,
                       type_elements={TORCH_TYPE[dtype]: matmul - vocab * h}, head_type=TORCH_TYPE[dtype],
                       head_elements=vocab * h)


TORCH_TYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _norm_params(cfg: dict) -> int:
    """RMSNorm weights: two per layer and the final one (not multiplied as matrices)."""
    return int(cfg["hidden_size"]) * (2 * int(cfg["num_hidden_layers"]) + 1)


def onnx_info(folder: str | Path) -> WeightsInfo:
    """An exported ONNX folder: its initializers' bytes (onnxruntime loads them all) and what its CPU kernels add
    when they pre-pack MatMulNBits (MLAS keeps a float per block beside the scales; a head that a
    GatherBlockQuantized also reads keeps its original), the float embedding table read one row per token, and
    the shapes from ``genai_config.json``."""
    import onnx

    folder = Path(folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    size = {i.name: math.prod(i.dims) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
            for i in proto.graph.initializer}
    total = sum(size.values())
    table = 0           # a float Gather table is read one row per token
    matmul = packed = 0
    for n in proto.graph.node:
        if n.op_type == "Gather" and n.input[0] in size:
            table = size[n.input[0]]
        elif n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            matmul += attrs["K"] * attrs["N"]
            packed += size.get(n.input[2], 0)                       # one float per block: the scales' size
        elif n.op_type in ("MatMul", "MatMulInteger") and len(n.input) > 1 and n.input[1] in size:
            matmul += math.prod(dims[n.input[1]])
    if any(n.op_type == "GatherBlockQuantized" for n in proto.graph.node):      # the head's original stays too
        head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
        packed += size[head.input[1]] + size[head.input[2]]
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    dec, vocab = genai["decoder"], genai.get("vocab_size", 0)
    row = table // max(int(vocab), 1) if vocab else 0
    return WeightsInfo("onnx", total + packed, total - table + row, matmul, int(dec["num_hidden_layers"]),
                       int(dec["num_attention_heads"]), int(dec["num_key_value_heads"]), int(dec["head_size"]),
                       int(vocab), repacked_bytes=packed)


def variant_info(fmt: str, path: str | Path, dtype: str = "float32", tokens_used: int = 0) -> WeightsInfo:
    if fmt == "gguf":
        return gguf_info(path, tokens_used)
    if fmt == "torch":
        return hf_info(path, dtype)
    if fmt == "onnx":
        return onnx_info(path)
    raise EdgeTailorError(f"Memory prediction does not know the format '{fmt}' yet.",
                          "Benchmark it to measure its memory.")


def kv_cache_bytes(info: WeightsInfo, tokens: int, bytes_per_element: int) -> int:
    return 2 * info.n_layer * info.n_kv_head * info.head_dim * tokens * bytes_per_element


def kv_plan(fmt: str, n_ctx: int, tokens_used: int, dtype: str = "float32") -> tuple[int, int, str]:
    """(tokens the cache holds, bytes per element, how) for a runtime."""
    if fmt == "gguf":
        return n_ctx, 2, f"llama.cpp f16 KV cache for the whole context ({n_ctx} tokens)"
    if fmt == "onnx":
        return tokens_used, DTYPE_BYTES.get(dtype, 4), f"onnxruntime's present -> past cache in {dtype}, grown to {tokens_used} tokens"
    return tokens_used, DTYPE_BYTES.get(dtype, 4), f"transformers cache in {dtype}, grown to {tokens_used} tokens"


def predict_memory(info: WeightsInfo, n_ctx: int, tokens_used: int, overhead_bytes: int | None,
                   dtype: str = "float32") -> dict:
    tokens, bpe, how = kv_plan(info.fmt, n_ctx, tokens_used, dtype)
    kv = kv_cache_bytes(info, tokens, bpe)
    total = info.resident_bytes + kv + (overhead_bytes or 0)
    return {"predicted_memory_bytes": int(total), "predicted_weights_bytes": info.resident_bytes,
            "predicted_kv_bytes": kv, "predicted_overhead_bytes": overhead_bytes,
            "predicted_memory_method": f"predicted: weights {info.resident_bytes / 1e6:.1f} MB"
            + (f" (incl. {info.repacked_bytes / 1e6:.1f} MB repacked by llama.cpp)" if info.repacked_bytes else "")
            + f" + KV {kv / 1e6:.1f} MB ({how}) + runtime overhead "
            + (f"{overhead_bytes / 1e6:.1f} MB measured on this machine" if overhead_bytes is not None
               else "not measured")}


def flops_per_token(info: WeightsInfo, position: int) -> float:
    """2 FLOPs per multiplied weight, plus attention over ``position`` cached tokens (QK and AV)."""
    return 2.0 * info.matmul_params + 4.0 * info.n_layer * info.n_head * info.head_dim * position


def project_decode(profile, info: WeightsInfo, position: int, kv_bytes_per_element: int = 2,
                   token_latency_s: float = 0.0, decode_model: dict | None = None, kv_type: str = "f16") -> dict:
    """Decode speed of ``info`` on ``profile`` at a context position, and its energy per token.

    Per token: the roofline time max(bytes read / bandwidth, FLOPs / compute), and, with a ``decode_model``
    (``measure_decode_model``: this runtime's measured cost per weight of each storage type, per layer and per
    token on this machine), the larger of that and the weights' kernel time (here, where the probes spanned the
    model's whole depth, the kernel time alone), plus the runtime's fixed and per-layer costs. On another device
    the measured times are scaled by this machine's compute over the device's. The decode model's ``kv_layer_s`` adds the llama.cpp KV-cache type's own cost per layer (``kv_type``:
    quantized caches run flash attention). Without a decode model: roofline + ``token_latency_s`` (0 for other
    devices).
    """
    kv_read = kv_cache_bytes(info, position, kv_bytes_per_element)
    bytes_tok = info.bytes_per_token + kv_read
    flops = flops_per_token(info, position)
    t_bw = bytes_tok / (profile.memory_bandwidth_gbs * 1e9)
    t_compute = flops / (profile.compute_gflops * 1e9)
    roof = max(t_bw, t_compute)
    bound = "memory bandwidth" if t_bw >= t_compute else "compute"
    method = (f"projected: roofline max({bytes_tok / 1e6:.1f} MB / {profile.memory_bandwidth_gbs:g} GB/s, "
              f"{flops / 1e9:.3f} GFLOP / {profile.compute_gflops:g} GFLOP/s)")
    kernels = kernel_seconds(info, decode_model) if decode_model else None
    if kernels is not None:
        from .devices import HOST_ID

        scale = 1.0 if profile.id == HOST_ID else decode_model["host_gflops"] / profile.compute_gflops
        t_kernels = scale * kernels
        per_layer = decode_model["per_layer_s"] + decode_model.get("kv_layer_s", {}).get(kv_type, 0.0)
        t_fixed = scale * (decode_model["fixed_s"] + info.n_layer * per_layer)
        # here, rates measured on probes as deep as the model already carry the memory system as the model meets it
        # (a cache larger than the file beats the bandwidth roofline): they replace the roofline
        measured_depth = scale == 1.0 and decode_model.get("whole_depth", False)
        if t_kernels > roof or measured_depth:
            roof, bound = t_kernels, "kernel throughput"
        t_tok = t_fixed + roof
        where = "" if scale == 1 else f", scaled by compute {decode_model['host_gflops']:g}/{profile.compute_gflops:g}"
        method += (f" vs weight kernels {1000 * t_kernels:.2f} ms ({', '.join(sorted(info.storage_types()))} at rates "
                   f"measured on this machine at this model's shapes{where}), + {1000 * t_fixed:.2f} ms per token for "
                   f"the runtime ({info.n_layer} layers, {kv_type} KV cache)")
    else:
        t_tok = token_latency_s + roof
        if token_latency_s:
            method += f" + {token_latency_s * 1000:.2f} ms runtime latency per token (measured)"
    tps = 1.0 / t_tok
    return {"decode_tps": tps, "bound": bound, "roofline_tps": 1.0 / max(t_bw, t_compute), "bytes_per_token": bytes_tok,
            "flops_per_token": flops, "j_per_token": profile.power_typical_w / tps,
            "method": f"{method} on '{profile.id}'; energy = {profile.power_typical_w:g} W typical power / tok/s"}


def device_speed(measured_tps: float, info: WeightsInfo, device, host, position: int,
                 kv_bytes_per_element: float = 2) -> tuple[float, str]:
    """A file's decode speed on ``device`` from its speed measured here: the device's roofline for the file times
    the efficiency reached here (measured / this machine's roofline), at most 1 - a speed above the roofline here
    comes from this machine's caches holding part of the weights, which a device's small caches do not."""
    there = project_decode(device, info, position, kv_bytes_per_element)["roofline_tps"]
    here = project_decode(host, info, position, kv_bytes_per_element)["roofline_tps"]
    efficiency = min(1.0, measured_tps / here)
    return there * efficiency, (f"projected: the device's roofline {there:.1f} tok/s x the efficiency measured here "
                                f"{efficiency:.2f} ({measured_tps:.1f} tok/s over this machine's roofline {here:.1f}, "
                                f"at most 1) on '{device.id}'")


def kernel_seconds(info: WeightsInfo, decode_model: dict) -> float | None:
    """Time per token in the weight kernels: the blocks' matrices at each type's measured per-layer rate, the
    head at the head rate of its type (the block rate where none was measured); None if a type has no rate."""
    layer, head = decode_model.get("layer_rates", {}), decode_model.get("head_rates", {})
    if not info.type_elements or any(t not in layer for t in info.type_elements):
        return None
    t = sum(n / layer[k] for k, n in info.type_elements.items())
    if info.head_elements:
        rate = head.get(info.head_type) or layer.get(info.head_type)
        if rate is None:
            return None
        t += info.head_elements / rate
    return t


def project(profile, info: WeightsInfo, n_ctx: int, tokens_used: int, overhead: dict | None,
            dtype: str = "float32", decode_model: dict | None = None) -> dict:
    """Everything the fit check needs for one variant on one device (memory, decode tok/s, J/token).

    ``overhead`` is ``measure_overhead``'s entry: its memory applies everywhere (the same runtime), its
    per-token latency only to this machine, where it was measured. ``decode_model``: see ``project_decode``.
    """
    from .devices import HOST_ID

    mem = predict_memory(info, n_ctx, tokens_used, overhead["overhead_bytes"] if overhead else None, dtype)
    kv_bpe = kv_plan(info.fmt, n_ctx, tokens_used, dtype)[1]
    latency = overhead.get("token_latency_s", 0.0) if overhead and profile.id == HOST_ID else 0.0
    dec = project_decode(profile, info, tokens_used, kv_bpe, latency, decode_model)
    return {"device": profile.id, "memory_bytes": mem["predicted_memory_bytes"], "decode_tps": dec["decode_tps"],
            "j_per_token": dec["j_per_token"], "bound": dec["bound"], "memory_method": mem["predicted_memory_method"],
            "decode_method": dec["method"]}

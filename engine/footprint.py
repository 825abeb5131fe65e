"""What each step of a recipe needs in RAM, from the model's shape alone (its config and file headers; nothing loads).

Two kinds of step:

* steps that read the **model from its files** — GGUF export (tensor by tensor), ``imatrix`` and
  ``quant.gguf_calibrated`` (the block walker, ``engine.walker``), and the transforms streamed block by block
  (pruning of every kind, AWQ scaling, k-means clustering: their changed blocks go to the run's scratch on disk, which the next
  steps read in turn) — need the process, one decoder block and what their algorithm holds (GPTQ's Hessian
  factors, the calibration hidden states, the output head);
* every other step, and every step after the first one that holds the model, holds the **fp32 model** times
  the step's own multiple (gradients, a teacher, copies), as registered with the step.

``recipe_needs`` walks a recipe in order and gives one ``StepNeed`` per step; pre-flight shows them (CLI and
the GUI's model card) and checks the largest against the machine. The parts of each figure are named in
``StepNeed.parts`` so a user sees where the memory goes; ``bench/calibrated_streaming.py`` compares them with
measured peaks.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1024**3
MB = 1024**2
#: a file tensor of one expert (``mlp.experts.7.up_proj``, Mixtral's ``experts.7.w3``)
EXPERT_FILE_NAME = re.compile(r"\.experts\.\d+\.")
#: the worker process before any weight is read: Python, torch, transformers, the tokenizer, llama.cpp's library
#: (measured at a step's start, ``ram_peak_bytes`` of a run on stories260K: 0.39 GB exporting, 0.42 GB calibrating)
PROCESS_BYTES = 420 * MB
#: the calibration tokens a walk takes when the recipe does not limit them (the bundled calibration text: 21
#: sequences of 512 tokens with the demo's tokenizer)
DEFAULT_CALIBRATION_TOKENS = 21 * 512
#: batch of calibration sequences run through a block at once (``engine.walker.BlockWalk``'s default)
WALK_BATCH = 4


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory depends on, read from a config dict and the safetensors headers."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    q_dim: int                      # attention heads x head_dim (o_proj's input width)
    block_params: int               # one decoder block
    largest_tensor_params: int
    streamable: bool                # safetensors files the writers and the walker read lazily
    kv_dim: int = 0                 # key/value heads x head_dim (k_proj's and v_proj's output width)
    heads: int = 1                  # attention heads
    embedding_params: int = 0       # input embeddings + an untied output head
    transformed: bool = False       # as a step after a transform sees it (its reference is walked, not loaded)
    stored_bytes: int = 0           # the weights as their files store them (bf16: 2 bytes a weight)
    onnx_graph: bool = False        # EdgeTailor's own ONNX graph covers the family (written layer by layer)
    gguf_own_writer: bool = False   # EdgeTailor's GGUF writer covers the family (k-quants encoded as written)
    experts: int = 0                # experts per block of a mixture of experts (0: dense)

    @property
    def stored_bytes_per_weight(self) -> float:
        return self.stored_bytes / self.params if self.params and self.stored_bytes else 4.0

    @property
    def fp32_bytes(self) -> int:
        return self.params * 4

    @classmethod
    def from_config(cls, cfg: dict, folder: Path | None = None, params_total: int | None = None) -> "ModelShape":
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        h = int(text.get("hidden_size") or 0)
        inter = int(text.get("intermediate_size") or 4 * h)
        layers = max(int(text.get("num_hidden_layers") or 1), 1)
        vocab = int(text.get("vocab_size") or 0)
        from .architectures import ModelDims

        q_dim = ModelDims.of(cfg).q_dim
        largest, total, stored = 0, params_total or 0, 0
        streamable = bool(folder and any(Path(folder).glob("*.safetensors")))
        if streamable:
            from .lazy import read_header

            counted, stacked = 0, {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                for name, info in read_header(f).items():
                    n = 1
                    for d in info["shape"]:
                        n *= int(d)
                    largest, counted = max(largest, n), counted + n
                    stored += info["data_offsets"][1] - info["data_offsets"][0]
                    expert = EXPERT_FILE_NAME.search(name)     # a GGUF file stacks the experts into one tensor
                    if expert:
                        key = name[:expert.start()] + name[expert.end():]
                        stacked[key] = stacked.get(key, 0) + n
            largest = max([largest, *stacked.values()])
            total = total or counted
        embedding = vocab * h * (1 if cfg.get("tie_word_embeddings", text.get("tie_word_embeddings")) else 2)
        block = max((total - embedding) // layers, 0) if total else 3 * h * inter + 4 * h * h
        dims = ModelDims.of(cfg)
        from .architectures import arch_spec, gguf_writer_for

        spec = arch_spec(str(cfg.get("model_type", "")))
        return cls(total, h, inter, layers, vocab, q_dim, block, largest or vocab * h, streamable,
                   dims.kv_heads * dims.head_dim, dims.heads, dims.vocab * dims.hidden * (1 if dims.tied else 2),
                   stored_bytes=stored,
                   onnx_graph=bool(spec and spec.onnx == "edgetailor"),
                   gguf_own_writer=gguf_writer_for(cfg) == "edgetailor",
                   experts=int(text.get("num_local_experts") or text.get("num_experts") or 0))


@dataclass
class StepNeed:
    step: str
    ram_bytes: int                             # memory the step itself holds: it must fit
    how: str                                   # in words: what the step holds
    parts: dict = field(default_factory=dict)  # name -> bytes, the figure's terms
    #: a file the step maps and reads whole, more than once (the check's 16-bit reference GGUF in llama.cpp): its
    #: pages are resident while it runs and count in the process's RSS, but the kernel takes them back when memory
    #: is short and they are read from disk again - slower, never a failure, so pre-flight does not require them
    mapped_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


#: a step that loads the model through transformers: the process plus what loading leaves besides the weights
#: (rounded up from this project's measurements)
LOADED_OVERHEAD_BYTES = 1 * GB


def whole_model(step: str, shape: ModelShape, multiple: float) -> StepNeed:
    fp32 = int(shape.fp32_bytes * multiple)
    return StepNeed(step, LOADED_OVERHEAD_BYTES + fp32,
                    f"holds the fp32 model{f' x{multiple:g}' if multiple != 1 else ''}",
                    {"process and loading": LOADED_OVERHEAD_BYTES, "fp32 model": fp32})


def walk_parts(shape: ModelShape, tokens: int, seq_len: int) -> dict:
    """What a block walk holds while it runs a block: the block's fp32 weights (and, read lazily, its pages of
    the source's files), the hidden states of every calibration token, one batch's activations inside the block."""
    return {"one block (fp32)": shape.block_params * 4,
            # the block's pages of the source's files, resident while it is read (released once it is done); a
            # mixture of experts' files keep one tensor per expert: its stacked tensors are copies, made one at a time
            "one block as stored": int((shape.largest_tensor_params if shape.experts else shape.block_params)
                                       * shape.stored_bytes_per_weight) if shape.streamable else 0,
            "hidden states": tokens * shape.hidden * 4,
            "one batch's activations": WALK_BATCH * seq_len * (3 * shape.intermediate + 6 * shape.hidden) * 4}


def gptq_factor_bytes(n: int) -> int:
    """``gguf_blocks.reversed_hessian`` then ``factor_in_place`` on n inputs: the float32 X^T X and its float64
    reversal, then that factored in place beside the float32 factor being copied out, and a strip's copies."""
    from ..exporters.gguf_blocks import COPY_STRIP

    return int(12 * n * n + 2 * n * min(COPY_STRIP, n) * 8)


#: float32 copies of a slice of rows that the block quantizer holds at once (measured: 5-8)
QUANTIZER_COPIES = 8


def quantizer_bytes(rows: int, columns: int, threads: int) -> int:
    """The block quantizer's working memory on a rows x columns matrix: the slices ``quantize_rows`` has in
    flight, ``QUANTIZER_COPIES`` float32 copies each."""
    from ..exporters.gguf_calibrated import CHUNK_ELEMENTS, ROW_CHUNK

    step = max(1, min(ROW_CHUNK, CHUNK_ELEMENTS // max(columns, 1), -(-rows // threads)))
    return min(threads, -(-rows // step)) * QUANTIZER_COPIES * step * columns * 4


def calibrated_need(step: str, shape: ModelShape, tokens: int, seq_len: int, gptq: bool, measured: bool,
                    quantizes: bool = True, threads: int | None = None, verify: bool = False) -> StepNeed:
    """``quant.gguf_calibrated`` / ``imatrix`` from the files: the largest of its phases, each named."""
    import psutil

    threads = threads or psutil.cpu_count(logical=False) or 1
    h, n, q = shape.hidden, shape.intermediate, shape.q_dim
    walk = walk_parts(shape, tokens, seq_len)
    base = walk["one block (fp32)"] + walk["one block as stored"] + walk["hidden states"]
    inside = [walk["one batch's activations"]]
    if gptq:      # X^T X of the block's inputs (not q/k/v's), then the down projection's factor in float64:
        #           (``footprint.gptq_factor_bytes``)
        inside += [walk["one batch's activations"] + (n * n + h * h + q * q) * 4,
                   gptq_factor_bytes(n) + (h * h + q * q) * 4]
    if quantizes:     # the widest matrices: gate and up together (2n x h), down (h x n), with its factor; GPTQ
        #               rounds one slice of rows at a time, the others a slice per thread
        slices = 1 if gptq else threads
        inside.append(max(2 * n * h * 4 + quantizer_bytes(2 * n, h, slices),
                          (n * n * 4 if gptq else 0) + n * h * 4 + quantizer_bytes(h, n, slices)))
    phases = {"block walk": base + max(inside)}
    head = shape.vocab * h * 4
    if quantizes:
        phases["output head (fp32, quantized in slices)"] = head + shape.vocab * h \
            + quantizer_bytes(shape.vocab, h, threads) + walk["hidden states"]
    if measured:   # sensitivity: every block's input for 8 x 128 tokens, the head in fp32; then the type plan
        phases["sensitivity pass"] = head + shape.layers * 1024 * h * 4 + shape.block_params * 4
        phases["type plan (largest tensor in fp32)"] = shape.largest_tensor_params * 4 * 2
    mapped = 0
    if verify:        # the file written, then checked against the model it was written from
        what, held, mapped = check_reference(shape)
        phases[f"the check: {what}"] = held
    name, peak = max(phases.items(), key=lambda kv: kv[1])
    return StepNeed(step, PROCESS_BYTES + int(peak),
                    f"reads the source one decoder block at a time; largest phase: {name}",
                    {"process": PROCESS_BYTES, **{k: int(v) for k, v in phases.items()}}, mapped_bytes=mapped)


#: bytes per weight of an ONNX folder by type (int8/int4: codes plus a float32 scale per block of 32)
ONNX_BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.125, "int4": 0.625}


def export_need(step: str, shape: ModelShape, fmt: str, types=(), options: dict | None = None,
                verify: bool = True) -> StepNeed | None:
    """An export written from the model's files: GGUF tensor by tensor (its output at up to 4 bytes a weight beside
    its stored copy); ONNX on EdgeTailor's graph one decoder layer at a time (the layer in fp32 and the graph's
    copies of it, the embedding read, widened and narrowed; int4/int8 each weight rounded in slices of rows as it
    is written, GPTQ with the calibration walk and one layer's input statistics). Beside it the check's reference:
    the torch model while it is small, else a 16-bit GGUF that llama.cpp maps (``engine.reference``). None where
    the export holds the model (onnxruntime-genai's builder)."""
    types = [str(t).lower() for t in types]
    options = options or {}
    method = str(options.get("method", "rtn")).lower()
    if fmt == "gguf" and shape.gguf_own_writer:
        from ..exporters.ggml_quant import CHUNK_ELEMENTS
        from .preflight import GGUF_BITS_PER_WEIGHT

        # the largest tensor is the embedding or the output head, which llama.cpp's mixes keep at Q6_K or more
        out_bytes = max(max(GGUF_BITS_PER_WEIGHT.get(t.upper(), 16), 6.5625) for t in types) / 8 if types else 2
        work = {"largest tensor's encoded bytes": shape.largest_tensor_params * out_bytes,
                "a slice of rows per thread (read, float32)": 2 * min(CHUNK_ELEMENTS, shape.largest_tensor_params)
                * (4 + 2)}
        how = "encodes the model tensor by tensor from its files (no fp32 copy of the model, no intermediate file)"
    elif fmt == "gguf":        # llama.cpp's converter, then its quantizer: a whole tensor in float32 beside its read
        work = {"largest tensor, read and written": shape.largest_tensor_params * 2 * 3}
        how = "converts the model tensor by tensor from its files with llama.cpp's converter"
    elif fmt == "onnx" and shape.onnx_graph and types:
        quantized = all(t in ("int4", "int8") for t in types)
        tied = shape.embedding_params <= shape.vocab * shape.hidden
        # quantized, a tied embedding is read from the quantized head (rounded in slices of rows), never whole;
        # HQQ's float zero points cannot be read that way: its embedding is a float table
        largest = max(shape.intermediate, shape.q_dim) * shape.hidden if quantized and tied and method != "hqq" \
            else shape.largest_tensor_params
        work = {"one decoder layer (fp32) and the graph's copies": shape.block_params * 4 * (2 if quantized else 3),
                "largest tensor, read, widened and written": largest * (2 + 4 + 4),
                **onnx_quantizer_parts(shape, types, method, options)}
        if HQQ_SLICE in work:      # its solver runs on a matrix's rows, never while the float embedding is written
            work[HQQ_SLICE] = max(0, work[HQQ_SLICE] - work["largest tensor, read, widened and written"])
        how = "writes the graph one decoder layer at a time from its files (no fp32 copy of the model)"
    else:
        return None
    # measured (bench/results/streamed_transforms_onnx*.md): checking a float ONNX file holds about twice its
    # weights (onnxruntime's and onnxruntime-genai's sessions), an int4 one about 1.1x (MLAS packs MatMulNBits)
    session = int(shape.params * max(ONNX_BYTES_PER_WEIGHT.get(t, 4.0) * (1.25 if t in ("int4", "int8") else 2)
                                     for t in types)) if fmt == "onnx" and verify else 0
    name, reference, mapped = check_reference(shape) if verify else ("no check", 0, 0)
    # the file is written, then checked; what the writing freed mostly stays with the allocator while the check
    # runs (measured on a transformed 1B shape: 0.91-1.12 GB not file-backed, streamed_transforms_*.md)
    peak = PROCESS_BYTES + max(sum(work.values()), session) + reference
    parts = {"process": PROCESS_BYTES, **work, name: reference or mapped}
    if session:
        parts["the check's runtime sessions (1.25-2x the file's weights)"] = session
    return StepNeed(step, peak, how, parts, mapped_bytes=mapped)


def check_reference(shape: ModelShape) -> tuple[str, int, int]:
    """What the check of a written file holds for the model it was written from (``engine.reference``): (what,
    bytes held, bytes of a file mapped). Small models: the fp32 torch model; after a transform: its files walked
    (one block and the head); large ones: a 16-bit GGUF that llama.cpp maps and runs (``StepNeed.mapped_bytes``)."""
    from .reference import TORCH_REFERENCE_MAX_BYTES

    if shape.transformed:     # one block, then the head (fp32), and the log-probs of the check's windows
        from .verification import WINDOW_TOKENS, WINDOWS

        return "reference (walked: one block, then the output head, fp32)", \
            max(shape.block_params, shape.vocab * shape.hidden) * 4 + WINDOWS * WINDOW_TOKENS * shape.vocab * 4, 0
    if shape.fp32_bytes <= TORCH_REFERENCE_MAX_BYTES:
        return "reference (fp32 torch model)", shape.fp32_bytes, 0
    return "reference (16-bit GGUF mapped by llama.cpp: its pages, resident while it runs)", 0, shape.params * 2


#: onnxruntime's HQQ solver on a slice of rows (10 float32 copies of it), beyond what writing the largest tensor
#: holds: the two never overlap (measured: 1.81 GB not file-backed on the 1B shape, bench/results/streamed_transforms_onnx-hqq.md)
HQQ_SLICE = "HQQ's solver on a slice of rows (10 float32 copies), beyond the largest tensor's"


def onnx_quantizer_parts(shape: ModelShape, types: list[str], method: str, options: dict) -> dict:
    """What quantizing ONNX weights as they are written adds: a slice of rows rounded at a time (float32, its
    transposed and padded copies; onnxruntime's HQQ solver about ten, measured: 8.6x a 2048 x 8192 slice beside
    it); GPTQ: the calibration walk's hidden states, the X^T X of one layer's inputs (float32, kept while the
    layer is written) and the widest input's factor (float64, two n x n at once)."""
    from ..exporters.onnx_quant import SLICE_ELEMENTS

    if not any(t in ("int4", "int8") for t in types):
        return {}
    if method == "hqq" and "int4" in types:
        parts = {HQQ_SLICE: SLICE_ELEMENTS * 4 * 10}
    else:
        parts = {"a slice of rows being rounded (3 float32 copies)": SLICE_ELEMENTS * 4 * 3}
    if method == "gptq":
        seq_len = int(options.get("calibration_ctx", 512))
        walk = walk_parts(shape, int(options.get("calibration_windows", 20)) * seq_len, seq_len)
        h, n, q = shape.hidden, shape.intermediate, shape.q_dim
        parts.update({"calibration hidden states": walk["hidden states"],
                      "X^T X of one layer's inputs (fp32)": (2 * h * h + q * q + n * n) * 4,
                      "GPTQ factor of the widest input (1.5 x float64)": gptq_factor_bytes(max(n, h, q))})
    return parts


def decode_probe_bytes(shape) -> int:
    """The largest probe ``probes.measure_decode_model`` makes: its layers (``shape_probe_layers``) and the
    embeddings in float32, in the worker beside the interpreter."""
    from .probes import PROBE_F32_BYTES

    per_layer = 4 * (shape.hidden * (2 * shape.q_dim + 2 * shape.kv_dim) + 3 * shape.hidden * shape.intermediate)
    layers = max(2, min(shape.layers, int(PROBE_F32_BYTES // max(per_layer, 1))))
    return PROCESS_BYTES + layers * per_layer + 4 * shape.embedding_params


def scratch_bytes(shape: ModelShape, exact: bool = True) -> int:
    """The decoder blocks a streamed transform writes to the run's scratch: in their stored dtype when the change
    keeps them exact there (pruning zeroes or drops weights), else fp32 (AWQ's scaled weights)."""
    blocks = max(shape.params - shape.embedding_params, 0)
    return int(blocks * (shape.stored_bytes_per_weight if exact else 4))


def streamed_transform_need(step: str, shape: ModelShape, tokens: int = 0, seq_len: int = 256) -> StepNeed:
    """A transform streamed block by block (``RunContext.transform_walk``): one block in fp32, the scores of its
    largest matrix, and with calibration text the walk's hidden states and one batch's activations. Its changed
    blocks go to the run's scratch on disk, not to memory."""
    walk = walk_parts(shape, tokens, seq_len)
    parts = {"process": PROCESS_BYTES, "one block (fp32)": walk["one block (fp32)"],
             "scores of its largest matrix": max(shape.intermediate, shape.q_dim) * shape.hidden * 4 * 2}
    if tokens:
        parts.update({"hidden states": walk["hidden states"],
                      "one batch's activations": walk["one batch's activations"]})
    # the batch's activations (the block's forward) and the scores (the change) are never held at once
    peak = sum(parts.values()) - min(parts["scores of its largest matrix"], parts.get("one batch's activations", 0))
    return StepNeed(step, peak, "changes the model one decoder block at a time (written to scratch)", parts)


def training_need(step: str, shape: ModelShape, trainable: int, tokens: int, seq_len: int, teacher: bool,
                  bf16: bool) -> StepNeed:
    """A step that trains the model it holds (distillation, LoRA): the student in fp32, gradients and AdamW's two
    moments for its ``trainable`` parameters, the teacher (the source, fp32) when it distils, and per batch of
    ``tokens`` the activations every block keeps for the backward pass (bf16 under autocast) and the logits."""
    act = 2 if bf16 else 4
    per_token_layer = 10 * shape.hidden + 4 * shape.intermediate + 2 * shape.q_dim + 2 * shape.kv_dim \
        + 2 * shape.heads * seq_len
    parts = {"process and loading": LOADED_OVERHEAD_BYTES, "student (fp32)": shape.fp32_bytes,
             "gradients (fp32, trainable)": trainable * 4, "AdamW moments (2 x fp32, trainable)": trainable * 8,
             f"activations kept for backward ({'bf16' if bf16 else 'fp32'})": shape.layers * tokens * per_token_layer * act,
             "logits and their gradient (fp32)": (3 + teacher) * tokens * shape.vocab * 4}
    if teacher:
        parts["teacher (the source, fp32)"] = shape.fp32_bytes
    return StepNeed(step, sum(parts.values()),
                    f"trains {trainable / 1e6:,.1f}M of {shape.params / 1e6:,.1f}M parameters"
                    + (" against the source as teacher" if teacher else ""), parts)


def lora_parameters(shape: ModelShape, rank: int, modules: list[str]) -> int:
    """LoRA's trainable parameters: rank x (inputs + outputs) of each adapted linear layer, in every block."""
    h, n, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    widths = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h, "qkv_proj": h + q + 2 * kv,
              "gate_proj": h + n, "up_proj": h + n, "down_proj": n + h, "gate_up_proj": h + 2 * n}
    return shape.layers * rank * sum(widths.get(m, 2 * h) for m in modules)


def hessians_bytes(shape: ModelShape) -> int:
    """X^T X of every distinct linear-layer input of every block and of the output head (fp32), as ``imatrix`` with
    hessians keeps them: a mixture of experts' MLP has none (its experts keep second moments, its router is not a
    linear layer)."""
    mlp = 0 if shape.experts else shape.hidden ** 2 + shape.intermediate ** 2
    return (shape.layers * (shape.hidden ** 2 + shape.q_dim ** 2 + mlp) + shape.hidden ** 2) * 4


def calibration_tokens(max_sequences: int | None, seq_len: int) -> int:
    return min(max_sequences * seq_len, DEFAULT_CALIBRATION_TOKENS) if max_sequences else DEFAULT_CALIBRATION_TOKENS


def recipe_needs(recipe, shape: ModelShape) -> list[StepNeed]:
    """One ``StepNeed`` per step, in order: streamed while every step before it streamed (transforms included:
    they leave their blocks on disk); from the first step that holds the fp32 model on, every step holds it."""
    from .registry import get_step

    needs, streaming = [], shape.streamable
    for step in (recipe.steps if recipe is not None else []):
        info = get_step(step.name)
        cfg = info.parse(step.params)
        need = info.streamed_ram(cfg, shape) if streaming else None
        if need is None:
            need = info.held_ram(cfg, shape) or whole_model(step.name, shape, info.ram_multiple(cfg))
            streaming = False
        needs.append(need)
        if info.kind == "transform":
            shape = dataclasses.replace(shape, transformed=True)
    return needs

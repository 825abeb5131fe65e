"""ONNX export for onnxruntime and onnxruntime-genai (phones, laptop apps): the exporter, its options, the
folder's files and their check. ``onnx_graph.py`` writes the graph, ``onnx_quant.py`` quantizes its weights as
they are written, ``engine/runtimes/onnx.py`` runs it.

The graph is written directly with ``onnx.helper`` in the shape onnxruntime-genai's model builder emits for
CPU, so the same fused kernels run it: ``GroupQueryAttention`` (rotary inside, KV cache in and out),
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` and, once quantized,
``MatMulNBits`` (int4, int8) with the tied embedding read from the quantized head by ``GatherBlockQuantized``.

Types: ``fp32``, ``fp16``, ``int8`` and ``int4``: weight-only ``MatMulNBits`` of 8 or 4 bits, as
onnxruntime-genai's builder writes ``-p int8`` / ``-p int4`` (symmetric blocks, a float32 scale each). Options:
``block_size`` (32, 64 or 128; a weight whose rows do not fill whole blocks is padded), ``method`` ``rtn``
(round to nearest by onnxruntime's own kernels, the builder's default), ``gptq`` (EdgeTailor's GPTQ, calibrated
on ``calibration_text``: each layer's input X^T X measured by the block walker just before the layer is written,
then error-feedback rounding onto the MatMulNBits grid itself, see ``onnx_quant.gptq_weights``) or, int4 only,
``hqq`` (onnxruntime's half-quadratic quantizer, asymmetric: float zero points, so a tied embedding stays float),
``accuracy_level`` (MatMulNBits compute type, default 4 = int8 activations on CPU, as the builder uses),
``head_bits`` (int4: 4, or 8 for an 8-bit output head; the int4 loss is largely the head's).

Every type is written one decoder layer at a time, each weight quantized as it is written to ``model.onnx.data``:
a lazy model (the files read on demand) never exists whole in memory.

The output folder holds ``model.onnx`` + ``model.onnx.data`` (weights as external data, so models over 2 GB
work), ``genai_config.json`` and the tokenizer files: ``onnxruntime_genai.Model(folder)`` runs it as it is.

The graph's inputs and outputs carry onnxruntime-genai's names (see ``engine/runtimes/onnx.py``, whose
``OnnxRuntime`` and ``OnnxGenaiRuntime`` run the folder with its KV cache).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..engine.architectures import arch_spec
from ..engine.errors import EdgeTailorError, RunCancelled
from ..engine.runtimes.onnx import MODEL_FILE, OnnxGenaiRuntime, OnnxRuntime
from . import register_exporter
from .base import Exporter, ExportResult
from .onnx_graph import DecoderGraph, build_graph
from .onnx_quant import NBits

TYPES = ("fp32", "fp16", "int8", "int4")
INT4_METHODS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (32, 64, 128)
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def parse_options(options: dict, need_text: bool = True) -> dict:
    """The export's options, checked; ``need_text`` False: GPTQ's calibration text may come later (the export step
    passes the job's when it runs)."""
    qtype = str(options.get("type", "fp32")).lower()
    if qtype not in TYPES:
        raise EdgeTailorError(f"'{qtype}' is not an ONNX export type.", f"Use one of: {', '.join(TYPES)}.")
    block = int(options.get("block_size", 32))
    if block not in BLOCK_SIZES:
        raise EdgeTailorError(f"An int4 block size of {block} is not supported.",
                              f"Use one of: {', '.join(map(str, BLOCK_SIZES))}.")
    method = str(options.get("method", "rtn")).lower()
    if method not in INT4_METHODS:
        raise EdgeTailorError(f"'{method}' is not a method of ONNX's int4/int8.", f"Use one of: {', '.join(INT4_METHODS)}.")
    if qtype in ("int4", "int8") and method == "gptq" and need_text and not options.get("calibration_text"):
        raise EdgeTailorError(f"{qtype} method 'gptq' needs calibration text.",
                              "Run it through the export step (it passes the job's calibration text), "
                              "or give options.calibration_text.")
    head_bits = int(options.get("head_bits", 4))
    if head_bits not in (4, 8):
        raise EdgeTailorError(f"An int4 head of {head_bits} bits is not supported.", "Use head_bits 4 or 8.")
    if head_bits == 8 and method == "hqq":
        raise EdgeTailorError("head_bits 8 goes with method rtn or gptq, not hqq.", "Use method rtn or gptq.")
    if qtype == "int8" and method == "hqq":
        raise EdgeTailorError("int8 goes with method rtn or gptq; HQQ is for int4.", "Use method rtn or gptq.")
    if qtype == "int8":
        head_bits = 8
    return {"type": qtype, "block_size": block, "method": method, "head_bits": head_bits,
            "accuracy_level": int(options.get("accuracy_level", 4)),
            "calibration_text": options.get("calibration_text"),
            "calibration_windows": int(options.get("calibration_windows", 20)),
            "calibration_ctx": int(options.get("calibration_ctx", 512)),
            "damp": float(options.get("damp", 0.01))}


class ONNXExporter(Exporter):
    format = "onnx"
    runtimes = ("onnxruntime", "onnxruntime-genai")

    def check_options(self, options: dict) -> None:
        parse_options(options, need_text=False)

    def export(self, model, tokenizer, tokenizer_dir, out, options, progress=None, cancelled=None):
        opts = parse_options(options)
        qtype = opts["type"]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)

        def step(f, m):
            if cancelled and cancelled():
                raise RunCancelled()
            if progress:
                progress(f, m)

        spec = arch_spec(model.config.model_type)
        if spec is not None and spec.onnx == "genai-builder":
            return export_with_builder(model, tokenizer_dir, out, opts, options.get("source_dir"), step, cancelled)
        step(0.0, "building the ONNX graph")
        float_type = "fp16" if qtype == "fp16" else "fp32"
        lazy = getattr(model, "is_lazy", False)
        nbits = _nbits(opts)
        sequences = _calibration(model, tokenizer, opts) if nbits is not None and nbits.gptq else None
        graph = self._streamed(model, float_type, out, nbits, sequences,
                               lambda f, m: step(0.05 + 0.8 * f, f"writing the graph: {m}"), cancelled)
        info = {"type": qtype, "written": "tensor by tensor from the model's files" if lazy else "one decoder layer at a time"}
        if nbits is not None:
            info.update(block_size=nbits.block, method=nbits.method, head_bits=nbits.head_bits,
                        quantized_by=QUANTIZED_BY[nbits.method])
        info.update(layers=graph.n_layers, tied_embeddings=graph.tied)
        return self._finish(model, tokenizer, tokenizer_dir, out, graph, info)

    @staticmethod
    def _streamed(model, float_type: str, out: Path, nbits, sequences, progress, cancelled) -> DecoderGraph:
        """The graph, its weights written to model.onnx.data as each is made (quantized when ``nbits`` says; one
        decoder layer in memory at a time for a lazy model), then model.onnx, which only points at them."""
        import onnx

        for p in (out / MODEL_FILE, out / DATA_FILE):
            p.unlink(missing_ok=True)
        with open(out / DATA_FILE, "wb") as data:
            graph = build_graph(model, float_type, data=data, data_name=DATA_FILE, nbits=nbits, sequences=sequences,
                                progress=progress, cancelled=cancelled)
        onnx.save_model(graph.proto, out / MODEL_FILE)
        return graph

    @staticmethod
    def _finish(model, tokenizer, tokenizer_dir, out: Path, graph: DecoderGraph, info: dict) -> ExportResult:
        write_genai_config(model, tokenizer, out, graph)
        copy_tokenizer_files(Path(tokenizer_dir), out, tokenizer)
        files = sorted(p for p in out.iterdir())
        info["bytes"] = sum(p.stat().st_size for p in files)
        return ExportResult(path=out, files=files, info=info)

    def verify(self, path):
        return verify_onnx(path)


register_exporter(ONNXExporter())


#: who chose each method's codes
QUANTIZED_BY = {"rtn": "onnxruntime's MatMulNBits round-to-nearest kernels", "gptq": "EdgeTailor GPTQ onto MatMulNBits",
                "hqq": "onnxruntime's HQQ quantizer (its quantize_internal), weight by weight"}


def _nbits(opts: dict) -> NBits | None:
    """How the graph's MatMul weights are quantized as they are written (None: float)."""
    if opts["type"] not in ("int4", "int8"):
        return None
    bits = 8 if opts["type"] == "int8" else 4
    return NBits(bits, opts["block_size"], opts["method"], opts["head_bits"], opts["accuracy_level"], opts["damp"])


def _calibration(model, tokenizer, opts: dict):
    """GPTQ's calibration sequences: ``calibration_windows`` of ``calibration_ctx`` tokens of the calibration
    text, at most as long as the model's positions (its context)."""
    from ..engine.architectures import ModelDims
    from ..engine.calibration import token_sequences

    ctx = min(opts["calibration_ctx"], ModelDims.of(model.config).context)
    return token_sequences(tokenizer, opts["calibration_text"], ctx, opts["calibration_windows"])


# --- onnxruntime-genai's model builder, for the families EdgeTailor's graph does not cover ----------------
def export_with_builder(model, tokenizer_dir, out: Path, opts: dict, source_dir, step, cancelled) -> ExportResult:
    """The family's graph as onnxruntime-genai's model builder writes it (in a child process: it loads the model
    in torch itself), from the untouched source folder or the transformed model saved to scratch. Its int4 is
    MatMulNBits RTN at the given block size; EdgeTailor's GPTQ and HQQ need EdgeTailor's own graph."""
    from .hf_folder import model_folder

    if opts["type"] in ("int4", "int8") and opts["method"] != "rtn":
        raise EdgeTailorError(
            f"{opts['type']} method '{opts['method']}' runs on EdgeTailor's own ONNX graph, which does not cover "
            f"'{model.config.model_type}' models; onnxruntime-genai's builder writes them with RTN.",
            "Use method: rtn for this model, or export it to GGUF.")
    step(0.0, "onnxruntime-genai's model builder writes the graph")
    with tempfile.TemporaryDirectory(prefix="edgetailor-onnx-", dir=out.parent) as tmp:
        folder = model_folder(model, tokenizer_dir, source_dir, Path(tmp))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
               "-p", opts["type"], "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if opts["type"] in ("int4", "int8"):
            cmd += ["--extra_options", f"int4_block_size={opts['block_size']}",
                    f"int4_accuracy_level={opts['accuracy_level']}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(Path(tmp) / "builder.log", "w+b") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    if cancelled and cancelled():
                        raise RunCancelled()
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        tail = " | ".join(ln for ln in text.strip().splitlines()[-3:])[-600:]
        raise EdgeTailorError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}): {tail}",
                              "Export this model to GGUF, or update onnxruntime-genai.")
    step(0.9, "written")
    info = {"type": opts["type"], "written_by": "onnxruntime-genai model builder",
            **({"block_size": opts["block_size"], "method": "rtn",
                "quantized_by": "onnxruntime-genai builder (MatMulNBits RTN)"} if opts["type"] in ("int4", "int8")
               else {})}
    files = sorted(p for p in out.iterdir())
    info["bytes"] = sum(p.stat().st_size for p in files if p.is_file())
    return ExportResult(path=out, files=files, info=info)


# --- files ------------------------------------------------------------------------------------------
def write_genai_config(model, tokenizer, out: Path, graph: DecoderGraph) -> None:
    cfg = model.config
    gen = getattr(model, "generation_config", None)

    def pick(name):
        v = getattr(gen, name, None) if gen is not None else None
        return v if v is not None else getattr(cfg, name, None)

    eos = pick("eos_token_id")
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config = {
        "model": {
            "bos_token_id": pick("bos_token_id"),
            "context_length": graph.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": graph.head_dim,
                "hidden_size": graph.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": graph.heads,
                "num_hidden_layers": graph.n_layers,
                "num_key_value_heads": graph.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": cfg.model_type,
            "vocab_size": graph.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": graph.context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (out / "genai_config.json").write_text(json.dumps(config, indent=4))


def copy_tokenizer_files(src: Path, out: Path, tokenizer) -> None:
    """The source's tokenizer files; onnxruntime-genai reads tokenizer.json, so a SentencePiece-only source gets
    the one its fast tokenizer converts to."""
    found = [f for f in TOKENIZER_FILES if (src / f).exists()]
    for f in found:
        shutil.copy(src / f, out / f)
    if "tokenizer.json" not in found:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise EdgeTailorError(f"{src} has no tokenizer.json, and its tokenizer cannot write one.",
                                  "Export from a folder with tokenizer.json (a fast tokenizer).")
        backend.save(str(out / "tokenizer.json"))




def verify_onnx(path: Path, n_tokens: int = 8) -> dict:
    """Load the folder in onnxruntime (and onnxruntime-genai when installed) and run a forward pass each."""
    path = Path(path)
    rt = OnnxRuntime(path, threads=1)
    try:
        ids = list(range(1, n_tokens + 1))
        logits = rt.logits(ids)
        if logits.shape[0] != n_tokens or not np.isfinite(logits).all():
            raise EdgeTailorError(f"{path.name} gave bad logits in onnxruntime.", "Export the variant again.")
        rt.prefill(ids[:-1])
        step = rt.decode_one(ids[-1])
        if step.shape != logits[-1].shape or not np.isfinite(step).all():
            raise EdgeTailorError(f"{path.name} gave bad logits when decoding with its KV cache.",
                                  "This is a bug in the ONNX exporter; please report it.")
    finally:
        rt.close()
    checked = {"loaded_by": "onnxruntime", "tokens": n_tokens}
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return checked
    with OnnxGenaiRuntime(path, n_ctx=n_tokens + 4) as genai:
        checked["genai_token"] = int(np.argmax(genai.prefill(ids)))
    checked["loaded_by"] = "onnxruntime and onnxruntime-genai"
    return checked

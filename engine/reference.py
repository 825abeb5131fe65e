"""Which runtime computes the untouched source model's reference logits (baseline perplexity, KL, top-1, and
the check of every exported file).

Small models: the torch model itself, in fp32 (exact, and loaded quickly). Models whose fp32 copy is larger
than ``TORCH_REFERENCE_MAX_BYTES``: a 16-bit GGUF of the source (BF16 when the source is stored in bf16, else
F16), written tensor by tensor from the memory-mapped safetensors into the run's scratch folder and run by
llama.cpp, so the evaluation of a 3B model never needs its 13 GB fp32 copy. The choice and its reason are
recorded in the manifest under ``reference``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .context import RunContext

GB = 1024**3
TORCH_REFERENCE_MAX_BYTES = 2 * GB      # fp32 bytes (500M parameters) up to which torch is the reference


@dataclass
class ReferenceChoice:
    format: str                  # "torch" or "gguf"
    reason: str
    path: str | None = None      # the 16-bit GGUF, for "gguf"
    type: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose(ctx: RunContext) -> ReferenceChoice:
    """Decide once per run (from the files' headers; nothing loads) and record the choice in the manifest."""
    if ctx.scratch.reference_choice is not None:
        return ctx.scratch.reference_choice
    from .preflight import safetensors_parameter_count

    counted = safetensors_parameter_count(ctx.source.path)
    fp32 = counted[0] * 4 if counted else 0
    if not counted or fp32 <= TORCH_REFERENCE_MAX_BYTES:
        choice = ReferenceChoice("torch", f"the fp32 model ({fp32 / GB:.1f} GB) is small enough to be its own "
                                          "reference" if counted else "the source has no safetensors to read lazily")
    else:
        qtype = "BF16" if counted[2] == "BF16" else "F16"
        choice = ReferenceChoice("gguf", f"the fp32 model would take {fp32 / GB:.1f} GB (over "
                                         f"{TORCH_REFERENCE_MAX_BYTES / GB:.0f} GB): a {qtype} GGUF of the source, "
                                         "written tensor by tensor, runs in llama.cpp instead",
                                 type=qtype)
    ctx.scratch.reference_choice = choice
    ctx.record.manifest["reference"] = choice.to_dict()
    ctx.record.save()
    ctx.log(f"Reference logits: {choice.format} ({choice.reason})")
    return choice


def reference_gguf(ctx: RunContext, choice: ReferenceChoice) -> Path:
    """Write the 16-bit reference file once per run (scratch; removed with the run's scratch folder)."""
    if choice.path and Path(choice.path).exists():
        return Path(choice.path)
    from ..exporters import get_exporter
    from .atomic import atomic_path

    path = ctx.record.folder / "scratch" / f"reference-{choice.type}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"Writing the {choice.type} reference file from the source's safetensors")
    with atomic_path(path) as tmp:
        get_exporter("gguf").export(ctx.source_weights(), ctx.tokenizer, ctx.source.path, tmp,
                                    {"type": choice.type, "source_dir": ctx.source.path,
                                     "threads": ctx.options.resolved_threads()},
                                    cancelled=ctx.cancel.is_set)
    choice.path = str(path)
    ctx.record.manifest["reference"] = choice.to_dict()
    ctx.record.save()
    return path


def open_reference(ctx: RunContext, n_ctx: int):
    """A runtime for the untouched source's logits, as ``choose`` decided."""
    from .runtimes import TorchRuntime, open_runtime

    choice = choose(ctx)
    if choice.format == "torch":
        return TorchRuntime(ctx.load_baseline().model, ctx.options.resolved_threads())
    return open_runtime("gguf", reference_gguf(ctx, choice), n_ctx=n_ctx, threads=ctx.options.resolved_threads())

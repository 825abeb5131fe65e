"""Pre-flight: read a model's config (nothing heavy) and say what will work and what it will cost.

Tells the user which techniques and exporters support the architecture, and how much RAM and disk the job
needs against what the machine has, refusing with the numbers when it will not fit.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .architectures import OWN_WRITER_STEPS, arch_spec, count_parameters, gguf_writer_for, supported_model_types
from .errors import DoesNotFitError, UnsupportedModelError
from .footprint import LOADED_OVERHEAD_BYTES, ModelShape, recipe_needs
from .sources import ResolvedSource

GB = 1024**3
# Bytes per weight of each GGUF type (block size and block bytes from ggml), for disk estimates.
GGUF_BITS_PER_WEIGHT = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.27,
    "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35, "Q2_K_S": 3.2, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "IQ3_M": 3.7, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "IQ2_M": 2.7, "IQ2_S": 2.5,
    "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ1_0": 1.69, "TQ2_0": 2.06,
}


@dataclass
class PreflightReport:
    model_type: str
    supported: bool
    architecture_note: str
    parameters: dict
    dtype: str
    weights_bytes: int
    context_length: int
    techniques: dict = field(default_factory=dict)    # name -> "yes" | reason it does not apply
    exporters: dict = field(default_factory=dict)
    ram_needed_bytes: int = 0
    ram_available_bytes: int = 0
    disk_needed_bytes: int = 0
    disk_available_bytes: int = 0
    problems: list = field(default_factory=list)       # resources: RAM or disk short
    disk_folder: str = ""                              # where the run writes: the folder whose free space counts
    refusals: list = field(default_factory=list)       # the family, or a step of the recipe for it, not supported
    warnings: list = field(default_factory=list)       # works, with a caveat the user should know
    features: list = field(default_factory=list)       # what the family brings (soft-capping, experts, ...)
    steps: list = field(default_factory=list)          # per step of the recipe: ram_bytes, how, parts

    @property
    def fits(self) -> bool:
        return not self.problems and not self.refusals

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d

    def raise_if_not_fits(self) -> None:
        if self.refusals:
            raise UnsupportedModelError("; ".join(self.refusals),
                                        "Pick a model of a supported family, or drop the steps that do not apply "
                                        "to this one (`edgetailor inspect MODEL` lists them).")
        if self.problems:
            fixes = []
            if self.ram_needed_bytes > self.ram_available_bytes:
                fixes.append("for memory: close other programs, pick a smaller model, or drop steps from the recipe")
            if self.disk_needed_bytes > self.disk_available_bytes:
                fixes.append(f"for disk: free {human_bytes(self.disk_needed_bytes - self.disk_available_bytes)} "
                             f"on the disk of {self.disk_folder}, or point --home at a larger disk")
            fix = "; ".join(fixes)
            raise DoesNotFitError("; ".join(self.problems), fix[0].upper() + fix[1:] + ".")


def human_bytes(n: float) -> str:
    """A size as people read it: 812 KB, 3.4 MB, 7.3 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(n, 0) / 1e3:.0f} KB"


def safetensors_parameter_count(folder: Path) -> tuple[int, int, str] | None:
    """(parameters, bytes, dtype) read from safetensors headers only (each header checked: ``lazy.read_header``)."""
    from .lazy import read_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    n = nbytes = 0
    dtypes = set()
    for f in files:
        for v in read_header(f).values():
            count = 1
            for s in v["shape"]:
                count *= s
            n += count
            nbytes += v["data_offsets"][1] - v["data_offsets"][0]
            dtypes.add(v["dtype"])
    return n, nbytes, "/".join(sorted(dtypes))


def estimate_job(recipe, shape: ModelShape) -> tuple[float, int]:
    """(RAM multiple of the fp32 model, disk bytes) that a recipe's steps need: what each step writes, and a
    large source's 16-bit reference GGUF (``engine.reference``), which the run keeps in its scratch."""
    from .reference import TORCH_REFERENCE_MAX_BYTES
    from .registry import get_step

    ram_multiple = 1.0
    disk = 0
    if recipe is not None:
        for step in recipe.steps:
            info = get_step(step.name)
            cfg = info.parse(step.params)
            ram_multiple = max(ram_multiple, info.ram_multiple(cfg))
            disk += int(info.disk_bytes(cfg, shape))
        if recipe.steps and shape.fp32_bytes > TORCH_REFERENCE_MAX_BYTES:
            disk += shape.params * 2
    return ram_multiple, disk


def _family(report: PreflightReport, spec, cfg: dict, recipe) -> None:
    """What the model's family supports: techniques and exporters (each "yes" or why not), caveats."""
    from ..exporters import all_exporters
    from .registry import all_steps, get_step

    for name, info in sorted(all_steps().items()):
        if spec is None:
            report.techniques[name] = "yes" if not info.needs_supported_arch else report.architecture_note
        else:
            report.techniques[name] = spec.technique(name, info.kind)
    for name in sorted(all_exporters()):
        if spec is None:
            report.exporters[name] = report.architecture_note
        elif name in spec.exporters:
            report.exporters[name] = "yes"
        else:
            report.exporters[name] = f"not for {spec.model_type} yet: {spec.onnx_note}"
    if spec is None:
        report.refusals.append(report.architecture_note)
        return
    if spec.own_gguf_writer and gguf_writer_for(cfg) != "edgetailor":
        for name in OWN_WRITER_STEPS:
            report.techniques[name] = (f"not for {spec.model_type} with attention/MLP biases yet: its blocks go "
                                       "into EdgeTailor's GGUF writer, which does not place those biases")
    report.features = list(spec.features)
    window = cfg.get("sliding_window")
    if window and spec.model_type in ("mistral", "starcoder2", "mixtral", "qwen2", "qwen3") and (
            cfg.get("use_sliding_window", True)):
        report.warnings.append(
            f"this model attends within a sliding window of {window} tokens; llama.cpp's {spec.gguf_arch} graph "
            f"attends to the whole context, so GGUF files match the model up to {window} tokens of context")
    for step in (recipe.steps if recipe is not None else []):
        verdict = report.techniques.get(step.name, "yes")
        if verdict != "yes":
            report.refusals.append(f"step '{step.name}': {verdict}")
        if step.name == "prune.width":
            from .steps.prune.structured import width_axes_problem

            problem = width_axes_problem(spec.model_type, get_step(step.name).parse(step.params))
            if problem:
                report.refusals.append(f"step 'prune.width': {problem}")
        if step.name == "export" and str((step.params or {}).get("format", "gguf")) not in spec.exporters:
            fmt = (step.params or {}).get("format")
            report.refusals.append(f"step 'export' to {fmt}: {report.exporters.get(fmt, 'unknown format')}")


def preflight(src: ResolvedSource, recipe=None, work_dir: Path | None = None) -> PreflightReport:
    cfg = src.config
    mt = cfg.get("model_type", "?")
    spec = arch_spec(mt)
    counted = safetensors_parameter_count(src.path)
    try:
        params = count_parameters(cfg)
    except (KeyError, TypeError, ValueError):
        params = {"total": counted[0] if counted else 0, "embedding": 0, "non_embedding": 0}
    if counted:        # the files' count (the config's formula knows dense blocks only: experts, fused layers)
        params["total"] = counted[0]
        params["non_embedding"] = max(0, counted[0] - params["embedding"])
    weights_bytes = counted[1] if counted else params["total"] * 4
    dtype = counted[2] if counted else str(cfg.get("torch_dtype") or cfg.get("dtype") or "?")
    report = PreflightReport(
        model_type=mt, supported=spec is not None,
        architecture_note=(spec.notes if spec else
                           f"not supported yet: '{mt}'; supported: {', '.join(supported_model_types())}"),
        parameters=params, dtype=dtype, weights_bytes=weights_bytes,
        context_length=int(cfg.get("max_position_embeddings") or 0))
    _family(report, spec, cfg, recipe)

    shape = ModelShape.from_config(cfg, src.path, params["total"])
    ram_multiple, disk = estimate_job(recipe, shape)
    needs = recipe_needs(recipe, shape) if recipe is not None and recipe.steps else []
    report.steps = [n.to_dict() for n in needs]
    report.ram_needed_bytes = max((n.ram_bytes for n in needs), default=0) or \
        int(shape.fp32_bytes * ram_multiple + LOADED_OVERHEAD_BYTES)
    report.ram_available_bytes = int(psutil.virtual_memory().available)
    report.disk_needed_bytes = int(disk)
    target = Path(work_dir) if work_dir else src.path
    while not target.exists():
        target = target.parent
    report.disk_available_bytes = int(shutil.disk_usage(target).free)
    report.disk_folder = str(target)
    if report.ram_needed_bytes > report.ram_available_bytes:
        report.problems.append(f"needs about {human_bytes(report.ram_needed_bytes)} of RAM, "
                               f"{human_bytes(report.ram_available_bytes)} available")
    if report.disk_needed_bytes > report.disk_available_bytes:
        report.problems.append(f"needs about {human_bytes(report.disk_needed_bytes)} of disk, "
                               f"{human_bytes(report.disk_available_bytes)} free")
    short = [n for n in needs if n.mapped_bytes and n.ram_bytes + n.mapped_bytes > report.ram_available_bytes]
    if short and not report.problems:
        report.warnings.append(f"{short[0].step}: the {human_bytes(short[0].mapped_bytes)} reference file llama.cpp "
                               f"maps does not stay in the {human_bytes(report.ram_available_bytes)} available: it "
                               "is read from disk again as the step runs (slower, same result)")
    return report


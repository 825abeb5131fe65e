"""The planner's narrower models: a share of every block's MLP channels removed (ranked by the activations that
reach the MLP's output layer, as the ``prune.width`` step and Minitron rank them) and the model healed by
distillation from the source, each written once to the run's scratch as a model folder that the planner prices,
builds its files from and checks them against.

Healing trains: the student, the teacher (the source) and the optimizer's state are held in memory, the one case
the streaming rule allows; pre-flight prices it with ``footprint.training_need`` (``healing_need``).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EdgeTailorError

#: weights and config are written anew; everything else in the source's folder (tokenizer, templates) is copied
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "model.safetensors.index.json", "config.json")


#: the MLP's channels left are a multiple of 256 where that removes within ``SHARE_SLACK`` of the share asked
#: (k-quants' super-blocks stay whole: the down projection reads them, and a width of 1152 leaves it the 32-blocks
#: of Q4_0/IQ4_NL/Q5_0/Q8_0 only), else of 32
ROUND_TO = (256, 32)
SHARE_SLACK = 0.05


@dataclass
class Narrowed:
    """A narrower, healed model in the run's scratch."""
    width: float                 # share of MLP channels removed
    folder: Path
    intermediate: int            # the MLP's channels left
    kl_before: float             # to the source on held-out calibration text, cut but not healed
    kl: float                    # the same, healed
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return {"width": self.width, "folder": str(self.folder), "intermediate_size": self.intermediate,
                "heldout_kl_before_healing": round(self.kl_before, 5), "heldout_kl": round(self.kl, 5),
                "healing_steps": self.steps, "healing_seconds": round(self.seconds, 1)}


@dataclass
class Healing:
    """How each narrower model is healed: distillation from the source on the calibration text's training part."""
    minutes: float
    steps: int                   # 0: time only
    lr: float = 2e-4


def narrowed_model(source_folder: Path, teacher, width: float, rank_sequences: torch.Tensor,
                   train: torch.Tensor, heldout: torch.Tensor, healing: Healing, out: Path,
                   progress=None, cancelled=None) -> Narrowed:
    """``teacher`` (the source, loaded) with ``width`` of every block's MLP channels removed, healed by distillation
    from it and written to ``out`` (atomically) beside a copy of the source folder's tokenizer files."""
    from .atomic import atomic_path
    from .calibration import linear_input_stats
    from .distill import distill, mean_kl
    from .steps.distill import resolved_bf16
    from .steps.prune.structured import WidthPruneConfig, apply_slices, mlp_layout, width_slices

    say = progress or (lambda f, m: None)
    reads = mlp_layout(teacher.config).reads
    stats = linear_input_stats(teacher, rank_sequences, lambda n: n.endswith(reads), cancelled=cancelled)
    full = int(teacher.config.intermediate_size)
    for multiple in ROUND_TO:
        slices, changes = width_slices(teacher, stats, WidthPruneConfig(mlp_keep=1.0 - width, round_to=multiple))
        if "intermediate_size" in changes and abs(1 - changes["intermediate_size"] / full - width) <= SHARE_SLACK:
            break
    else:
        raise EdgeTailorError(f"Removing {width:.0%} of the MLP channels removes none (the size rounds back up).",
                              "Give a larger share in width_ratios.")
    student = apply_slices(teacher, slices, changes)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.endswith(("embed_tokens.weight", "lm_head.weight")))
    kl_before = mean_kl(student, teacher, heldout)
    t0 = time.perf_counter()
    result = distill(student, teacher, train, steps=healing.steps or None, max_seconds=healing.minutes * 60 or None,
                     lr=healing.lr, bf16=resolved_bf16(None), cancelled=cancelled,
                     on_step=lambda s: say(min(0.95, s.fraction), f"healing the {width:.0%} narrower model: step "
                                                                 f"{s.step}, loss {s.loss:.4f}"))
    for p in student.parameters():
        p.requires_grad_(False)
    kl = mean_kl(student, teacher, heldout)
    with atomic_path(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(source_folder, tmp)
    return Narrowed(width, out, int(changes["intermediate_size"]), kl_before, kl, result.steps,
                    time.perf_counter() - t0)


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for f in Path(source).iterdir():
        if f.is_file() and not any(f.match(p) for p in WEIGHT_FILES) and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)

"""Knowledge distillation: a teacher model teaches a (pruned, shared, ...) student on token sequences.

One reusable training loop, used by the ``distill`` step, by LoRA fine-tuning, and by any technique that
heals a compressed model::

    from edgetailor.engine.distill import distill
    from edgetailor.engine.calibration import token_sequences

    seqs = token_sequences(tokenizer, calibration_text, seq_len=256, stride=64)
    result = distill(student, teacher, seqs, max_seconds=600, lr=1e-4,
                     checkpoint_dir=run_folder / "checkpoints", checkpoint_every=50,
                     on_step=lambda s: print(s.step, s.loss), cancelled=cancel_event.is_set)

* Loss: KL(teacher || student) of the next-token distributions at temperature ``temperature`` (times T^2),
  averaged over positions; plus ``hidden_weight`` x (1 - cosine) between hidden states where the shapes
  match (every block's output when both have the same depth and width, the final normalised hidden state
  when only the width matches; none otherwise, noted in the result). ``teacher=None`` trains on plain
  next-token cross-entropy instead (fine-tuning).
* Only parameters with ``requires_grad`` train (freeze embeddings or wrap in LoRA before calling); AdamW,
  linear warm-up then cosine decay to 10% over the budget (steps and/or seconds, whichever ends first).
* Each step draws ``batch_size`` random rows of ``sequences`` from a generator seeded by (seed, step), so a
  resumed run sees the same batches as an uninterrupted one.
* Checkpoints: ``<checkpoint_dir>/distill-step-NNNNNN/`` with ``model.safetensors`` (the student's
  state), ``optimizer.pt`` (read back with ``torch.load(weights_only=True)``) and ``state.json``; written
  atomically, the newest ``keep_checkpoints`` kept. ``resume_from`` takes a run folder, a checkpoints
  folder or one checkpoint folder and continues from its latest checkpoint (same student shapes needed).
* ``bf16=True`` runs the forward passes under bfloat16 autocast (weights and optimizer stay float32): much
  faster on CPUs with AVX512-BF16/AMX, slightly noisier gradients.
* ``cancelled()`` is checked before every step; a cancel raises ``RunCancelled``.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import atomic
from .errors import EdgeTailorError, RunCancelled

CHECKPOINT_PREFIX = "distill-step-"


@dataclass
class TrainingStep:
    step: int            # steps done so far (resumed ones included)
    loss: float
    lr: float
    seconds: float       # training seconds in this call
    fraction: float      # share of the budget used


@dataclass
class DistillResult:
    steps: int                         # total steps done (resumed ones included)
    start_step: int                    # step the run resumed from (0 = fresh)
    seconds: float                     # training seconds in this call
    stopped_by: str                    # "steps" or "time"
    losses: list[float] = field(default_factory=list)   # loss of every step of this call
    hidden_loss: str = "off"           # which hidden states were matched
    checkpoints: list[str] = field(default_factory=list)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) at temperature T, scaled by T^2."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _hidden_pairs(student, teacher) -> str:
    sc, tc = student.config, teacher.config
    if sc.hidden_size != tc.hidden_size:
        return "off (hidden sizes differ)"
    if sc.num_hidden_layers == tc.num_hidden_layers:
        return "all blocks"
    return "final hidden state"


def _hidden_loss(s_hidden, t_hidden, mode: str) -> torch.Tensor:
    pairs = list(zip(s_hidden[1:], t_hidden[1:])) if mode == "all blocks" else [(s_hidden[-1], t_hidden[-1])]
    losses = [(1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean() for a, b in pairs]
    return torch.stack(losses).mean()


def latest_checkpoint(path: str | Path) -> Path:
    """The newest checkpoint under a run folder, a checkpoints folder, or the checkpoint folder itself."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    for folder in (p / "checkpoints", p):
        found = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*")) if folder.is_dir() else []
        found = [f for f in found if (f / "state.json").exists()]
        if found:
            return found[-1]
    raise EdgeTailorError(f"No distillation checkpoint was found in {p}.",
                          "Give a run folder whose distillation wrote checkpoints (checkpoint_every > 0), "
                          "its checkpoints folder, or one distill-step-N folder.")


def save_checkpoint(folder: Path, student, optimizer, state: dict, keep: int = 1) -> Path:
    from safetensors.torch import save_model

    folder = Path(folder)
    final = folder / f"{CHECKPOINT_PREFIX}{state['step']:06d}"
    with atomic.atomic_path(final) as tmp:
        tmp.mkdir()
        save_model(student, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep] if keep > 0 else []
    for o in old:
        atomic.remove_path(o)
    return final


def load_checkpoint(path: Path, student, optimizer) -> dict:
    from safetensors.torch import load_model

    try:
        load_model(student, str(path / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise EdgeTailorError(f"The checkpoint {path} does not fit this model: {str(exc)[:300]}",
                              "Resume with the same recipe (same pruning before the distillation) and source.") from exc
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


def _lr_at(base: float, step: int, fraction: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


def _batch_loss(student, teacher, batch: torch.Tensor, temperature: float, hidden_mode: str, hidden_weight: float,
                bf16: bool) -> torch.Tensor:
    """KL to the teacher's next-token distribution (plus the hidden-state loss), or next-token cross-entropy
    without a teacher."""
    want_hidden = hidden_mode != "off"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = student(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
    if teacher is None:
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    loss = kl_loss(out.logits, t_out.logits, temperature)
    if want_hidden:
        loss = loss + hidden_weight * _hidden_loss(out.hidden_states, t_out.hidden_states, hidden_mode)
    return loss


def _resume(resume_from, student, optimizer) -> tuple[int, list[float]]:
    """The step and losses to go on from: the latest checkpoint's (its weights and optimizer state loaded)."""
    if not resume_from:
        return 0, []
    state = load_checkpoint(latest_checkpoint(resume_from), student, optimizer)
    return int(state["step"]), list(state.get("losses", []))


# Long by design: the training loop's budget, schedule, step and checkpoint read in one place.
def distill(student, teacher, sequences: torch.Tensor, *, steps: int | None = None, max_seconds: float | None = None,
            lr: float = 1e-4, batch_size: int = 1, temperature: float = 1.0, hidden_weight: float = 0.0,
            warmup_steps: int = 10, weight_decay: float = 0.0, seed: int = 0, bf16: bool = False,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 1,
            resume_from: str | Path | None = None, on_step: Callable[[TrainingStep], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> DistillResult:
    """Train ``student`` to match ``teacher`` (or, with ``teacher=None``, the next tokens) on ``sequences``.

    ``sequences`` is a LongTensor [n, seq_len] (see ``calibration.token_sequences``). Stops after ``steps``
    total steps or ``max_seconds`` of training in this call, whichever comes first (at least one is needed).
    The student is trained in place and left in eval mode.
    """
    # long: one training loop (warm-up, accumulation, autocast, checkpoints, resume), kept in one reading
    if not steps and not max_seconds:
        raise EdgeTailorError("Distillation needs a budget.", "Give steps and/or a time limit (max_minutes).")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise EdgeTailorError("The student has no trainable parameters.", "Unfreeze some of its weights.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, losses_before = _resume(resume_from, student, optimizer)
    hidden_mode = _hidden_pairs(student, teacher) if (teacher is not None and hidden_weight > 0) else "off"
    if teacher is not None:
        teacher.eval()
    student.train()
    result = DistillResult(steps=start, start_step=start, seconds=0.0, stopped_by="steps", hidden_loss=hidden_mode)
    t0 = time.perf_counter()
    step = start
    try:
        while True:
            elapsed = time.perf_counter() - t0
            fraction = max(step / steps if steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)
            if steps and step >= steps:
                break
            if max_seconds and elapsed >= max_seconds:
                result.stopped_by = "time"
                break
            if cancelled and cancelled():
                raise RunCancelled()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            batch = sequences[torch.randint(len(sequences), (batch_size,), generator=gen)]
            cur_lr = _lr_at(lr, step, fraction, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            loss = _batch_loss(student, teacher, batch, temperature, hidden_mode, hidden_weight, bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            result.losses.append(value)
            result.steps = step
            if on_step:
                on_step(TrainingStep(step, value, cur_lr, time.perf_counter() - t0, fraction))
            if checkpoint_dir and checkpoint_every and step % checkpoint_every == 0:
                state = {"step": step, "losses": losses_before + result.losses, "lr": lr, "seed": seed,
                         "batch_size": batch_size, "temperature": temperature}
                result.checkpoints.append(str(save_checkpoint(Path(checkpoint_dir), student, optimizer, state,
                                                              keep_checkpoints)))
    finally:
        student.eval()
        result.seconds = round(time.perf_counter() - t0, 3)
    return result


def mean_kl(student, teacher, sequences: torch.Tensor, batch_size: int = 2) -> float:
    """Mean KL(teacher || student) per position on held-out sequences (no training)."""
    total, n = 0.0, 0
    student.eval()
    teacher.eval()
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            ids = sequences[i:i + batch_size]
            kl = kl_loss(student(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids, use_cache=False).logits)
            total += float(kl) * ids.numel()
            n += ids.numel()
    return total / max(n, 1)

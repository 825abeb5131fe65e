"""Every exported file is checked against the model it was written from before it is kept.

"It loads" is not "it is right": a file can load and give finite logits and still be another model (a bias
dropped, a sliding window forgotten, q/k rows in the wrong order). Before a variant is kept, the file runs in
its own runtime on a few fixed token windows of the calibration text, and its next-token distributions are
compared at every position with those of the model it was exported from (torch, in this process): mean
KL(source || file) and top-1 agreement (on the positions the source decides), each against a bound for the
file's type. A file outside its bound
stops the run with the numbers; the figures are kept with the variant either way.

The bounds are loose enough for what each type's rounding does to a model (figures in ``TOLERANCES``) and
tight enough that a structural mistake, which moves the distribution by tenths of a nat at 16 bits, fails.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .context import RunContext
from .errors import EdgeTailorError
from .evaluate import log_softmax

WINDOWS = 2            # fixed windows of the calibration text (its start: the same tokens for every variant)
WINDOW_TOKENS = 64


@dataclass(frozen=True)
class Tolerance:
    max_kl: float      # mean KL(source || file) per position, nats
    min_top1: float    # share of positions whose argmax agrees with the source's


# First match wins; the pattern is matched against "format:TYPE" (upper case), e.g. "GGUF:Q4_K_M", "ONNX:INT4".
# 16-bit and wider files differ from the source by rounding alone (measured KL 1e-6..1e-4 on every family's
# tiny model and the demo model); Q8_0/int8 ~1e-3; 4-bit types 0.01-0.1 on trained models, up to ~0.3 on tiny
# random ones; 2-3-bit types up to ~1 on stories260K. A wrong file at 16 bits (the llama attention-bias case)
# measured KL 0.77, top-1 20%; Gemma 2 with a query scale llama.cpp does not read, KL 0.044, top-1 66%.
# Mixture-of-experts models flip an expert wherever two router logits nearly tie (a tiny random Mixtral: 6e-5
# apart at layer 0, KL 0.0027 and top-1 90% even at F32), hence 0.85 rather than 0.9 at 16 bits.
TOLERANCES: list[tuple[str, Tolerance]] = [
    (r".*:(F32|FP32)$", Tolerance(0.005, 0.95)),
    (r".*:(F16|BF16|FP16)$", Tolerance(0.02, 0.85)),
    (r".*:(Q8_0|INT8)$", Tolerance(0.1, 0.75)),
    (r".*:(Q6_K|Q5_.*)$", Tolerance(0.3, 0.5)),
    (r".*:(Q4_.*|IQ4_.*|INT4|MXFP4.*)$", Tolerance(1.0, 0.3)),
    (r".*:(Q3_.*|IQ3_.*)$", Tolerance(2.0, 0.15)),
    (r".*", Tolerance(4.0, 0.0)),          # 1-2-bit and ternary types: bounded, not close
]


def tolerance_for(fmt: str, qtype: str) -> Tolerance:
    key = f"{fmt}:{qtype}".upper()
    return next(tol for pattern, tol in TOLERANCES if re.fullmatch(pattern, key))


def check_windows(tokenizer, text: str) -> list[list[int]]:
    """The fixed token windows every variant is checked on (BOS first when the tokenizer uses one)."""
    from .evaluate import make_windows

    return make_windows(tokenizer, text, WINDOW_TOKENS, WINDOWS)


def source_logprobs(model, windows: list[list[int]]) -> list[np.ndarray]:
    """The source model's log-probabilities at every position of each window (torch, fp32 output)."""
    from .runtimes import TorchRuntime

    rt = TorchRuntime(model)
    return [log_softmax(rt.logits(w)) for w in windows]


#: a position where the source's first choice is at least twice as likely as its second is decided: there a
#: faithful file keeps the choice; elsewhere argmax flips with no real change
DECIDED_GAP_NATS = math.log(2)
#: fewer decided positions than this (flat distributions: random weights): top-1 agreement says nothing
MIN_DECIDED = 16


def compare(reference: list[np.ndarray], runtime, windows: list[list[int]]) -> dict:
    """Mean KL(reference || runtime), its largest per-position value and top-1 agreement over the windows, also on
    the positions the source decides (``DECIDED_GAP_NATS``)."""
    kls, agree, n, decided, agree_decided = [], 0, 0, 0, 0
    for ref, w in zip(reference, windows):
        logits = runtime.logits(w)
        if not np.isfinite(logits).all():
            return {"kl": float("inf"), "kl_max": float("inf"), "top1": 0.0, "positions": len(w),
                    "decided": len(w), "top1_decided": 0.0}
        lp = log_softmax(logits[:, : ref.shape[1]])
        kls.append((np.exp(ref) * (ref - lp)).sum(-1, dtype=np.float64))
        same = ref.argmax(-1) == lp.argmax(-1)
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] >= DECIDED_GAP_NATS
        agree += int(same.sum())
        decided, agree_decided = decided + int(sure.sum()), agree_decided + int((same & sure).sum())
        n += len(w)
    kl = np.concatenate(kls)
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / n, "positions": n,
            "decided": decided, "top1_decided": agree_decided / max(decided, 1)}


def verify_against_source(fmt: str, qtype: str, path, reference: list[np.ndarray], windows: list[list[int]],
                          open_runtime: Callable | None = None, threads: int | None = None) -> dict:
    """Run the file on the windows; raise with the numbers when it is not the source model within its type's bound."""
    from .runtimes import open_runtime as default_open

    opener = open_runtime or default_open
    try:
        with opener(fmt, path, n_ctx=max(len(w) for w in windows), threads=threads) as rt:
            found = compare(reference, rt, windows)
    except EdgeTailorError:
        raise
    except Exception as exc:      # the runtime refuses the file: it is not usable, whatever wrote it
        raise WrongFileError(f"The {fmt} {qtype} file does not run on {len(windows)} windows of "
                             f"{len(windows[0])} tokens: {type(exc).__name__}: {str(exc)[:300]}. It was not kept.",
                             "This is a bug in the exporter or the runtime for this model family; please report it "
                             "with the run folder. Meanwhile try the other format.") from exc
    tol = tolerance_for(fmt, qtype)
    # Top-1 counts only beside a distribution that moved, and on the positions the source decides: on flat
    # distributions (random weights, 50k tokens) argmax flips with no real change (a random 1B model's Q4_K_M:
    # KL 0.089, top-1 24%; its int4 RTN: KL 0.19, top-1 9%, with next to no decided position).
    top1_ok = found["decided"] < MIN_DECIDED or found["top1_decided"] >= tol.min_top1 or found["kl"] <= tol.max_kl / 10
    found.update(max_kl=tol.max_kl, min_top1=tol.min_top1, passed=found["kl"] <= tol.max_kl and top1_ok)
    if not found["passed"]:
        raise WrongFileError(
            f"The {fmt} {qtype} file does not reproduce the model it was exported from: on {found['positions']} "
            f"positions of fixed text, KL {found['kl']:.4g} nats (bound {tol.max_kl}) and top-1 agreement "
            f"{found['top1']:.1%} (bound {tol.min_top1:.0%}). It was not kept.",
            "This is a bug in the exporter or the runtime for this model family; please report it with the run "
            "folder. Meanwhile try the other format or another type.")
    return found


def walked_logprobs(model, windows: list[list[int]], cancelled=None) -> list[np.ndarray]:
    """A lazily read model's log-probabilities on the windows, one decoder block at a time (the block walker; the
    output head in fp32): the reference of a model that exists only as files (streamed transforms, a planner's
    pruned candidate)."""
    import torch

    from .calibration import final_logprobs

    lp = final_logprobs(model, torch.tensor(windows), cancelled=cancelled).numpy()
    return list(lp.reshape(len(windows), len(windows[0]), -1))


def export_checked(exporter, model, tokenizer, tokenizer_dir, tmp, options: dict, reference: Callable | None,
                   threads: int | None = None, progress=None, cancelled=None):
    """The one write-and-check of a file (the export loop's and the planner's candidates'): ``exporter`` writes
    ``model`` at ``tmp``, the file is loaded back in its runtime and, when ``reference()`` gives the fixed
    windows and the written model's log-probs on them, compared with it (raises with the numbers when off).
    Returns (the export result, its seconds, the runtime's load check, the agreement figures)."""
    import time

    from .errors import RunCancelled

    t0 = time.perf_counter()
    result = exporter.export(model, tokenizer, tokenizer_dir, tmp, options, progress=progress, cancelled=cancelled)
    seconds = time.perf_counter() - t0
    if reference is None:
        return result, seconds, {}, {}
    checked = exporter.verify(tmp)
    if not checked:
        raise EdgeTailorError(f"{tmp.name} could not be verified.", "See the log.")
    windows, logprobs = reference()
    found = verify_against_source(exporter.format, options.get("type"), tmp, logprobs, windows, threads=threads)
    if cancelled and cancelled():
        raise RunCancelled()
    return result, seconds, checked, {"verify_kl": round(found["kl"], 8), "verify_top1": round(found["top1"], 4)}


def check_reference(ctx: RunContext, model) -> tuple[list[list[int]], list[np.ndarray]]:
    """The fixed windows and ``model``'s log-probs on them, measured once per state of the model (held)."""
    if ctx.held("verification") is None:
        windows = check_windows(ctx.tokenizer, ctx.calibration_text())
        if getattr(model, "is_lazy", False) and ctx.applied:     # what streamed transforms left: walked
            reference = walked_logprobs(model, windows, cancelled=ctx.cancel.is_set)
        elif getattr(model, "is_lazy", False):       # the untouched source, never loaded: its reference runtime
            from .reference import open_reference

            with open_reference(ctx, n_ctx=WINDOW_TOKENS) as rt:
                reference = [log_softmax(rt.logits(w)) for w in windows]
        else:
            reference = source_logprobs(model, windows)
        ctx.hold("verification", (windows, reference))
    return ctx.held("verification")


class WrongFileError(EdgeTailorError):
    """An exported file that loads but is not the model it was exported from."""

    exit_code = 1

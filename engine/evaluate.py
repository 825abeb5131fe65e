"""Quality of a variant: perplexity, KL divergence from the baseline, and top-1 agreement.

Windowing follows llama.cpp's ``llama-perplexity`` so figures compare directly: the text is tokenized
once (with BOS first when the tokenizer adds one), cut into non-overlapping windows of ``ctx`` tokens
(the first token of each window replaced by BOS when BOS is used), and each window scores the
predictions of its second half. KL and top-1 compare the variant's next-token distribution with the
baseline's on exactly those positions; the baseline's log-probabilities are kept on disk as float16.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import EdgeTailorError, RunCancelled
from .runtimes import Runtime


@dataclass
class EvalResult:
    perplexity: float
    nll: float                    # mean negative log-likelihood, nats/token
    tokens_scored: int
    windows: int
    ctx: int
    seconds: float
    kl: float | None = None       # mean KL(baseline || variant), nats
    kl_p999: float | None = None  # its 99.9th percentile over the scored tokens
    top1: float | None = None     # share of positions where the argmax agrees with the baseline's
    runtime: str = ""
    per_window: list[dict] | None = None   # asked for: each window's nll, kl and top1 (means over its scored tokens)
    token_kl: list[float] | None = None    # asked for: every scored token's KL (results on more windows join exactly)

    def to_dict(self) -> dict:
        d = asdict(self)
        for optional in ("per_window", "token_kl"):
            if d[optional] is None:
                del d[optional]
        return d


def joined_results(first: dict, rest: dict) -> dict:
    """One result from two on consecutive windows of the same text (``EvalResult.to_dict`` with ``per_window`` and,
    where compared with a reference, ``token_kl``): the means weighted by the tokens scored, the 99.9th percentile
    of KL over both's tokens."""
    n1, n2 = first["tokens_scored"], rest["tokens_scored"]
    n = n1 + n2

    def mean(key):
        return None if first.get(key) is None else (first[key] * n1 + rest[key] * n2) / n

    nll = mean("nll")
    out = {**first, "nll": nll, "perplexity": math.exp(nll), "tokens_scored": n,
           "windows": first["windows"] + rest["windows"], "seconds": round(first["seconds"] + rest["seconds"], 3),
           "kl": mean("kl"), "top1": mean("top1"),
           "per_window": (first.get("per_window") or []) + (rest.get("per_window") or [])}
    if first.get("kl") is not None:
        tokens = np.asarray(first["token_kl"] + rest["token_kl"])
        out.update(kl_p999=float(np.quantile(tokens, 0.999)), token_kl=tokens.tolist())
    return out


def make_windows(tokenizer, text: str, ctx: int, max_windows: int | None) -> list[list[int]]:
    """Token windows as llama-perplexity builds them."""
    if ctx < 8:
        raise EdgeTailorError(f"An evaluation context of {ctx} tokens is too short.", "Use 64 tokens or more.")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = uses_bos(tokenizer)
    if bos is not None:
        ids = [bos] + ids
    n = len(ids) // ctx
    if max_windows:
        n = min(n, int(max_windows))
    if n < 1:
        raise EdgeTailorError(f"The evaluation text has {len(ids)} tokens, fewer than one window of {ctx}.",
                              "Pick a longer text or a shorter context.")
    windows = []
    for i in range(n):
        w = ids[i * ctx:(i + 1) * ctx]
        if bos is not None:
            w[0] = bos
        windows.append(w)
    return windows


def uses_bos(tokenizer) -> int | None:
    """The BOS id if this tokenizer puts BOS before a text (as llama.cpp's add_bos flag does), else None."""
    if tokenizer.bos_token_id is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax (row sums accumulated in float64): half the time of float64 at 1e-6 accuracy."""
    shifted = x.astype(np.float32, copy=False) - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - lse


class ReferenceLogprobs:
    """The baseline's log-probabilities on the scored positions, one float16 file per window."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return self.folder / f"window-{i:05d}.npy"

    def has(self, n: int) -> bool:
        return all(self.path(i).exists() for i in range(n))

    def put(self, i: int, logprobs: np.ndarray) -> None:
        tmp = self.folder / f".window-{i:05d}.tmp.npy"
        np.save(tmp, logprobs.astype(np.float16))
        tmp.replace(self.path(i))

    def get(self, i: int) -> np.ndarray:
        return np.load(self.path(i)).astype(np.float32)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def evaluate(runtime: Runtime, windows: Sequence[Sequence[int]], *, reference: ReferenceLogprobs | None = None,
             record_reference: bool = False, on_window: Callable[[int, int, float], None] | None = None,
             cancelled: Callable[[], bool] | None = None, per_window: bool = False, first_window: int = 0,
             token_kl: bool = False) -> EvalResult:
    """Score ``windows`` with ``runtime``.

    With ``record_reference`` the runtime is the baseline and its log-probs are stored in ``reference``;
    otherwise, if ``reference`` holds them, KL and top-1 agreement are computed against them. ``per_window``:
    each window's figures too (to compare with another file scored on some of the same windows);
    ``first_window``: ``windows`` start at that window of the reference's; ``token_kl``: every scored token's KL
    too (``joined_results`` makes one result of two on consecutive windows).
    """
    t0 = time.perf_counter()
    ctx = len(windows[0])
    first = ctx // 2
    nll_sum, count = 0.0, 0
    kl_sum, agree = 0.0, 0
    kls: list[np.ndarray] = []
    windows_seen: list[dict] = []
    compare = reference is not None and not record_reference and reference.has(first_window + len(windows))
    for i, w in enumerate(windows):
        if cancelled and cancelled():
            raise RunCancelled()
        logits = runtime.logits_rows(w, first, len(w) - 1)      # the scored positions' rows only
        if logits.shape[0] != len(w) - 1 - first:
            raise RuntimeError(f"runtime returned {logits.shape[0]} rows for positions {first}..{len(w) - 2}")
        lp = log_softmax(logits)
        targets = np.asarray(w[first + 1:])
        nll = -float(lp[np.arange(len(targets)), targets].sum(dtype=np.float64))
        nll_sum += nll
        count += len(targets)
        seen = {"nll": nll / len(targets)}
        if record_reference and reference is not None:
            reference.put(first_window + i, lp)
        elif compare:
            ref = reference.get(first_window + i)
            per_token = (np.exp(ref) * (ref - lp)).sum(-1, dtype=np.float64)
            same = int((ref.argmax(-1) == lp.argmax(-1)).sum())
            kls.append(per_token)
            kl_sum += float(per_token.sum())
            agree += same
            seen.update(kl=float(per_token.mean()), top1=same / len(targets))
        windows_seen.append(seen)
        if on_window:
            on_window(i + 1, len(windows), math.exp(nll_sum / count))
    nll = nll_sum / count
    return EvalResult(perplexity=math.exp(nll), nll=nll, tokens_scored=count, windows=len(windows), ctx=ctx,
                      seconds=round(time.perf_counter() - t0, 3),
                      kl=(kl_sum / count) if compare else None,
                      kl_p999=float(np.quantile(np.concatenate(kls), 0.999)) if compare else None,
                      top1=(agree / count) if compare else None,
                      runtime=getattr(runtime, "name", "?"), per_window=windows_seen if per_window else None,
                      token_kl=np.concatenate(kls).tolist() if compare and token_kl else None)


class Comparison:
    """A baseline and the variants measured against it on the same windows: the source model in torch, or any
    runtime (a 16-bit GGUF of a large model), its log-probs kept as the KL reference; then each variant in its
    runtime. ``edgetailor evaluate`` and the benchmarks run this one sequence::

        with Comparison(model, windows, threads=2) as cmp:    # evaluates the baseline
            res = cmp.score("gguf", path)                      # an EvalResult: perplexity, KL, p99.9, top-1
            cmp.row(res)                                       # the figures a results table shows
    """

    def __init__(self, baseline, windows: list[list[int]], threads: int | None = None,
                 folder: str | Path | None = None, on_window: Callable[[int, int, float], None] | None = None):
        import tempfile

        from .atomic import temp_prefix
        from .runtimes import TorchRuntime

        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix=temp_prefix("ref"))
        self.windows, self.threads, self.on_window = windows, threads, on_window
        self.reference = ReferenceLogprobs(Path(folder or self._tmp.name))
        runtime = baseline if isinstance(baseline, Runtime) else TorchRuntime(baseline, threads)
        self._running: list[float] = []          # the baseline's perplexity after each window

        def seen(i: int, n: int, ppl: float) -> None:
            self._running.append(ppl)
            if on_window:
                on_window(i, n, ppl)

        self.baseline = evaluate(runtime, windows, reference=self.reference, record_reference=True, on_window=seen)

    def score(self, fmt: str, path: str | Path, windows: int | None = None, **settings) -> EvalResult:
        """A variant (its format, its file or folder) in its runtime on the baseline's windows (the first
        ``windows`` of them when given: a slow variant scored on fewer)."""
        from .runtimes import open_runtime

        with open_runtime(fmt, path, n_ctx=len(self.windows[0]), threads=self.threads, **settings) as rt:
            return self.score_runtime(rt, windows)

    def score_runtime(self, runtime: Runtime, windows: int | None = None) -> EvalResult:
        """A variant already open in its runtime (one with no file: early exit in torch) on the same windows."""
        return evaluate(runtime, self.windows[:windows], reference=self.reference, on_window=self.on_window)

    def baseline_perplexity(self, windows: int | None = None) -> float:
        """The baseline's perplexity over its first ``windows`` windows (all by default): what a variant scored on
        fewer windows is compared with."""
        return self._running[min(windows or len(self._running), len(self._running)) - 1]

    def row(self, res: EvalResult) -> dict:
        base = self.baseline_perplexity(res.windows)
        return {"perplexity": res.perplexity, "ppl_increase_pct": 100 * (res.perplexity / base - 1),
                "kl": res.kl, "kl_p999": res.kl_p999, "top1": res.top1}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Building and measuring the planner's candidates: one self-contained task per file, run here, in local worker
processes, or as Ray tasks on a cluster, with the same results.

A ``CandidateTask`` carries everything its file needs as plain data (the source's path, the planned GGUF types
or the ONNX scheme, the calibration token ids, the paths of the verification and evaluation references in the
run's scratch folder, the benchmark setting); ``build_candidate`` writes the file atomically, checks it against
the source, and evaluates and benchmarks it with each KV-cache type asked (those in ``screened_kv`` on the first
``screen_windows`` evaluation windows only; ``score_file`` scores them on the rest later, if it comes to that).
Ray workers must see the same paths (a shared filesystem, or a single-machine cluster), as Ray's own docs advise
for data.

    results = run_tasks(tasks, executor="ray", address="auto")      # or "inline", "processes"
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EdgeTailorError, RunCancelled

EXECUTORS = ("inline", "processes", "ray")


@dataclass
class CandidateTask:
    name: str
    source: str                  # the source model's folder
    trust_remote_code: bool
    out: str                     # the GGUF to write (atomically)
    types: dict                  # GGUF tensor name -> type
    file_type: str               # llama.cpp file-type label
    method: str
    sequences: list              # calibration token ids [n][seq_len]
    verify: str                  # .npz with the fixed check windows and the source's log-probs on them
    eval_windows: list           # evaluation windows (token ids)
    reference: str               # ReferenceLogprobs folder of the baseline on those windows
    kv_types: list
    context: int
    prompt: list
    gen_tokens: int
    repeats: int
    threads: int
    dtype: str = "float32"
    drop_blocks: list = field(default_factory=list)   # decoder blocks removed (the types are the pruned file's)
    narrowed: bool = False       # ``source`` is a narrower, healed model (``engine.narrowed``), not the run's source
    energy: dict = field(default_factory=dict)   # EnergyMeter.to_dict()
    format: str = "gguf"         # gguf: ``types`` planned; onnx: ``onnx_options`` (one scheme for every matrix)
    onnx_options: dict = field(default_factory=dict)
    calibration_text: str = ""   # ONNX GPTQ's calibration (it tokenizes its own windows)
    encoded_cache: str = ""      # GGUF: tensors encoded for the run's earlier files (``gguf_calibrated.EncodedCache``)
    screened_kv: list = field(default_factory=list)   # KV types evaluated on the first ``screen_windows`` windows only
    screen_windows: int = 0
    scores: str = ""             # GGUF: a folder of earlier fits' scores of files with these bytes (``score_file``)

    def export_options(self) -> dict:
        from ..exporters.gguf_calibrated import Calibration

        if self.format == "onnx":
            method = "gptq" if self.method == "gptq" else "rtn"
            return {**self.onnx_options, "method": method, "calibration_text": self.calibration_text}
        import torch

        cache = None
        if self.encoded_cache:    # per model and set of removed blocks: removing blocks changes the later blocks' inputs
            model = f"{Path(self.source).name}-" if self.narrowed else ""
            cache = str(Path(self.encoded_cache) / f"{model}{self.method}-without-{'-'.join(map(str, self.drop_blocks)) or 'none'}")
        return {"type": self.file_type, "calibration": Calibration(torch.tensor(self.sequences), self.method,
                                                                   types=self.types, cache=cache)}


def save_verification(path: Path, windows: list[list[int]], reference: list) -> None:
    import numpy as np

    np.savez(path, **{f"w{i}": np.asarray(w) for i, w in enumerate(windows)},
             **{f"r{i}": r for i, r in enumerate(reference)})


def load_verification(path: str) -> tuple[list[list[int]], list]:
    import numpy as np

    with np.load(path) as z:
        n = sum(1 for k in z.files if k.startswith("w"))
        return [z[f"w{i}"].tolist() for i in range(n)], [z[f"r{i}"] for i in range(n)]


def build_candidate(task: CandidateTask, progress: Callable[[float, str], None] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> dict:
    """Write the task's file, check it against the source, evaluate and benchmark it per KV type. A file that
    fails its check is not kept: the result says why (``rejected``), and the plan goes on without it."""
    import torch

    from ..exporters import get_exporter
    from .atomic import atomic_path
    from .lazy import LazyModel
    from .modeling import load_tokenizer
    from .sources import resolve
    from .verification import WrongFileError, export_checked, walked_logprobs

    say = progress or (lambda f, m: None)
    source = resolve(task.source, trust_remote_code=task.trust_remote_code)
    model = LazyModel(source.path, trust_remote_code=task.trust_remote_code)
    if task.drop_blocks:
        model = model.without_blocks(task.drop_blocks)
    torch.set_num_threads(task.threads)

    def reference():      # checked against the model it was written from (without the dropped blocks, or narrower)
        windows, logprobs = load_verification(task.verify)
        return windows, walked_logprobs(model, windows, cancelled) if task.drop_blocks or task.narrowed else logprobs

    try:
        with atomic_path(Path(task.out)) as tmp:
            _, seconds, _, agreement = export_checked(
                get_exporter(task.format), model, load_tokenizer(source), source.path, tmp, task.export_options(),
                reference, threads=task.threads, progress=lambda f, m: say(0.6 * f, m), cancelled=cancelled)
    except WrongFileError as exc:
        return {"name": task.name, "path": task.out, "rejected": exc.problem, "measured": {}}
    out = {"name": task.name, "path": task.out, "seconds": seconds, "agreement": agreement, "measured": {}}
    for j, kv in enumerate(task.kv_types):
        say(0.6 + 0.4 * j / len(task.kv_types), f"{task.name}: evaluating and benchmarking with a {kv} KV cache")
        out["measured"][kv] = measure(task, kv, cancelled)
    return out


def measure(task: CandidateTask, kv: str, cancelled=None) -> dict:
    """The file with a ``kv`` cache evaluated (each window's figures kept: a screened KV type is compared with
    the full one on the same windows) and benchmarked at the app's context."""
    from .benchmark import benchmark_steady
    from .energy import EnergyMeter

    screened = kv in task.screened_kv
    res = score_file(task, kv, cancelled, task.screen_windows if screened else None, token_kl=screened)
    bench = benchmark_steady(task.format, task.out, task.prompt, gen_tokens=task.gen_tokens, repeats=task.repeats,
                             threads=task.threads, n_ctx=task.context, dtype=task.dtype,
                             meter=EnergyMeter.from_dict(task.energy) if task.energy else None,
                             cancelled=cancelled, kv_type=kv)
    return {"evaluation": res, "benchmark": bench, **({"screened": task.screen_windows} if screened else {})}


def score_file(task: CandidateTask, kv: str, cancelled=None, windows: int | None = None, skip: int = 0,
               token_kl: bool = False) -> dict:
    """The file with a ``kv`` cache scored on the task's evaluation windows (the first ``windows`` of them, after
    the first ``skip``), each window's figures kept (and every token's KL with ``token_kl``); with ``task.scores``
    the figures of a file with the same bytes on the same windows, where an earlier fit of the model scored one
    (then marked ``reused``)."""
    from .evaluate import ReferenceLogprobs, evaluate
    from .runtimes import open_runtime

    def score() -> dict:
        settings = {"kv_type": kv} if task.format == "gguf" else {}
        with open_runtime(task.format, task.out, n_ctx=len(task.eval_windows[0]), threads=task.threads, **settings) as rt:
            return evaluate(rt, task.eval_windows[skip:windows], reference=ReferenceLogprobs(Path(task.reference)),
                            cancelled=cancelled, per_window=True, first_window=skip, token_kl=token_kl).to_dict()

    if not task.scores or task.format != "gguf":
        return score()
    from .atomic import sha256_file
    from .measured_cache import digest, kept_json

    # the same bytes scored on the same windows by the same runtime: an earlier fit's figures (another budget)
    reads = [sha256_file(task.out), kv, task.eval_windows[skip:windows], skip, token_kl, task.threads, task.dtype]
    res, reused = kept_json(Path(task.scores) / f"{digest(reads)}.json", score)
    return {**res, "reused": True} if reused else res


def run_tasks(tasks: list[CandidateTask], executor: str = "inline", address: str | None = None, workers: int = 1,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> list[dict]:
    """Run the tasks and return their results in order. ``inline``: one after another here (progress within
    each, cancellable anywhere); ``processes``: ``workers`` spawned local processes; ``ray``: Ray tasks on the
    cluster at ``address`` ("local" starts a local instance)."""
    say = progress or (lambda f, m: None)
    if executor not in EXECUTORS:
        raise EdgeTailorError(f"Unknown executor '{executor}'.", f"Use one of {', '.join(EXECUTORS)}.")
    if executor == "inline":
        return [build_candidate(t, lambda f, m, k=k: say((k + f) / len(tasks), m), cancelled)
                for k, t in enumerate(tasks)]
    if executor == "processes":
        return _in_processes(tasks, workers, say, cancelled)
    return _on_ray(tasks, address, say, cancelled)


def _in_processes(tasks, workers, say, cancelled) -> list[dict]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(build_candidate, t): k for k, t in enumerate(tasks)}
        results: dict[int, dict] = {}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                results[futures[f]] = f.result()
                say(len(results) / len(tasks), f"{tasks[futures[f]].name} built and measured in a worker process")
            if cancelled and cancelled():
                raise RunCancelled()
        return [results[k] for k in range(len(tasks))]
    finally:
        stopped = [p for p in list(getattr(pool, "_processes", {}).values()) if p.is_alive()]
        for p in stopped:          # cancelled or failed: stop the others now
            p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        if stopped:
            sweep_outputs(tasks)


def _on_ray(tasks, address, say, cancelled) -> list[dict]:
    try:
        import ray
    except ImportError as exc:
        raise EdgeTailorError("Ray is not installed in this environment.",
                              "pip install 'edgetailor[ray]' (or ray), or run without --ray.") from exc
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise EdgeTailorError(f"No Ray cluster answers at {address}: {exc}",
                                  "Start one (ray start --head) or give its address (ray://host:10001 or host:6379).") from exc
    try:
        remote = ray.remote(build_candidate)
        refs = [remote.remote(t) for t in tasks]
        index = {r: k for k, r in enumerate(refs)}
        results: dict[int, dict] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for r in done:
                results[index[r]] = ray.get(r)
                say(len(results) / len(tasks), f"{tasks[index[r]].name} built and measured as a Ray task")
            if cancelled and cancelled():
                for r in pending:
                    ray.cancel(r, force=True)
                time.sleep(1.0)
                sweep_outputs(tasks)
                raise RunCancelled()
        return [results[k] for k in range(len(tasks))]
    finally:
        if started:
            ray.shutdown()


def sweep_outputs(tasks: list[CandidateTask]) -> None:
    """What stopped tasks leave beside their files: partial files and the writers' temporary folders."""
    from .atomic import remove_partials, remove_path

    for folder in {Path(t.out).parent for t in tasks}:
        remove_partials(folder)
        for p in folder.glob("edgetailor-*"):
            remove_path(p)

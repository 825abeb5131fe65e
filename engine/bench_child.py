"""The process that benchmarks one variant: ``python -m edgetailor.engine.bench_child SPEC.json``.

It runs in a fresh interpreter so that its memory is the variant's alone. It loads the variant, then
repeats (after one warm-up) a prefill of the prompt and a greedy decode of ``gen_tokens`` tokens, and
writes JSON lines on stdout for the parent (``engine.benchmark``), which samples its memory meanwhile:

    {"event": "loaded", "load_seconds": ...}
    {"event": "tokens", "repeat": r, "done": n}             after every generated token
    {"event": "result", "runs": [...], "peak_rss_os_bytes": ..., ...}

The variant is opened with ``runtimes.open_runtime`` (its format's runtime, with the spec's ``settings``);
the next token is the argmax of ``prefill`` then ``decode_one`` on the runtime's own cache (llama.cpp's KV
cache, transformers' ``past_key_values``, onnxruntime's present -> past; a runtime without one recomputes the
sequence, recorded as ``kv_cache: "full recompute"``).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def open_decoder(spec: dict):
    from .runtimes import open_runtime

    return open_runtime(spec["format"], spec["path"], n_ctx=int(spec["n_ctx"]), threads=int(spec["threads"]),
                        **spec.get("settings", {}))


def os_peak_rss_bytes() -> dict:
    """The kernel's own high-water mark of this process: /proc's VmHWM, else getrusage's ru_maxrss.

    On Linux ru_maxrss carries over the parent's peak across fork/vfork + exec, so it is only the fallback
    (macOS, which has no /proc, reports it for this process image).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_os_bytes": int(line.split()[1]) * 1024, "peak_rss_os_source": "VmHWM"}
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_os_bytes": ru if sys.platform == "darwin" else ru * 1024, "peak_rss_os_source": "ru_maxrss"}


def run_queue_seconds() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux's per-thread schedstat):
    the time other processes took from it. None where the kernel does not say."""
    total = 0.0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return None
    return total


def say(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def run_once(dec, prompt: list[int], gen_tokens: int, meter, repeat: int) -> dict:
    """One prefill + greedy decode; times, CPU seconds and energy of each phase."""
    e0, c0, t0 = meter.read(), time.process_time(), time.perf_counter()
    nxt = int(np.argmax(dec.prefill(prompt)))
    t1, c1, e1, w1 = time.perf_counter(), time.process_time(), meter.read(), run_queue_seconds()
    say(event="tokens", repeat=repeat, done=1)
    for i in range(gen_tokens - 1):
        nxt = int(np.argmax(dec.decode_one(nxt)))
        say(event="tokens", repeat=repeat, done=i + 2)
    t2, c2, e2, w2 = time.perf_counter(), time.process_time(), meter.read(), run_queue_seconds()
    decoded = gen_tokens - 1
    return {"ttft_seconds": t1 - t0, "prefill_tps": len(prompt) / (t1 - t0),
            "decode_seconds": t2 - t1, "decode_tps": decoded / (t2 - t1) if decoded else None,
            "prefill_cpu_seconds": c1 - c0, "decode_cpu_seconds": c2 - c1,
            "decode_wait_seconds": None if w1 is None or w2 is None else max(0.0, w2 - w1),
            "prefill_energy_j": meter.joules(e0, e1, c1 - c0), "decode_energy_j": meter.joules(e1, e2, c2 - c1),
            "tokens_generated": gen_tokens}


def main(argv: list[str]) -> int:
    from .energy import EnergyMeter

    spec = json.loads(Path(argv[0]).read_text())
    meter = EnergyMeter.from_dict(spec["energy"])
    t = time.perf_counter()
    dec = open_decoder(spec)
    load_seconds = time.perf_counter() - t
    say(event="loaded", load_seconds=load_seconds)
    prompt = [int(x) for x in spec["prompt"]]
    runs = []
    for r in range(int(spec["warmup"]) + int(spec["repeats"])):
        res = run_once(dec, prompt, int(spec["gen_tokens"]), meter, r)
        res["warmup"] = r < int(spec["warmup"])
        runs.append(res)
    say(event="result", load_seconds=load_seconds, runs=runs, runtime=dec.name, kv_cache=dec.kv_cache,
        **os_peak_rss_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

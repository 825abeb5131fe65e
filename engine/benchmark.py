"""Benchmark one variant in a fresh process while sampling its memory: the measuring half of ``benchmark``.

    res = benchmark_variant("gguf", path, prompt_ids, gen_tokens=64, repeats=3, threads=2,
                            on_sample=lambda series, value: ...)
    res["decode_tps"], res["peak_rss_bytes"], res["energy_j_per_token"], res["energy_provenance"]

The child (``engine.bench_child``) loads the variant and runs one warm-up plus ``repeats`` prefill + greedy
decode passes. This process samples the child's resident memory and CPU use with psutil at ``sample_hz``
(default 25 Hz) and streams them through ``on_sample`` with the tokens done; the child reports the kernel's own
peak (ru_maxrss, VmHWM) when it ends. Speeds are medians over the repeats; energy per token is the decode
phase's energy over the tokens it decoded.

Interference shows in the run queue: the seconds the child's threads spent runnable but waiting for a CPU (Linux's
schedstat) over the decode's wall seconds x threads. About 0.01 on a quiet machine (0.05 for a model so small that
its threads mostly wake and sleep: each wake-up waits a few microseconds), 0.4-0.5 with a busy process per core;
past ``CONTENDED_WAIT_SHARE`` other processes were taking CPU time from the benchmark (on a 2-core machine one busy
process slows llama.cpp's spinning threads up to tens of times; light interference, up to about 0.1, costs ~10%).
``benchmark_steady`` runs such a benchmark again and keeps the least disturbed result.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .atomic import temp_prefix
from .energy import EnergyMeter
from .errors import EdgeTailorError, RunCancelled

CONTENDED_WAIT_SHARE = 0.1      # a pass whose threads waited for a CPU longer than this share of their time


def decode_settings(fmt: str, dtype: str, kv_type: str) -> dict:
    """The runtime settings a variant is benchmarked with: as an app decodes (llama.cpp: last logits only)."""
    return {"gguf": {"kv_type": kv_type, "all_logits": False}, "torch": {"dtype": dtype}}.get(fmt, {})


class _Child:
    """The benchmark child process (``bench_child``), its JSON lines read as they come, its memory sampled."""

    def __init__(self, spec_file: Path):
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgetailor.engine.bench_child", str(spec_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.messages: list[dict] = []
        self.stderr: list[str] = []
        self.tokens_done = 0
        self.readers = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)]
        for r in self.readers:
            r.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.messages.append(msg)
            if msg.get("event") == "tokens":
                self.tokens_done += 1

    def sample(self, hz: float, on_sample, cancelled, timeout_s: float, path) -> tuple[int, int]:
        """RSS and CPU at ``hz`` until the child exits: (peak RSS, samples taken)."""
        import psutil

        child = psutil.Process(self.proc.pid)
        peak, n_samples, last_tokens = 0, 0, -1
        next_sample = time.perf_counter()
        child.cpu_percent(None)
        while self.proc.poll() is None:
            if cancelled and cancelled():
                raise RunCancelled()
            if time.perf_counter() - self.t_start > timeout_s:
                raise EdgeTailorError(f"The benchmark of {Path(path).name} ran past {timeout_s:.0f} s.",
                                      "Generate fewer tokens or fewer repeats.")
            try:
                rss = child.memory_info().rss
                cpu = child.cpu_percent(None)
            except psutil.NoSuchProcess:
                break
            peak, n_samples = max(peak, rss), n_samples + 1
            on_sample("rss_bytes", rss)
            on_sample("cpu_percent", cpu)
            if self.tokens_done != last_tokens:
                last_tokens = self.tokens_done
                on_sample("tokens_done", last_tokens)
            next_sample += 1.0 / hz
            time.sleep(max(0.0, next_sample - time.perf_counter()))
        return peak, n_samples

    def stop(self) -> None:
        """Kill the child if it still runs (cancel, timeout, an error here), reap it, finish reading."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for r in self.readers:
            r.join(timeout=5)


def benchmark_variant(fmt: str, path: str | Path, prompt: list[int], *, gen_tokens: int = 64, repeats: int = 3,
                      warmup: int = 1, threads: int = 2, n_ctx: int = 512, dtype: str = "float32",
                      meter: EnergyMeter | None = None, sample_hz: float = 25.0,
                      on_sample: Callable[[str, float], None] | None = None,
                      cancelled: Callable[[], bool] | None = None, timeout_s: float = 1800,
                      kv_type: str = "f16") -> dict:
    if len(prompt) + gen_tokens > n_ctx:
        raise EdgeTailorError(f"The prompt ({len(prompt)} tokens) plus {gen_tokens} generated tokens exceed the "
                              f"context of {n_ctx}.", "Raise the context or shorten the prompt.")
    meter = meter or EnergyMeter.detect()
    spec = {"format": fmt, "path": str(path), "prompt": list(map(int, prompt)), "gen_tokens": gen_tokens,
            "repeats": repeats, "warmup": warmup, "threads": threads, "n_ctx": n_ctx,
            "energy": meter.to_dict(), "settings": decode_settings(fmt, dtype, kv_type)}
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench")) as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        child = _Child(spec_file)
        try:
            peak, n_samples = child.sample(sample_hz, on_sample or (lambda s, v: None), cancelled, timeout_s, path)
        finally:
            child.stop()
        wall = time.perf_counter() - child.t_start
    proc, messages, stderr = child.proc, child.messages, child.stderr
    result = next((m for m in messages if m.get("event") == "result"), None)
    if proc.returncode != 0 or result is None:
        tail = "".join(stderr)[-1500:]
        raise EdgeTailorError(f"The benchmark of {Path(path).name} ({fmt}) failed (exit {proc.returncode}): {tail}",
                              "Check that the variant loads (edgetailor evaluate), and that memory suffices.")
    return summarize(result, peak, n_samples, wall, threads, meter)


def benchmark_steady(fmt: str, path: str | Path, prompt: list[int], *, attempts: int = 2, log=None, **kw) -> dict:
    """``benchmark_variant``, run again (``attempts`` times in all at most) while its decode passes were slowed by
    other processes (``contended``); the least disturbed result, with the attempts it took."""
    best = None
    for attempt in range(1, attempts + 1):
        res = benchmark_variant(fmt, path, prompt, **kw)
        if best is None or (res["decode_wait_share"] or 0) < (best["decode_wait_share"] or 0):
            best = res
        if not res["contended"]:
            break
        if log:
            log(f"{Path(path).name}: other processes took CPU time from the benchmark (its threads waited for a CPU "
                f"{res['decode_wait_share']:.0%} of the time)" + ("; measuring again" if attempt < attempts else ""))
    best["attempts"] = attempt
    return best


def wait_shares(runs: list[dict], threads: int) -> list[float]:
    """Each decoding pass's seconds waiting for a CPU over its wall seconds x threads, in the order of
    ``decode_tps_runs``; empty where the kernel does not say."""
    return [r["decode_wait_seconds"] / (r["decode_seconds"] * threads) for r in runs
            if r.get("decode_tps") and r.get("decode_wait_seconds") is not None]


def summarize(result: dict, sampled_peak: int, n_samples: int, wall: float, threads: int,
              meter: EnergyMeter) -> dict:
    runs = [r for r in result["runs"] if not r["warmup"]]

    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    decoded = runs[0]["tokens_generated"] - 1
    waits = wait_shares(runs, threads)
    wait = statistics.median(waits) if waits else None
    prompt_tokens = round(runs[0]["prefill_tps"] * runs[0]["ttft_seconds"])
    decode_j = med("decode_energy_j")
    run_j = statistics.median([r["prefill_energy_j"] + r["decode_energy_j"] for r in runs])
    return {
        "load_seconds": round(result["load_seconds"], 4),
        "peak_rss_bytes": max(sampled_peak, 0),
        "peak_rss_os_bytes": result["peak_rss_os_bytes"],
        "peak_rss_os_source": result["peak_rss_os_source"],
        "rss_samples": n_samples,
        "rss_sample_hz": round(n_samples / wall, 1) if wall else None,
        "ttft_seconds": round(med("ttft_seconds"), 5),
        "prefill_tps": round(med("prefill_tps"), 2),
        "decode_tps": round(med("decode_tps"), 2) if med("decode_tps") else None,
        "decode_tps_runs": [round(r["decode_tps"], 2) for r in runs if r.get("decode_tps")],
        "threads": threads,
        "bench_prompt_tokens": prompt_tokens,
        "bench_gen_tokens": runs[0]["tokens_generated"],
        "bench_repeats": len(runs),
        "bench_runtime": result["runtime"],
        "bench_kv_cache": result["kv_cache"],
        "decode_cpu_seconds": round(med("decode_cpu_seconds"), 4),
        "decode_wait_share": round(wait, 4) if wait is not None else None,
        "decode_wait_share_runs": [round(x, 4) for x in waits],
        "contended": wait is not None and wait > CONTENDED_WAIT_SHARE,
        "energy_j": round(run_j, 4),
        "energy_j_per_token": round(decode_j / decoded, 6) if decoded and decode_j is not None else None,
        "energy_provenance": meter.provenance,
        "energy_measured": meter.measured,
    }

"""The process that benchmarks one variant: ``python -m edgetailor.engine.bench_child SPEC.json``.

It runs in a fresh interpreter so that its memory is the variant's alone. It loads the variant, then
repeats (after one warm-up) a prefill of the prompt and a greedy decode of ``gen_tokens`` tokens, and
writes JSON lines on stdout for the parent (``engine.benchmark``), which samples its memory meanwhile:

    {"event": "loaded", "load_seconds": ...}
    {"event": "tokens", "repeat": r, "done": n}             after every generated token
    {"event": "result", "runs": [...], "peak_rss_os_bytes": ..., ...}

Decoders:
    gguf   llama.cpp through llama-cpp-python: ``Llama.eval`` (prefill in one batch, then one token at a
           time on its KV cache), next token = argmax of llama.cpp's last logits
    torch  the Hugging Face model with its KV cache (``past_key_values``), logits of the last position only
    other  any format with a registered runtime (``runtimes.open_runtime``): a runtime with
           ``prefill``/``decode_one`` methods keeps its own cache (ONNX); otherwise ``logits`` recomputes the whole
           sequence per token (recorded as ``decoder: "full recompute"``)
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


class LlamaCppDecoder:
    name = "llama.cpp"
    kv_cache = "llama.cpp KV cache (f16)"

    def __init__(self, path: str, n_ctx: int, threads: int, kv_type: str = "f16"):
        from llama_cpp import Llama

        from .runtimes import llama_kv_settings

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False, **llama_kv_settings(kv_type))
        self.kv_cache = f"llama.cpp KV cache ({kv_type})"
        self.n_vocab = self.llm.n_vocab()

    def _last(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill(self, tokens: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._last()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._last()


class TorchDecoder:
    name = "torch"
    kv_cache = "transformers DynamicCache"

    def __init__(self, path: str, threads: int, dtype: str):
        import torch

        from .modeling import load_model
        from .sources import resolve

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_model(resolve(path), dtype).model
        self.past = None

    def _step(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids], dtype=self.torch.long),
                             past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        self.past = None
        return self._step(tokens)

    def decode(self, token: int) -> int:
        return self._step([token])


class RuntimeDecoder:
    """Any registered runtime; uses its own cache if it offers prefill and decode_one (or decode)."""

    def __init__(self, fmt: str, path: str, n_ctx: int, threads: int):
        from .runtimes import open_runtime

        self.rt = open_runtime(fmt, path, n_ctx=n_ctx, threads=threads)
        self.name = getattr(self.rt, "name", fmt)
        self.step = getattr(self.rt, "decode_one", None) or getattr(self.rt, "decode", None)
        self.cached = hasattr(self.rt, "prefill") and self.step is not None
        self.kv_cache = f"{self.name} cache" if self.cached else "full recompute (Runtime.logits)"
        self.tokens: list[int] = []

    def prefill(self, tokens: list[int]) -> int:
        self.tokens = list(tokens)
        if self.cached:
            return int(np.argmax(self.rt.prefill(self.tokens)))
        return int(np.argmax(self.rt.logits(self.tokens)[-1]))

    def decode(self, token: int) -> int:
        self.tokens.append(token)
        if self.cached:
            return int(np.argmax(self.step(token)))
        return int(np.argmax(self.rt.logits(self.tokens)[-1]))


def open_decoder(spec: dict):
    fmt, path, threads = spec["format"], spec["path"], int(spec["threads"])
    if fmt == "gguf":
        return LlamaCppDecoder(path, int(spec["n_ctx"]), threads, spec.get("kv_type", "f16"))
    if fmt == "torch":
        return TorchDecoder(path, threads, spec.get("dtype", "float32"))
    return RuntimeDecoder(fmt, path, int(spec["n_ctx"]), threads)


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


def say(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def run_once(dec, prompt: list[int], gen_tokens: int, meter, repeat: int) -> dict:
    """One prefill + greedy decode; times, CPU seconds and energy of each phase."""
    e0, c0, t0 = meter.read(), time.process_time(), time.perf_counter()
    nxt = dec.prefill(prompt)
    t1, c1, e1 = time.perf_counter(), time.process_time(), meter.read()
    say(event="tokens", repeat=repeat, done=1)
    for i in range(gen_tokens - 1):
        nxt = dec.decode(nxt)
        say(event="tokens", repeat=repeat, done=i + 2)
    t2, c2, e2 = time.perf_counter(), time.process_time(), meter.read()
    decoded = gen_tokens - 1
    return {"ttft_seconds": t1 - t0, "prefill_tps": len(prompt) / (t1 - t0),
            "decode_seconds": t2 - t1, "decode_tps": decoded / (t2 - t1) if decoded else None,
            "prefill_cpu_seconds": c1 - c0, "decode_cpu_seconds": c2 - c1,
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

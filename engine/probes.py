"""Measured on probes, once per machine and setting (cached): what the projection cannot compute from a file.

* ``measure_overhead``: the runtime's own memory beyond weights and KV cache (a one-layer model with the
  source's vocabulary and tokenizer runs the same benchmark as the variants);
* ``measure_decode_model``: what one generated token costs the runtime (fixed, per layer, and weights per second
  of each storage type), from random models of the source's architecture at its own shapes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .architectures import ModelDims
from .atomic import temp_prefix
from .errors import EdgeTailorError
from .projection import kv_cache_bytes, kv_plan, project_decode, variant_info


def _probe_cache(name: str, fmt: str, source_folder, *setting) -> tuple[Path, dict, str]:
    """(cache file, what it holds, this setting's key): probe results keyed by runtime, the source's config,
    the benchmark setting and the library versions."""
    import hashlib

    from .paths import cache_dir
    from .runs import library_versions

    cfg_text = (Path(source_folder) / "config.json").read_text()
    key = hashlib.sha256(json.dumps([fmt, cfg_text, *setting, library_versions()], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    cache = cache_dir() / name
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    return cache, known, key


# --- runtime overhead, measured --------------------------------------------------------------------
TINY_SHAPE = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


def make_overhead_probe(source_folder: str | Path, out: Path, shape: dict | None = None) -> Path:
    """A random model of the source's architecture, with its tokenizer and vocabulary: one layer, 64 wide,
    unless ``shape`` says otherwise."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import keep_layers

    cfg = AutoConfig.from_pretrained(str(source_folder))
    for k, v in (shape or TINY_SHAPE).items():
        if k == "num_hidden_layers":
            keep_layers(cfg, list(range(int(v))))
        else:
            setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(source_folder).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                "special_tokens_map.json", "chat_template.jinja", "edgetailor.json", "generation_config.json")):
            shutil.copy(f, out / f.name)
    return out


def measure_overhead(fmt: str, source_folder: str | Path, prompt: list[int], gen_tokens: int, n_ctx: int,
                     threads: int, dtype: str = "float32", meter=None, refresh: bool = False) -> dict:
    """Memory a runtime needs beyond weights and KV cache, measured on this machine, cached per setting.

    The probe (``make_overhead_probe``) runs the same benchmark (prompt, tokens, context, threads) in a fresh
    process; overhead = its OS-reported peak - its weights - its KV cache. It holds the interpreter, the
    runtime's libraries, the tokenizer/vocabulary structures and the compute buffers a pass touches.
    """
    import tempfile

    from . import atomic
    from .benchmark import benchmark_variant
    from .modeling import load_model
    from .sources import resolve

    cache, known, key = _probe_cache("runtime-overhead.json", fmt, source_folder, len(prompt), gen_tokens, n_ctx,
                                     threads, dtype)
    if key in known and not refresh:
        return known[key]
    if fmt not in ("gguf", "torch", "onnx"):
        raise EdgeTailorError(f"Runtime overhead is measured for gguf, onnx and torch variants, not '{fmt}'.",
                              "Its memory is measured by the benchmark; the prediction is left out.")
    with tempfile.TemporaryDirectory(prefix=temp_prefix("overhead")) as tmp:
        folder = make_overhead_probe(source_folder, Path(tmp) / "probe")
        path = folder
        if fmt in ("gguf", "onnx"):          # the probe in the runtime's format, full precision
            from ..exporters import get_exporter

            loaded = load_model(resolve(str(folder)))
            path = Path(tmp) / ("probe.gguf" if fmt == "gguf" else "probe-onnx")
            get_exporter(fmt).export(loaded.model, loaded.tokenizer, folder, path,
                                     {"type": "F32" if fmt == "gguf" else "fp32"})
            del loaded
        res = benchmark_variant(fmt, path, prompt, gen_tokens=gen_tokens, repeats=3, warmup=1, threads=threads,
                                n_ctx=n_ctx, dtype=dtype, meter=meter)
        info = variant_info(fmt, path, dtype, tokens_used=len(prompt) + gen_tokens)
    tokens, bpe, _ = kv_plan(fmt, n_ctx, len(prompt) + gen_tokens, dtype)
    kv = kv_cache_bytes(info, tokens, bpe)
    peak = max(res["peak_rss_os_bytes"], res["peak_rss_bytes"])
    from .devices import host_profile

    probe_roofline = project_decode(host_profile(), info, len(prompt) + gen_tokens, bpe)["roofline_tps"]
    latency = max(0.0, 1.0 / res["decode_tps"] - 1.0 / probe_roofline)
    entry = {"overhead_bytes": int(peak - info.resident_bytes - kv), "probe_peak_bytes": peak,
             "token_latency_s": latency, "probe_decode_tps": res["decode_tps"],
             "probe_weights_bytes": info.resident_bytes, "probe_kv_bytes": kv, "runtime": fmt,
             "method": f"one-layer probe of the same architecture and vocabulary, {len(prompt)} prompt + "
                       f"{gen_tokens} tokens, context {n_ctx}, {threads} threads: memory = peak - weights - KV; "
                       "latency per token = its decode time per token - its roofline time"}
    known[key] = entry
    atomic.write_json(cache, known)
    return entry


# --- decode cost model, measured --------------------------------------------------------------------
# llama.cpp's file type whose pure quantization stores every matrix as this ggml type (where its rows allow)
GGUF_FTYPE_OF = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
                 "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M",
                 "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL"}
TINY_LAYERS = (1, 5)             # 64-wide probes: fixed and per-layer cost of the runtime per token
RESOLUTION_S = 1e-6              # a kernel time too small to separate from the runtime's own costs
DECODE_MODEL_VERSION = 3        # what the cached models hold and how they were timed (3: KV and head types at depth)
DEPTH_BASE = "Q4_0"             # the deep probe's type when KV-cache and head types are timed at the model's depth
PROBE_F32_BYTES = 2e9            # the largest float32 probe at the source's shapes (big models get fewer layers)


def source_dims(source_folder: str | Path) -> ModelDims:
    return ModelDims.of(json.loads((Path(source_folder) / "config.json").read_text()))


def shape_probe_layers(source_folder: str | Path) -> tuple[int, int]:
    """Layer counts of the probe pair at the source's own shapes: one layer, and all its layers (fewer for
    models whose float32 probe would pass PROBE_F32_BYTES). The deep probe meets the caches and memory as the
    model does; time per token is not linear in layers on a machine with large caches, so the pair spans the
    whole depth rather than interpolating from a shallow part of it."""

    d = source_dims(source_folder)
    per_layer = 4 * (d.hidden * (2 * d.q_dim + 2 * d.kv_dim) + 3 * d.hidden * d.intermediate)
    return 1, max(2, min(d.layers, int(PROBE_F32_BYTES // per_layer)))


def measure_decode_model(fmt: str, source_folder: str | Path, types, prompt: list[int], gen_tokens: int,
                         n_ctx: int, threads: int, dtype: str = "float32", meter=None, refresh: bool = False,
                         log=None, kv_types=("f16",)) -> dict:
    """What one generated token costs this runtime on this machine, measured on probes, cached per setting.

    * fixed and per-layer cost: 64-wide random models of the source's architecture and vocabulary with 1 and
      5 layers (their small weights are taken off by the bandwidth roofline);
    * per storage type: random models with the source's own widths, heads and vocabulary and one layer and
      all its layers (``shape_probe_layers``), every matrix in that type (llama.cpp's pure quantization; rows
      a type cannot hold fall back, as in real files): the slope of time per token over layers is the blocks'
      time, the intercept less the fixed cost the head's. Block rate of a type = its weights per layer / (slope - per-layer cost - the time of the
      fallback types' weights at their own rates); head rate = head weights / head time.
    * at depth (``_DecodeProbes.at_depth``), on the deep probe in Q4_0: per llama.cpp KV-cache type
      (``kv_types``; the probes above run with f16, without flash attention) its difference to f16 per layer
      (``kv_layer_s``; quantized caches run flash attention), and per head type its difference to the Q4_0 head
      (``head_delta_s``): a head timed beside one layer finds the cache nearly to itself.

    ``project_decode`` then takes per token: fixed + layers x (per-layer cost + the KV type's) + max(roofline,
    kernel time). Probes are timed by their fastest undisturbed pass; a model measured while other processes
    kept taking CPU time (``benchmark.CONTENDED_WAIT_SHARE``) is used for this run but not cached. A cached model
    is checked on every later run: its 1-layer 64-wide probe is timed again, and where this machine now takes more
    than ``SPEED_DRIFT`` more or less time per token, the costs are scaled by that ratio (``speed_check``).
    """
    import tempfile

    from . import atomic
    from .devices import cpu_model

    if fmt not in ("gguf", "torch"):
        raise EdgeTailorError(f"The decode cost model is measured for gguf and torch variants, not '{fmt}'.",
                              "Its speed is measured by the benchmark; the projection is a roofline only.")
    cache, known, key = _probe_cache("decode-model.json", fmt, source_folder, len(prompt), gen_tokens, n_ctx,
                                     threads, dtype, cpu_model(), DECODE_MODEL_VERSION)
    entry = {} if refresh else known.get(key, {})
    cached = "fixed_s" in entry
    pair = shape_probe_layers(source_folder)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("decode-model")) as tmp:
        probes = _DecodeProbes(fmt, source_folder, Path(tmp), prompt, gen_tokens, n_ctx, threads, dtype, meter,
                               log or (lambda m: None))
        probes.complete(entry, types, kv_types_of(source_folder, kv_types), pair)
        contended = probes.contended
        check = probes.speed_check(entry) if cached else None
    solve_rates(entry)
    # probes as deep as the model met the caches and memory as it does: their rates need no roofline here
    entry["whole_depth"] = pair[1] >= source_dims(source_folder).layers
    entry["method"] = (f"measured on this machine: {'/'.join(map(str, TINY_LAYERS))}-layer 64-wide probes (fixed and "
                       f"per-layer cost per token) and {'/'.join(map(str, pair))}-layer probes at the source's "
                       f"own shapes, one pair per storage type (block and head weights per second); {len(prompt)} "
                       f"prompt + {gen_tokens} tokens, context {n_ctx}, {threads} threads"
                       + (f"; on the deep Q4_0 probe: KV-cache types {', '.join(sorted(entry['kv_layer_s']))}, "
                          f"head types {', '.join(sorted(entry['head_delta_s'])) or 'none other'}"
                          if entry.get("kv_layer_s") is not None else ""))
    say = log or (lambda m: None)
    if contended:
        say(f"decode cost model: {contended} probe(s) timed while other processes took CPU time; used for this run, "
            "not cached (the next run measures again)")
        return _with_speed_check({**entry, "contended_probes": contended}, check, say)
    known[key] = entry
    atomic.write_json(cache, known)
    return _with_speed_check(entry, check, say)


#: a cached decode cost model is scaled when this machine now runs its speed-check probe this much slower or faster
SPEED_DRIFT = 0.15


def _with_speed_check(entry: dict, check: dict | None, say) -> dict:
    """A cached model scaled by the speed check's ratio when it drifted past ``SPEED_DRIFT`` (a laptop on battery,
    a shared host's busy neighbour: the costs were measured on another day), with the check recorded."""
    if not check:
        return entry
    ratio = check.get("ratio")
    applied = ratio is not None and abs(ratio - 1) > SPEED_DRIFT
    if applied:
        say(f"decode cost model: this machine runs {ratio:.2f}x the time per token it took when the costs were "
            f"measured (speed check); the cached costs are scaled by it")
    return {**(scaled_decode_model(entry, ratio) if applied else entry), "speed_check": {**check, "applied": applied}}


def scaled_decode_model(entry: dict, ratio: float) -> dict:
    """The decode costs of this machine running ``ratio`` times slower: every time per token times ``ratio``, every
    rate and the machine's compute (which carries the costs to a device) divided by it."""
    out = dict(entry)
    for k in ("fixed_s", "per_layer_s"):
        out[k] = entry[k] * ratio
    out["kv_layer_s"] = {t: v * ratio for t, v in (entry.get("kv_layer_s") or {}).items()}
    for k in ("layer_rates", "head_rates"):
        out[k] = {t: r / ratio for t, r in (entry.get(k) or {}).items()}
    if entry.get("host_gflops"):
        out["host_gflops"] = entry["host_gflops"] / ratio
    return out


class _DecodeProbes:
    """The probe models of ``measure_decode_model``, made in ``tmp`` once each, and their timed decoding."""

    def __init__(self, fmt, source_folder, tmp: Path, prompt, gen_tokens, n_ctx, threads, dtype, meter, say):
        from .devices import host_profile

        self.fmt, self.source_folder, self.tmp, self.say = fmt, source_folder, tmp, say
        self.prompt, self.gen_tokens, self.n_ctx, self.threads, self.dtype, self.meter = (
            prompt, gen_tokens, n_ctx, threads, dtype, meter)
        self.host = host_profile()
        self.made: dict[str, Path] = {}
        self.contended = 0          # probes whose every attempt was slowed by other processes

    def complete(self, entry: dict, types, kv_types: list[str], pair: tuple[int, int]) -> None:
        """Measure into ``entry`` what it lacks: the fixed and per-layer costs, each storage type's pair (and the
        fallback types its files hold), and for gguf the KV-cache and head types at depth."""
        if "per_layer_s" not in entry:
            entry.update(self.fixed_and_per_layer())
        # gguf: Q4_0 always, the base of the probes at depth
        todo = sorted((set(types) | ({DEPTH_BASE} if self.fmt == "gguf" else set())) - set(entry["probes"]))
        while todo:
            t = todo.pop(0)
            rec = entry["probes"][t] = self.storage_type(t, pair)
            if rec is None:
                continue
            first = rec[str(pair[0])]
            for k in list(first["layer_types"]) + [first["head_type"]]:
                if k and k not in entry["probes"] and k not in todo:
                    todo.append(k)          # a fallback type: measured too, so this probe can be solved
        if self.fmt == "gguf" and entry["probes"].get(DEPTH_BASE):
            kvs = sorted(set(kv_types) - {"f16"})
            heads = sorted({r[str(pair[0])]["head_type"] for r in entry["probes"].values() if r} - {DEPTH_BASE})
            if not (set(kvs) <= set(entry.get("kv_layer_s", {})) and set(heads) <= set(entry.get("head_delta_s", {}))):
                entry["kv_layer_s"], entry["head_delta_s"] = self.at_depth(kvs, heads, pair[1])

    def timed(self, path, kv_type: str = "f16") -> float:
        from .benchmark import CONTENDED_WAIT_SHARE, benchmark_steady

        res = benchmark_steady(self.fmt, path, self.prompt, attempts=3, gen_tokens=self.gen_tokens, repeats=5,
                               warmup=1, threads=self.threads, n_ctx=self.n_ctx, dtype=self.dtype, meter=self.meter,
                               kv_type=kv_type)
        # the fastest undisturbed pass: a probe's cost is deterministic and interference (other processes, a busy
        # neighbour on a shared host) only adds time, so the median of five can carry a stall
        waits = res["decode_wait_share_runs"] or [0.0] * len(res["decode_tps_runs"])
        clean = [tps for tps, wait in zip(res["decode_tps_runs"], waits) if wait <= CONTENDED_WAIT_SHARE]
        self.contended += not clean
        return 1.0 / max(clean or res["decode_tps_runs"] or [res["decode_tps"]])

    def probe(self, shape: dict, name: str) -> Path:
        """A random model of the source with ``shape`` overriding its config (once per name)."""
        if name not in self.made:
            folder = self.made[name] = make_overhead_probe(self.source_folder, self.tmp / name, shape)
            if self.fmt == "gguf":
                from ..exporters import get_exporter
                from .modeling import load_model
                from .sources import resolve

                loaded = load_model(resolve(str(folder)))
                self.made[name] = self.tmp / f"{name}-F32.gguf"
                get_exporter("gguf").export(loaded.model, loaded.tokenizer, folder, self.made[name], {"type": "F32"})
        return self.made[name]

    def fixed_and_per_layer(self) -> dict:
        """The fixed and per-layer cost per token, from the tiny probes less their weights' bandwidth time."""
        times = {}
        for n in TINY_LAYERS:
            self.say(f"decode cost model: {n}-layer 64-wide probe")
            path = self.probe({**TINY_SHAPE, "num_hidden_layers": n}, f"tiny{n}")
            info = variant_info(self.fmt, path, self.dtype)
            times[n] = (self.timed(path), info.bytes_per_token / (self.host.memory_bandwidth_gbs * 1e9))
        (n1, (t1, w1)), (n2, (t2, w2)) = sorted(times.items())
        per_layer = max(0.0, (t2 - w2 - (t1 - w1)) / (n2 - n1))
        return dict(per_layer_s=per_layer, fixed_s=max(0.0, t1 - w1 - n1 * per_layer), probes={}, layer_rates={},
                    head_rates={}, host_gflops=self.host.compute_gflops,
                    host_bandwidth_gbs=self.host.memory_bandwidth_gbs,
                    tiny_probe_seconds={str(k): v[0] for k, v in times.items()})

    def speed_check(self, entry: dict) -> dict | None:
        """The 1-layer 64-wide probe of a cached model timed again: this run's time per token over the cached one
        (None where it has no such time; no ratio when other processes disturbed every pass)."""
        n = TINY_LAYERS[0]
        then = (entry.get("tiny_probe_seconds") or {}).get(str(n))
        if not then:
            return None
        self.say(f"decode cost model: speed check, the {n}-layer probe timed again (its costs are from an earlier run)")
        disturbed = self.contended
        now = self.timed(self.probe({**TINY_SHAPE, "num_hidden_layers": n}, f"tiny{n}"))
        if self.contended > disturbed:
            return {"seconds_then": then, "seconds_now": now, "ratio": None}
        return {"seconds_then": then, "seconds_now": now, "ratio": now / then}

    def storage_type(self, t: str, pair: tuple[int, int]) -> dict | None:
        """Seconds per token of the probe pair with every matrix in ``t``, and the types the files really hold."""
        if self.fmt == "gguf" and t not in GGUF_FTYPE_OF:
            self.say(f"decode cost model: no probe for {t} (llama.cpp needs an importance matrix for it)")
            return None
        self.say(f"decode cost model: {t} at the source's shapes")
        rec = {}
        for n in pair:
            path = self.probe({"num_hidden_layers": n}, f"layers{n}")
            if self.fmt == "gguf" and t != "F32":
                from ..exporters.gguf import llama_quantize

                q = self.tmp / f"layers{n}-{t}.gguf"
                llama_quantize(path, q, GGUF_FTYPE_OF[t], self.threads, pure=True)
                path = q
            info = variant_info(self.fmt, path, self.dtype)
            rec[str(n)] = {"seconds": self.timed(path), "layer_types": {k: v / n for k, v in info.type_elements.items()},
                           "head_type": info.head_type, "head_elements": info.head_elements}
            if path.suffix == ".gguf" and path.name != self.made[f"layers{n}"].name:
                path.unlink(missing_ok=True)
        return rec

    def at_depth(self, kv_types: list[str], head_types: list[str], layers: int) -> tuple[dict, dict]:
        """On the deep probe in Q4_0 (a fast type, so that the rest is a large share of the time): the seconds per
        token and layer each KV-cache type adds to f16's, and the seconds per token each head type adds to Q4_0's
        head. A head's rate from a one-layer probe meets a cache that holds little else; at the model's depth it
        competes with every layer's weights (a Q8_0 head of 30 MB: 1.7 ms more per token than its one-layer time)."""
        from ..exporters.gguf import llama_quantize

        self.say(f"decode cost model: KV-cache types {', '.join(kv_types) or 'f16 only'} and head types "
                 f"{', '.join(head_types) or 'Q4_0 only'} at depth")
        source = self.probe({"num_hidden_layers": layers}, f"layers{layers}")
        files = {}
        for head in [DEPTH_BASE, *head_types]:
            files[head] = self.tmp / f"layers{layers}-{DEPTH_BASE}-head-{head}.gguf"
            llama_quantize(source, files[head], DEPTH_BASE, self.threads, pure=True, head_type=head)
        runs = [(DEPTH_BASE, "f16"), *((DEPTH_BASE, kv) for kv in kv_types), *((h, "f16") for h in head_types)]
        best: dict[tuple, float] = {}
        for _ in range(2):          # interleaved, the fastest of each: the differences are a few percent
            for head, kv in runs:
                best[head, kv] = min(best.get((head, kv), math.inf), self.timed(files[head], kv))
        for f in files.values():
            f.unlink(missing_ok=True)
        base = best[DEPTH_BASE, "f16"]
        return ({"f16": 0.0, **{kv: (best[DEPTH_BASE, kv] - base) / layers for kv in kv_types}},
                {h: best[h, "f16"] - base for h in head_types})


def kv_types_of(source_folder, kv_types) -> list[str]:
    """The KV-cache types llama.cpp can hold for the source: quantized ones need heads a multiple of their block."""
    from .planner import kv_types_for

    return kv_types_for(kv_types, source_dims(source_folder).head_dim)


def solve_rates(entry: dict) -> None:
    """Block and head rates per type from the probe pairs (see ``measure_decode_model``), fallbacks first."""
    layer, heads = {}, {}
    pending = {t: r for t, r in entry["probes"].items() if r}
    while pending:
        progress = False
        for t, r in list(pending.items()):
            n_lo, n_hi = sorted(int(k) for k in r)
            lo, hi, span = str(n_lo), str(n_hi), n_hi - n_lo
            mix = r[lo]["layer_types"]
            others = [k for k in mix if k != t]
            if any(k not in layer for k in others):
                continue
            slope = (r[hi]["seconds"] - r[lo]["seconds"]) / span - entry["per_layer_s"]
            own = slope - sum(mix[k] / layer[k] for k in others)
            # weights too small to time beside the runtime's own costs (tiny models) count as RESOLUTION_S:
            # their kernel time is then below the roofline, which takes over
            if t in mix:
                layer[t] = mix[t] / max(own, RESOLUTION_S)
            head_time = r[lo]["seconds"] - entry["fixed_s"] - n_lo * (slope + entry["per_layer_s"])
            if r[lo]["head_elements"]:
                heads.setdefault(r[lo]["head_type"], []).append(r[lo]["head_elements"] / max(head_time, RESOLUTION_S))
            del pending[t]
            progress = True
        if not progress:
            break
    entry["layer_rates"] = layer
    entry["head_rates"] = {k: sorted(v)[len(v) // 2] for k, v in heads.items()}
    base = entry["probes"].get(DEPTH_BASE)
    if entry.get("head_delta_s") and base and DEPTH_BASE in entry["head_rates"]:
        # heads at depth: Q4_0's head time (from its pair) + each type's difference measured on the deep probe
        elements = next(iter(base.values()))["head_elements"]
        anchor = elements / entry["head_rates"][DEPTH_BASE]
        for h, delta in entry["head_delta_s"].items():
            entry["head_rates"][h] = elements / max(anchor + delta, RESOLUTION_S)

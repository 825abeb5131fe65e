"""Fit a budget: predict every candidate's memory, speed, energy and quality, search, build the best, recommend one.

A candidate is a GGUF file of a planned size (each tensor's type bought by its measured effect on the loss,
``gguf_plan.price_types`` / ``choose_types``) run with one of llama.cpp's KV-cache types, or an ONNX folder of
one scheme (``onnx_plan``: int4 at a block size, int8) run by onnxruntime with its float32 cache, either with
the least influential blocks removed, or a GGUF file of a narrower model (a share of every block's MLP channels
removed and the model healed: ``engine.narrowed``, predicted by a child ``Predictor``), at the app's context.
Its predictions:

* **memory** at the app's context: the file's resident bytes (llama.cpp's repacked copies included; every
  ONNX initializer) + the KV cache in its type for the whole context + the runtime's overhead measured on this
  machine (``projection``), times the ratio measured/predicted of the candidates of its format built so far;
* **decode speed**: here, time per token = for a GGUF file, llama.cpp's decode cost model measured on this
  machine (``probes.measure_decode_model``, once per machine and model: its fixed and per-layer costs and each
  storage type's kernel rate at the model's shapes; ``projection.project_decode``), else the roofline's time
  for the bytes and FLOPs per token; + the runtime's own time per token beyond that, fitted to the candidates
  built so far (per KV type, per ONNX type; before any, none with a cost model, else the latency the runtime's
  one-layer probe measured): on a small model a CPU's time per token barely follows the file's size, which a
  ratio to the roofline would claim it does; on the
  device, the device's roofline x the efficiency this gives here (at most 1, as ``projection.device_speed``);
  energy = typical power / speed (estimated, as everywhere);
* **quality**: predicted KL = ``kl_scale`` x the summed second-order cost of the chosen types (theory: 1/2; a
  scale per ONNX type once one is measured) + llama.cpp's own floor for GGUF files (``floor_and_scale``) + the KL
  the KV-cache type adds (measured on the first built file) + the measured KL of the blocks removed or of the
  narrower model after healing (held-out calibration text); perplexity
  increase = exp(KL) - 1, the scales refitted on every measured point.

Under a speed or energy limit a GGUF file's types may also pay for their kernel time (``SPEED_WEIGHTS``): at
the same size, a mix of faster kernels, decoding faster for a larger loss.

``search`` runs optuna's NSGA-II over (file: GGUF or an ONNX scheme, GGUF size, speed weight, KV type, blocks
removed, width) with the budget as constraints on the predictions; ``pick`` takes the best feasible candidates to build;
``recommend`` chooses among the *measured* ones and says why, what each constraint costs, and what to relax
when nothing fits. Only the run's first file (with an f16 cache) is evaluated on every window at once; its quantized
caches and every later file are *screened*: scored on a few of the evaluation windows, their figures estimated as
the first's on all windows plus the difference the two show on the same few (``screened_evaluation``); the
planner scores a screened pick on the rest of the windows before it recommends it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from .architectures import ModelDims
from .errors import EdgeTailorError
from .runtimes import KV_TYPES

#: an ONNX file's output head is rounded without error feedback (RTN, or a tied head GPTQ leaves alone): its cost
#: counts at second-order theory, the rest at the scale fitted to measured points
HEAD_KL_SCALE = 0.5
#: quantized KV caches need a head size that their 32-element blocks divide
KV_BLOCK = 32
#: an ONNX file's KV cache: onnxruntime's present -> past tensors in the graph's float type (float32)
ONNX_KV = "f32"


def kv_element_bytes(kv_type: str) -> int:
    return 4 if kv_type == ONNX_KV else KV_TYPES[kv_type].bytes_per_element


def kv_types_for(names, head_dim: int) -> list[str]:
    unknown = [n for n in names if n not in KV_TYPES]
    if unknown:
        raise EdgeTailorError(f"Unknown KV-cache type {', '.join(unknown)}.", f"Use {', '.join(KV_TYPES)}.")
    return [n for n in names if n == "f16" or head_dim % KV_BLOCK == 0]


#: how much a GGUF file's types trade quality for decode speed (``Predictor.prices_for``): 0 buys the least loss per
#: byte; w > 0 weighs each type's measured kernel time too, w x the loss per second of a mid-size plan (at 1, a 1%
#: longer decode weighs as much as a 1% larger loss). Searched when the budget sets a speed or energy limit and
#: llama.cpp's decode cost model is measured: at equal size, Q4_K's repacked kernels decode faster than Q5_K's
SPEED_WEIGHTS = (0.0, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class Candidate:
    tensor_bytes: int          # the planned file's 2-D tensors
    kv_type: str
    drop: int = 0              # decoder blocks removed (the least influential first)
    onnx: str = ""             # an ONNX scheme (``onnx_plan.SCHEMES``); "" for a GGUF file
    speed: float = 0.0         # a GGUF file's speed weight (``SPEED_WEIGHTS``)
    width: float = 0.0         # share of every block's MLP channels removed (and the model healed) before quantizing

    @property
    def format(self) -> str:
        return "onnx" if self.onnx else "gguf"

    @property
    def suffix(self) -> str:
        """What the file's name says beyond its size or scheme: its speed weight and the blocks removed."""
        return ((f"-fast{self.speed:g}" if self.speed else "") + (f"-minus{self.drop}blocks" if self.drop else "")
                + (f"-mlp{round(100 * (1 - self.width))}pct" if self.width else ""))

    @property
    def file_label(self) -> str:
        return (f"onnx-{self.onnx}" if self.onnx else f"{self.tensor_bytes / 1e6:.1f}MB") + self.suffix

    @property
    def label(self) -> str:
        return f"{self.file_label}-kv-{self.kv_type}"


@dataclass
class Prediction:
    file_bytes: int
    bits_per_weight: float
    memory_bytes: float
    decode_tps: float          # on the device
    j_per_token: float         # on the device (estimated)
    kl: float
    ppl_increase_pct: float
    decode_tps_here: float     # on this machine (what the benchmark measures)

    def to_dict(self) -> dict:
        return asdict(self)


#: the second-order theory's KL per unit of summed cost (KL ~= 1/2 x the loss's curvature-weighted error)
KL_SCALE_THEORY = 0.5
#: costs that differ by less than this factor are one level: they cannot tell a floor from a scale
COST_LEVELS = 1.5


def floor_and_scale(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(floor, scale) with KL ~= floor + scale x cost over the measured (cost, KL) points of GGUF files.

    llama.cpp's files carry a KL of their own to the source whatever their types (its dot products quantize the
    activations to 8 bits, its cache is float16): the demo's 98.4 MB file measured 0.0027 where the cost
    predicts 0.0002, and its 89.6 MB file 0.0087. A scale fitted through zero on the first file put the second at
    0.085; a floor and the theory's scale put it at 0.009. On one level of cost the excess over the theory is
    taken as the floor (a file measured *below* the theory scales it down instead); on two or more, both are
    fitted by least squares (the floor at least zero)."""
    if not points:
        return None
    costs, kls = [c for c, _ in points], [k for _, k in points]
    mean_c, mean_k = sum(costs) / len(costs), sum(kls) / len(kls)
    spread = sum((c - mean_c) ** 2 for c in costs)
    if max(costs) >= COST_LEVELS * min(costs) and spread > 0:
        scale = sum((c - mean_c) * (k - mean_k) for c, k in points) / spread
        floor = mean_k - scale * mean_c
        if scale > 0 and floor >= 0:
            return floor, scale
        if scale > 0:                    # through zero: the least-squares scale of KL = scale x cost
            return 0.0, max(sum(c * k for c, k in points) / sum(c * c for c in costs), 1e-9)
    excess = mean_k - KL_SCALE_THEORY * mean_c
    if excess >= 0:
        return excess, KL_SCALE_THEORY
    return 0.0, max(mean_k / mean_c, 1e-9)


def _gmean(ratios) -> float | None:
    """The geometric mean of the positive, finite ratios (None without any)."""
    ratios = [r for r in ratios if r > 0 and math.isfinite(r)]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def structure_key(width: float, drop: int) -> str:
    """A structure removed from the model: a share of its MLP channels and a number of its blocks."""
    return f"mlp-{width:g}/blocks-{drop}"


@dataclass
class Calibration:
    """Scales that bring the predictions to what was measured (geometric means over the measured points; a GGUF
    file's KL: llama.cpp's floor and a scale, ``floor_and_scale``)."""
    kl_scale: float = KL_SCALE_THEORY       # second-order theory: KL ~= 1/2 x summed cost
    kl_floor: float = 0.0                   # llama.cpp's own KL to the source, in every GGUF file
    onnx_kl_scale: dict = field(default_factory=dict)      # per ONNX type (int4, int8), where measured
    ppl_scale: float = 1.0                  # log(ppl ratio) ~= KL
    memory_ratio: float = 1.0
    onnx_memory_ratio: float = 1.0
    # decode time per token = the roofline's time + the runtime's own time per token, fitted to the measured
    # points (None: none yet; the probe's latency until then): all llama.cpp ones, per KV-cache type, per ONNX
    # type (int4 and int8 run different kernels)
    latency_s: float | None = None
    kv_latency_s: dict = field(default_factory=dict)
    onnx_latency_s: dict = field(default_factory=dict)
    kv_kl: dict = field(default_factory=lambda: {"f16": 0.0, ONNX_KV: 0.0})    # KL a KV-cache type adds (measured)
    # the measured KL of a structure removed (blocks, MLP channels) is measured on calibration text; on the evaluation
    # text it differs: per structure (``structure_key``), the ratio a built file of it showed
    structure_scale: dict = field(default_factory=dict)
    points: int = 0

    def refit(self, measured: list[dict]) -> None:
        """``measured``: dicts with the candidate's raw predictions (cost, memory, decode here, ``structure_kl``: the
        measured KL of the blocks removed and the channels cut, taken off before the quantization's scale is
        fitted) and measurements."""
        def kl_ratios(points):
            return [(m["kl"] - m.get("structure_kl", 0.0) - HEAD_KL_SCALE * m.get("head_cost", 0.0)) / m["cost"]
                    for m in points if m.get("kl") is not None and m["cost"] > 0]

        gguf = [m for m in measured if not m.get("onnx") and m["kv_type"] == "f16" and m.get("kl") is not None
                and m["cost"] > 0]
        # llama.cpp's floor and the types' scale from the files of the whole model only (a structure's KL on the
        # evaluation text is not the one measured on calibration text: its ratio is fitted below)
        plain = [m for m in gguf if not m.get("structure_kl")]
        floor_scale = floor_and_scale([(m["cost"], r * m["cost"]) for m, r in zip(plain, kl_ratios(plain))])
        for kind in {m["onnx"].split("-")[0] for m in measured if m.get("onnx")}:
            r = _gmean(kl_ratios(m for m in measured if m.get("onnx", "").split("-")[0] == kind))
            if r:
                self.onnx_kl_scale[kind] = r
        ppl = _gmean([math.log1p(m["ppl_increase_pct"] / 100) / m["kl"] for m in measured
                     if m.get("kl") and m.get("ppl_increase_pct") is not None and m["ppl_increase_pct"] > 0])
        mem = _gmean([m["memory_measured"] / m["memory_raw"] for m in measured
                     if m.get("memory_measured") and not m.get("onnx")])
        onnx_mem = _gmean([m["memory_measured"] / m["memory_raw"] for m in measured
                          if m.get("memory_measured") and m.get("onnx")])
        self.onnx_memory_ratio = onnx_mem or self.onnx_memory_ratio
        def latency(points):     # the measured time per token beyond the raw prediction's, on average; it may be
            # below zero: a decode cost model slower than measured, or a file faster than the bandwidth roofline
            # (a cache larger than the file: this Xeon's 480 MB L3 holds a 135M model's; ``predict`` never takes
            # more than half the time away)
            lat = [1 / m["decode_tps_measured"] - 1 / m["decode_tps_raw"] for m in points]
            return sum(lat) / len(lat) if lat else None

        # speeds measured while other processes took CPU time from the benchmark say nothing of the file
        timed = [m for m in measured if m.get("decode_tps_measured") and not m.get("contended")]
        speed = latency([m for m in timed if not m.get("onnx")])
        for kv in {m["kv_type"] for m in timed if not m.get("onnx")}:
            self.kv_latency_s[kv] = latency([m for m in timed if m["kv_type"] == kv and not m.get("onnx")])
        for kind in {m["onnx"].split("-")[0] for m in timed if m.get("onnx")}:
            self.onnx_latency_s[kind] = latency([m for m in timed if m.get("onnx", "").split("-")[0] == kind])
        if floor_scale:
            self.kl_floor, self.kl_scale = floor_scale
        self._fit_structures([m for m in gguf if m.get("structure_kl")])
        self.ppl_scale = ppl or self.ppl_scale
        self.memory_ratio = mem or self.memory_ratio
        self.latency_s = speed if speed is not None else self.latency_s
        self.points = len(measured)

    def _fit_structures(self, points: list[dict]) -> None:
        """Per structure, the ratio of its KL on the evaluation text (a built file's, less what its types cost) to
        the one measured on calibration text."""
        by_key: dict[str, list[float]] = {}
        for m in points:
            rest = m["kl"] - self.kl_floor - self.kl_scale * m["cost"] - HEAD_KL_SCALE * m.get("head_cost", 0.0)
            by_key.setdefault(structure_key(m.get("width", 0.0), m.get("drop_blocks", 0)), []).append(
                max(rest, 0.0) / m["structure_kl"])
        for key, ratios in by_key.items():
            self.structure_scale[key] = _gmean(max(r, 1e-3) for r in ratios)

    def latency(self, kv_type: str, onnx: str = "") -> float | None:
        """The runtime's own time per token: of a KV type (all llama.cpp types' when it has none), of an ONNX type
        (only its own); None before any is measured."""
        if onnx:
            return self.onnx_latency_s.get(onnx.split("-")[0])
        return self.kv_latency_s.get(kv_type, self.latency_s)

    def kl_scale_for(self, onnx: str) -> float:
        return self.onnx_kl_scale.get(onnx.split("-")[0], self.kl_scale) if onnx else self.kl_scale

    def to_dict(self) -> dict:
        return asdict(self)


def _flat(shape) -> tuple[int, int]:
    """A tensor's rows x cols as its bytes are stored (a stacked experts tensor's experts one after another)."""
    return (math.prod(shape[:-1]), shape[-1])


def _active(src) -> float:
    """The share of a tensor a token reads: k of a mixture's E experts (``ExpertSource.active``), else all."""
    return getattr(src, "active", 1.0)


def _read(src) -> int:
    """A tensor's weights a token multiplies by."""
    return int(math.prod(src.shape) * _active(src))


class Predictor:
    """Cheap predictions for any candidate of one model on one device at one context. ``sources``: the planned
    file's tensors (anything with a ``shape``, the first with ``heads``; a mixture's stacked experts with the share
    a token reads, ``active``)."""

    def __init__(self, prices, sources: dict, config, metadata_bytes: int, params: int, device, host, context: int,
                 tokens_used: int, overhead: dict | None, drop_order: list[int] | None = None,
                 depth_kl: list[float] | None = None, onnx_overhead: dict | None = None,
                 decode_model: dict | None = None):
        self.prices, self.sources, self.config, self.metadata = prices, sources, config, metadata_bytes
        self.decode_model = decode_model            # llama.cpp's measured decode costs (``measure_decode_model``)
        self.params, self.device, self.host = params, device, host
        self.context, self.tokens_used, self.overhead = context, tokens_used, overhead
        self.onnx_overhead = onnx_overhead or {}
        self.excluded: set[str] = set()
        self.drop_order = drop_order or []          # blocks, the least influential first
        self.depth_kl = [0.0, *(depth_kl or [])]    # measured KL of removing the first k of them
        self.calibration = Calibration()
        self.speed_weights: tuple[float, ...] = (0.0,)   # ``SPEED_WEIGHTS`` where the budget asks for speed
        self._plans: dict[tuple, tuple] = {}
        self._prices: dict[tuple, object] = {(0, 0.0): prices}
        # a narrower model (``add_width``): the share of MLP channels cut, its measured KL after healing, its folder
        self.width, self.width_kl, self.folder = 0.0, 0.0, ""
        self.widths: dict[float, Predictor] = {0.0: self}

    def add_width(self, child: "Predictor", width: float, kl: float, folder: str) -> None:
        """A model with ``width`` of every block's MLP channels removed and healed, written to ``folder``, its KL to
        the source measured (``kl``): its candidates predicted by ``child`` with this predictor's calibration."""
        child.width, child.width_kl, child.folder = width, kl, folder
        child.calibration, child.speed_weights, child.widths = self.calibration, self.speed_weights, self.widths
        self.widths[width] = child

    def of(self, width: float) -> "Predictor":
        """The predictor of the model with ``width`` of its MLP channels removed (0: this one)."""
        return self.widths[width]

    @property
    def max_drop(self) -> int:
        return len(self.depth_kl) - 1

    def dropped(self, drop: int) -> list[int]:
        return sorted(self.drop_order[:drop])

    def kept(self, drop: int) -> dict:
        """The GGUF tensors of the model without ``drop`` blocks (under their names in the full model)."""
        gone = tuple(f"blk.{i}." for i in self.dropped(drop))
        return {n: s for n, s in self.sources.items() if not n.startswith(gone)} if gone else self.sources

    def renamed(self, types: dict, drop: int) -> dict:
        """``types`` under the tensor names of the pruned model's file (its blocks renumbered in order)."""
        import re

        if not drop:
            return dict(types)
        gone = set(self.dropped(drop))
        new = {old: old - sum(1 for g in gone if g < old) for old in range(int(self.config.num_hidden_layers))}
        return {re.sub(r"^blk\.(\d+)\.", lambda m: f"blk.{new[int(m.group(1))]}.", n): t for n, t in types.items()}

    # the file
    def prices_for(self, drop: int, speed: float = 0.0):
        """The types' prices of the model without ``drop`` blocks; with a speed weight, each type's cost
        plus its kernel time per token priced at ``speed`` x the loss per second of a mid-size plan."""
        key = (drop, speed)
        if key not in self._prices:
            if speed:
                base = self.prices_for(drop)
                mid = self.plan(sum(self.size_range(drop)) // 2, drop)[0]
                loss = sum(o[2] for o in self._chosen(base, mid).values())
                per_second = speed * loss / max(self.kernel_seconds(mid), 1e-12)
                self._prices[key] = base.with_time(lambda n, t: per_second * self.tensor_seconds(n, t))
            else:
                self._prices[key] = self.prices.only(self.kept(drop))
        return self._prices[key]

    @staticmethod
    def _chosen(prices, types: dict) -> dict:
        return {n: next(o for o in prices.every[n] if o[0] == t) for n, t in types.items()}

    def tensor_seconds(self, name: str, t: str) -> float:
        """One tensor's weight-kernel time per token in type ``t`` (llama.cpp's decode cost model: the blocks'
        rate of the type, the head's for the output head; the slowest measured rate for a type without one;
        an untied embedding is a lookup)."""
        model = self.decode_model or {}
        layer, head = model.get("layer_rates") or {}, model.get("head_rates") or {}
        src = self.sources[name]
        tied = "output.weight" not in self.sources
        if name == "token_embd.weight" and not tied:
            return 0.0
        rates = head if name in ("output.weight", "token_embd.weight") and t in head else layer
        rate = rates.get(t) or min(layer.values(), default=0.0)
        return _read(src) / rate if rate else 0.0

    def kernel_seconds(self, types: dict) -> float:
        return sum(self.tensor_seconds(n, t) for n, t in types.items())

    @property
    def onnx_schemes(self) -> list[str]:
        return [s for s in self.prices.onnx if s not in self.excluded]

    def exclude_onnx(self, scheme: str) -> None:
        """Leave a scheme out of later searches (its file failed the check against the source)."""
        self.excluded.add(scheme)

    def onnx_candidate(self, scheme: str, drop: int = 0) -> Candidate:
        """The ONNX folder of one scheme (its size is the scheme's): always run with onnxruntime's float32 cache."""
        return Candidate(sum(b for b, _ in self.prices_for(drop).onnx[scheme].values()), ONNX_KV, drop, scheme)

    def plan(self, tensor_bytes: int, drop: int = 0, speed: float = 0.0) -> tuple[dict, int, float]:
        """(types, tensor bytes, summed loss cost) of the best plan within ``tensor_bytes`` (the cost is the
        types' loss alone, whatever the speed weight that chose them)."""
        from ..exporters.gguf_plan import choose_types

        key = (int(tensor_bytes), drop, speed)
        if key not in self._plans:
            types, size, cost = choose_types(self.prices_for(drop, speed), key[0])
            if speed:
                cost = sum(o[2] for o in self._chosen(self.prices_for(drop), types).values())
            self._plans[key] = self._plans[(size, drop, speed)] = (types, size, cost)   # a plan's own size plans itself
        return self._plans[key]

    def candidate(self, tensor_bytes: float, kv_type: str, drop: int = 0, speed: float = 0.0) -> Candidate:
        """The candidate a requested size gives: its size is what the planned types actually take (sizes
        past the point where no upgrade lowers the cost give the same file; a speed weight that changes no type
        gives the plain file)."""
        types, size, _ = self.plan(int(tensor_bytes), drop, speed)
        if speed and types == self.plan(int(tensor_bytes), drop)[0]:
            speed = 0.0
        return Candidate(size, kv_type, drop, speed=speed, width=self.width)

    def size_range(self, drop: int = 0, speed: float = 0.0) -> tuple[int, int]:
        """The smallest file and the largest worth making (past it no upgrade lowers the predicted cost)."""
        prices = self.prices_for(drop, speed)
        return prices.smallest_bytes(), self.plan(int(prices.largest_bytes()), drop, speed)[1]

    def weights_info(self, types: dict, drop: int = 0):
        """``projection.WeightsInfo`` of the planned file (what ``gguf_info`` would read from it)."""
        from ..exporters.gguf_plan import tensor_bytes
        from .projection import REPACKED_TYPES, WeightsInfo, llama_cpp_repacks

        sources = self.kept(drop)
        nbytes = {n: tensor_bytes(types[n], _flat(s.shape)) for n, s in sources.items()}
        total = sum(nbytes.values()) + self.metadata
        unread = sum(b * (1 - _active(sources[n])) for n, b in nbytes.items())   # the experts a token skips
        emb = sources.get("token_embd.weight")
        tied = "output.weight" not in sources
        n_vocab = emb.shape[0] if emb is not None else 0
        if tied or emb is None:
            per_token = resident = total
        else:
            row = nbytes["token_embd.weight"] // max(n_vocab, 1)
            per_token = total - nbytes["token_embd.weight"] + row
            resident = per_token - row + row * min(n_vocab, self.tokens_used)
        per_token = int(per_token - unread)
        repacked = 0
        if llama_cpp_repacks():
            repacked = sum(nbytes[n] for n, s in sources.items() if n != "token_embd.weight"
                           and types[n] in REPACKED_TYPES and s.shape[-2] % 8 == 0)
        type_elements: dict[str, int] = {}
        for n, s in sources.items():
            if n.startswith("blk."):
                type_elements[types[n]] = type_elements.get(types[n], 0) + _read(s)
        head = "output.weight" if not tied else "token_embd.weight"
        matmul = sum(_read(s) for n, s in sources.items() if tied or n != "token_embd.weight")
        heads, kv_heads = next(iter(sources.values())).heads
        dims = ModelDims.of(self.config)
        return WeightsInfo("gguf", resident + repacked, per_token, matmul, dims.layers - drop, heads,
                           kv_heads, dims.head_dim, n_vocab, repacked, type_elements, types.get(head, ""),
                           sources[head].shape[0] * sources[head].shape[1] if head in sources else 0)

    def onnx_weights_info(self, scheme: str, drop: int = 0):
        """``projection.WeightsInfo`` of an ONNX folder of ``scheme`` (what ``onnx_info`` would read from it):
        every initializer resident, with what onnxruntime's CPU kernels add when they pre-pack MatMulNBits at load
        (a float per block beside the scales; a tied head's original kept for the embedding's lookups); a float32
        embedding table (untied) read one row per token; the norms and the rotary
        cos/sin tables (one row per position of the model's context) in float32."""
        from ..exporters.onnx_plan import SCHEMES as ONNX_SCHEMES
        from .projection import WeightsInfo

        sources = self.kept(drop)
        prices = self.prices_for(drop).onnx[scheme]
        dims = ModelDims.of(self.config)
        emb = sources.get("token_embd.weight")
        n_vocab = emb.shape[0] if emb is not None else 0
        tied = "output.weight" not in sources
        norms = 4 * dims.hidden * (2 * (dims.layers - drop) + 1) + 4 * dims.context * dims.head_dim
        total = sum(b for b, _ in prices.values()) + norms
        table = 4 * emb.shape[0] * emb.shape[1] if emb is not None and not tied else 0
        row = table // max(n_vocab, 1)
        head = "token_embd.weight" if tied else "output.weight"
        block = ONNX_SCHEMES[scheme].block_size
        packed = sum(4 * s.shape[0] * -(-s.shape[1] // block) for n, s in sources.items()
                     if n != "token_embd.weight" or tied)
        packed += prices[head][0] if tied and head in prices else 0
        matmul = sum(s.shape[0] * s.shape[1] for n, s in sources.items() if tied or n != "token_embd.weight")
        return WeightsInfo("onnx", total + packed, total - table + row, matmul, dims.layers - drop, dims.heads,
                           dims.kv_heads, dims.head_dim, n_vocab, repacked_bytes=packed)

    def raw(self, cand: Candidate) -> dict:
        """Predictions before calibration, the planned types' summed cost, and the measured KL of the structure
        removed (blocks, MLP channels)."""
        if cand.width != self.width:
            return self.of(cand.width).raw(cand)
        if cand.onnx:
            prices = self.prices_for(cand.drop).onnx[cand.onnx]
            info = self.onnx_weights_info(cand.onnx, cand.drop)
            head = prices.get("output.weight", prices.get("token_embd.weight", (0, 0.0)))[1]
            plan = {"types": {}, "tensor_bytes": cand.tensor_bytes, "file_bytes": info.resident_bytes - info.repacked_bytes,
                    "cost": sum(c for _, c in prices.values()) - head, "head_cost": head, "onnx": cand.onnx}
            overhead = self.onnx_overhead
        else:
            types, tensor_bytes, cost = self.plan(cand.tensor_bytes, cand.drop, cand.speed)
            info = self.weights_info(types, cand.drop)
            plan = {"types": types, "tensor_bytes": tensor_bytes, "file_bytes": tensor_bytes + self.metadata,
                    "cost": cost, "head_cost": 0.0, "onnx": ""}
            overhead = self.overhead or {}
        return {**plan, "drop": cand.drop, "speed": cand.speed, "dropped": self.dropped(cand.drop), "info": info,
                "width": cand.width, "folder": self.folder, "structure_kl": self.depth_kl[cand.drop] + self.width_kl,
                "params": self.params, **self._runtime(info, cand.kv_type, overhead)}

    def _runtime(self, info, kv_type: str, overhead: dict) -> dict:
        """Memory at the app's context (weights + the KV cache for all of it + the runtime's measured overhead),
        the decode speed here before calibration, and the rooflines here and on the device."""
        from .projection import kernel_seconds, kv_cache_bytes, project_decode

        kv_bytes = kv_element_bytes(kv_type)
        memory = info.resident_bytes + kv_cache_bytes(info, self.context, kv_bytes) + overhead.get("overhead_bytes", 0)
        # a GGUF file's speed here: llama.cpp's decode cost model measured on this machine (its types' kernel
        # rates, its fixed and per-layer costs) where there is one, else the roofline (bandwidth and FLOPs) + the
        # runtime's own time per token from its one-layer probe. ``predict`` adds the time fitted to measured
        # candidates, and carries the efficiency over to the device's roofline.
        model = self.decode_model if info.fmt == "gguf" and self.decode_model \
            and kernel_seconds(info, self.decode_model) is not None else None
        here = project_decode(self.host, info, self.tokens_used, kv_bytes, decode_model=model, kv_type=kv_type)
        there = project_decode(self.device, info, self.tokens_used, kv_bytes)
        return {"memory_raw": memory, "decode_tps_raw": here["decode_tps"],
                "latency_s": 0.0 if model else overhead.get("token_latency_s", 0.0), "decode_model": bool(model),
                "roofline_tps_here": here["roofline_tps"], "roofline_tps_device": there["roofline_tps"]}

    def predict(self, cand: Candidate) -> Prediction:
        r = self.raw(cand)
        c = self.calibration
        kl = (c.kl_scale_for(cand.onnx) * r["cost"] + HEAD_KL_SCALE * r["head_cost"] + c.kv_kl.get(cand.kv_type, 0.0)
              + c.structure_scale.get(structure_key(cand.width, cand.drop), 1.0) * r["structure_kl"]
              + (0.0 if cand.onnx else c.kl_floor))
        latency = c.latency(cand.kv_type, cand.onnx)
        # a fitted latency below zero (the model slower than measured) never takes more than half the time away
        here = 1.0 / max(1.0 / r["decode_tps_raw"] + (r["latency_s"] if latency is None else latency),
                         0.5 / r["decode_tps_raw"])
        ratio = here / r["decode_tps_raw"]
        # on the device: its roofline x the efficiency predicted here, as a measured speed is carried over
        # (``projection.device_speed``)
        tps = min(here / r["roofline_tps_here"], 1.0) * r["roofline_tps_device"]
        memory = (c.onnx_memory_ratio if cand.onnx else c.memory_ratio) * r["memory_raw"]
        return Prediction(file_bytes=r["file_bytes"], bits_per_weight=8 * r["file_bytes"] / r["params"],
                          memory_bytes=memory, decode_tps=tps,
                          j_per_token=self.device.power_typical_w / tps, kl=kl,
                          ppl_increase_pct=100 * math.expm1(c.ppl_scale * kl),
                          decode_tps_here=ratio * r["decode_tps_raw"])


#: the budget's limits, in the order of optuna's constraints, and how they are named to a user
LIMIT_WORDS = {"memory": "memory", "speed": "decode speed", "energy": "energy per token", "kl": "KL",
               "perplexity": "perplexity increase"}


# --- the budget ---------------------------------------------------------------------------------------
def margins(budget, pred: dict) -> dict[str, float]:
    """Per limit the budget sets, how far ``pred`` is past it as a fraction of the limit (<= 0: within). ``pred``
    holds memory_bytes, decode_tps, j_per_token, kl, ppl_increase_pct."""
    out = {"memory": pred["memory_bytes"] / budget.memory_limit - 1}
    if budget.min_decode_tps:
        out["speed"] = budget.min_decode_tps / pred["decode_tps"] - 1
    if budget.max_j_per_token:
        out["energy"] = pred["j_per_token"] / budget.max_j_per_token - 1
    if budget.max_kl is not None:
        out["kl"] = pred["kl"] / max(budget.max_kl, 1e-12) - 1
    if budget.max_ppl_increase_pct is not None:
        out["perplexity"] = (pred["ppl_increase_pct"] - budget.max_ppl_increase_pct) / max(budget.max_ppl_increase_pct, 1e-9)
    return out


def violations(budget, pred: dict) -> dict[str, float]:
    """The limits ``pred`` misses, each with how far past it (absent: within)."""
    return {k: v for k, v in margins(budget, pred).items() if v > 0}


def constraint_values(budget, p: Prediction) -> list[float]:
    """optuna's constraints (<= 0 is feasible), one per limit in ``LIMIT_WORDS`` order (-1 where none is set)."""
    m = margins(budget, p.to_dict())
    return [m.get(n, -1.0) for n in LIMIT_WORDS]


# --- the search ---------------------------------------------------------------------------------------
@dataclass
class Point:
    candidate: Candidate
    prediction: Prediction
    feasible: bool

    def to_dict(self) -> dict:
        c = self.candidate
        return {"label": c.label, "format": c.format, "onnx": c.onnx, "tensor_bytes": c.tensor_bytes,
                "kv_type": c.kv_type, "drop_blocks": c.drop, "speed_weight": c.speed, "width": c.width,
                "feasible": self.feasible,
                **self.prediction.to_dict()}


def search(predictor: Predictor, budget, kv_types: list[str], trials: int = 120, seed: int = 0,
           cancelled=None, onnx: tuple[str, ...] = ()) -> list[Point]:
    """Multi-objective search (optuna NSGA-II, constrained) over the file (a GGUF of any size and speed weight, or
    an ONNX scheme), the KV type, the blocks removed and the width (the full model or a narrower one,
    ``Predictor.add_width``), on the predictions: minimize predicted KL and predicted
    memory. At each GGUF size drawn, every KV type and speed weight is predicted too. Returns every distinct
    point predicted. The space is the same in every trial (NSGA-II's crossover needs it): an ONNX file ignores
    the size and KV type drawn."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points: dict[Candidate, Point] = {}

    def objective(trial):
        if cancelled and cancelled():
            trial.study.stop()
        drop = trial.suggest_int("drop_blocks", 0, predictor.max_drop) if predictor.max_drop else 0
        speed = trial.suggest_categorical("speed", speeds) if len(speeds) > 1 else 0.0
        width = trial.suggest_categorical("width", widths) if len(widths) > 1 else 0.0
        fraction, kv = trial.suggest_float("size", 0.0, 1.0), trial.suggest_categorical("kv_type", kv_choices)
        file = trial.suggest_categorical("file", files) if len(files) > 1 else files[0]
        if file != "gguf":
            cand = predictor.onnx_candidate(file, drop)
            return objective_of(trial, cand, add(cand))
        p = predictor.of(width)               # a narrower model removes no blocks
        drop = min(drop, p.max_drop)
        lo, hi = p.size_range(drop, speed)
        target = lo + fraction * (hi - lo)
        cand = p.candidate(target, kv, drop, speed)
        # the KV types and speed weights are few and their predictions cheap: every one of them is predicted at
        # the size drawn, so the search's trials go to the size, the blocks removed and the width
        for w in speeds:
            for k in kv_choices:
                add(p.candidate(target, k, drop, w))
        return objective_of(trial, cand, add(cand))

    def add(cand: Candidate) -> Point:
        if cand not in points:
            p = predictor.predict(cand)
            points[cand] = Point(cand, p, all(c <= 0 for c in constraint_values(budget, p)))
        return points[cand]

    def objective_of(trial, cand: Candidate, point: Point):
        for name, value in zip(LIMIT_WORDS, constraint_values(budget, point.prediction)):
            trial.set_constraint(name, value)
        return point.prediction.kl, point.prediction.memory_bytes

    files = (["gguf"] if kv_types else []) + list(onnx)
    kv_choices = kv_types or [ONNX_KV]
    speeds = list(predictor.speed_weights) if kv_types else [0.0]
    widths = sorted(predictor.widths) if kv_types else [0.0]
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=min(24, max(4, trials // 5)))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    _seed(study, predictor, kv_types, files, speeds, widths, onnx)
    study.optimize(objective, n_trials=trials)
    return list(points.values())


def _seed(study, predictor: Predictor, kv_types: list[str], files: list[str], speeds: list, widths: list,
          onnx: tuple[str, ...]) -> None:
    """Trials always tried first: the two ends of the size range, each narrower model's smallest file and every ONNX
    scheme (the smallest files answer "does anything fit")."""
    whole = {**({"drop_blocks": 0} if predictor.max_drop else {}), **({"speed": 0.0} if len(speeds) > 1 else {})}
    full = {"width": 0.0} if len(widths) > 1 else {}
    gguf_file = {"file": "gguf"} if len(files) > 1 else {}
    for kv in kv_types:
        for size in (0.0, 1.0):
            study.enqueue_trial({"size": size, "kv_type": kv, **whole, **gguf_file, **full})
    for width in widths[1:]:
        study.enqueue_trial({"size": 0.0, "kv_type": kv_types[0], **whole, **gguf_file, "width": width})
    for scheme in onnx:
        study.enqueue_trial({"size": 0.0, "kv_type": (kv_types or [ONNX_KV])[0], **whole,
                             **({"file": scheme} if len(files) > 1 else {}), **full})


#: KV-cache types built from before their own KL is measured (it is, with the first file, which is measured with
#: every KV type): an 8-bit cache's own KL was 0.0004-0.0008 on the demo and dithered models, and an f16 cache
#: costs time per token a speed floor may not have
TRIED_KV = ("f16", "q8_0")


def buildable(points: list[Point], kv_kl: dict) -> list[Point]:
    """The points to build from: those whose KV type's own KL is measured or in ``TRIED_KV`` while any of them fits
    (a type not measured yet, q4_0, is not free), else all."""
    known = [p for p in points if p.candidate.kv_type in kv_kl or p.candidate.kv_type in TRIED_KV]
    return known if any(p.feasible for p in known) else points


def frontier(points: list[Point]) -> list[Point]:
    """Feasible points no other feasible point beats on both predicted KL and memory (by memory)."""
    feas = [p for p in points if p.feasible]
    out = [p for p in feas if not any(q.prediction.kl <= p.prediction.kl and q.prediction.memory_bytes
                                      <= p.prediction.memory_bytes and q is not p
                                      and (q.prediction.kl < p.prediction.kl
                                           or q.prediction.memory_bytes < p.prediction.memory_bytes) for q in feas)]
    return sorted(out, key=lambda p: p.prediction.memory_bytes)


def pick(points: list[Point], budget, n: int, built_sizes: list[tuple[int, int, str, float, float]],
         tolerance: float = 0.02) -> list[Point]:
    """The best-quality feasible points to build next: (size, blocks removed, ONNX scheme, speed weight, width) not
    within ``tolerance`` of a file already built or picked; when nothing is feasible, the points closest to
    feasible (``_closest_of_each_width``)."""
    feas = sorted((p for p in points if p.feasible), key=lambda p: p.prediction.kl)
    pool = feas or _closest_of_each_width(points, budget)
    chosen: list[Point] = []
    sizes = list(built_sizes)
    for p in pool:
        if len(chosen) >= n:
            break
        c = p.candidate
        if any((drop, onnx, speed, width) == (c.drop, c.onnx, c.speed, c.width) and abs(c.tensor_bytes / size - 1) <= tolerance
               for size, drop, onnx, speed, width in sizes):
            continue
        chosen.append(p)
        sizes.append((c.tensor_bytes, c.drop, c.onnx, c.speed, c.width))
    return chosen


def _closest_of_each_width(points: list[Point], budget) -> list[Point]:
    """The points closest to feasible, the closest of each model (the full one, each narrower one) first: when
    nothing fits, the full model's closest file is measured beside a narrower model's, so what relaxing a limit
    buys in quality is measured too (a narrower model is always smaller, and always worse)."""
    pool = sorted(points, key=lambda p: max(constraint_values(budget, p.prediction)))
    firsts = {}
    for p in pool:
        firsts.setdefault(p.candidate.width, p)
    return list(firsts.values()) + [p for p in pool if p not in firsts.values()]


def screened_evaluation(screen: dict, full: dict) -> dict:
    """A file scored on the first windows only (``screen``), estimated on all of them from another evaluation on
    all (``full``: the same file with another KV cache, or the run's first file; each with ``per_window``
    figures): the full figures plus the mean difference on the windows both saw (paired: the windows' own spread
    cancels). The 99.9th percentile of KL is the screen's own (on its windows)."""
    n = len(screen["per_window"])
    same = full["per_window"][:n]

    def shift(key: str) -> float:
        return sum(w[key] for w in screen["per_window"]) / n - sum(w[key] for w in same) / n

    nll = full["nll"] + shift("nll")
    out = {**{k: v for k, v in screen.items() if k != "token_kl"}, "nll": nll, "perplexity": math.exp(nll)}
    if full.get("kl") is not None and screen.get("kl") is not None:
        out["kl"] = max(0.0, full["kl"] + shift("kl"))
        out["top1"] = min(1.0, max(0.0, full["top1"] + shift("top1")))
    return out


# --- the recommendation -------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.0f} MB"


def describe(budget, m: dict, context: int) -> list[str]:
    """One phrase per constraint: the measured figure, the limit, the headroom."""
    out = [f"fits {_gb(m['memory_bytes'])} with {_gb(budget.memory_limit - m['memory_bytes'])} to spare at "
           f"{context}-token context (limit {_gb(budget.memory_limit)})"
           if m["memory_bytes"] <= budget.memory_limit else
           f"needs {_gb(m['memory_bytes'])} at {context}-token context, {_gb(m['memory_bytes'] - budget.memory_limit)} "
           f"over the limit of {_gb(budget.memory_limit)}"]
    speed = f"{m['decode_tps']:.1f} tok/s projected on {budget.device.name}"
    out.append(speed + (f", budget {budget.min_decode_tps:g}" if budget.min_decode_tps else ""))
    energy = f"{m['j_per_token']:.3f} J/token (estimated)"
    out.append(energy + (f", budget {budget.max_j_per_token:g}" if budget.max_j_per_token else ""))
    q = f"perplexity {m['ppl_increase_pct']:+.2f}%"
    if budget.max_ppl_increase_pct is not None:
        q += f", budget {budget.max_ppl_increase_pct:g}%"
    q += f"; KL {m['kl']:.4f}" + (f", budget {budget.max_kl:g}" if budget.max_kl is not None else "")
    out.append(q)
    return out


#: a relaxed limit is worth naming when it buys at least this much lower KL
WORTH = 0.8


def recommend(measured: list[dict], budget, context: int, predicted: list[Point] | None = None) -> dict:
    """Choose among measured candidates. Each dict: name, memory_bytes (measured), decode_tps (device,
    projected from the measured speed), j_per_token, kl, ppl_increase_pct (measured), plus anything to carry.

    Returns {"variant", "reason", "headroom", "runner_up" (per limit: the smallest relaxation of that limit
    alone that buys a clearly better KL, measured where a built candidate shows it, else ``predicted``),
    "shorter_context" (when memory binds: the context at which a better built candidate fits), "relax" (when
    nothing fits: the closest and by how much to relax)}. Measured candidates carry ``kv_bytes_per_token`` for
    the context advice."""
    if not measured:
        raise EdgeTailorError("No candidate was built, so there is nothing to recommend.",
                              "Loosen the budget or allow more candidates.")
    scored = [(m, violations(budget, m)) for m in measured]
    fits = sorted((m for m, v in scored if not v), key=lambda m: (m["kl"], m["memory_bytes"]))
    out: dict = {"budget": budget.to_dict(), "context": context, "runner_up": {}}
    best = fits[0] if fits else None
    if best:
        out["variant"] = best["name"]
        out["reason"] = "; ".join(describe(budget, best, context))
        out["headroom"] = {"memory_bytes": budget.memory_limit - best["memory_bytes"],
                           **({"decode_tps": best["decode_tps"] - budget.min_decode_tps} if budget.min_decode_tps else {}),
                           **({"j_per_token": budget.max_j_per_token - best["j_per_token"]} if budget.max_j_per_token else {}),
                           **({"kl": budget.max_kl - best["kl"]} if budget.max_kl is not None else {}),
                           **({"ppl_increase_pct": budget.max_ppl_increase_pct - best["ppl_increase_pct"]}
                              if budget.max_ppl_increase_pct is not None else {})}
    shorter = shorter_context(measured, budget, context, best)
    if shorter:
        out["shorter_context"] = shorter
    guesses = [(p.to_dict(), violations(budget, p.prediction.to_dict())) for p in predicted or []]
    for limit in LIMIT_WORDS:
        found = _runner_up(scored, limit, best) or _runner_up(guesses, limit, best)
        if found:
            out["runner_up"][limit] = found
    if not best:
        closest, v = min(scored, key=lambda mv: max(mv[1].values()))
        out["variant"] = None
        out["closest"] = closest["name"]
        out["relax"] = {k: round(100 * x, 1) for k, x in v.items()}
        out["reason"] = ("Nothing built meets every limit. Closest: " + closest["name"] + " — "
                         + ", ".join(f"relax {LIMIT_WORDS[k]} by {100 * x:.0f}%" for k, x in sorted(v.items()))
                         + " (" + "; ".join(describe(budget, closest, context)) + ")")
    return out


def recommend_scored(measured: list[dict], budget, context: int, predicted: list[Point] | None,
                     rescore: Callable[[dict], dict]) -> dict:
    """``recommend``, never on estimated figures: while the pick is a screened point, ``rescore`` scores it on
    every window (returning its new point, which replaces it in ``measured``) and the choice is made again."""
    while True:
        rec = recommend(measured, budget, context, predicted)
        k = next((i for i, m in enumerate(measured) if m["name"] == rec.get("variant") and m.get("screened")), None)
        if k is None:
            return rec
        measured[k] = rescore(measured[k])


#: the shortest context the planner proposes instead of more memory (contexts are offered in steps of this)
CONTEXT_STEP = 256
#: KLs within this ratio count as the same quality when choosing the context to propose
SIMILAR_KL = 1.1


def shorter_context(measured: list[dict], budget, context: int, best: dict | None) -> dict | None:
    """The other way to buy quality when memory is what binds: a candidate that misses the memory limit alone (and
    beats ``best`` clearly) at the longest shorter context where it fits — its KV cache shrunk to that context, the
    rest of its memory as measured (predicted; the runtime's buffers are taken as they were). Among candidates of
    about the best such KL (within 10%), the one that keeps the longest context."""
    options = []
    for m in measured:
        if not m.get("kv_bytes_per_token") or set(violations(budget, m)) != {"memory"}:
            continue
        if best is not None and m["kl"] >= WORTH * best["kl"]:
            continue
        rest = m["memory_bytes"] - m["kv_bytes_per_token"] * context
        n = int((budget.memory_limit - rest) // m["kv_bytes_per_token"]) // CONTEXT_STEP * CONTEXT_STEP
        if CONTEXT_STEP <= n < context:
            options.append((m, n, rest + m["kv_bytes_per_token"] * n))
    if not options:
        return None
    lowest = min(m["kl"] for m, _, _ in options)
    m, n, memory = max((o for o in options if o[0]["kl"] <= SIMILAR_KL * lowest), key=lambda o: (o[1], -o[0]["kl"]))
    return {"variant": m["name"], "context": n, "memory_bytes": memory, "kl": m["kl"],
            "text": f"or shorten the context: at {n} tokens instead of {context}, {m['name']} fits in "
                    f"{memory / 1e6:.0f} MB (its KV cache shrunk; predicted), KL {m['kl']:.4f}"}


def _runner_up(rows: list[tuple[dict, dict]], limit: str, best: dict | None) -> dict | None:
    """Among rows that miss ``limit`` alone with a KL clearly below ``best``'s, the one needing the least
    relaxation; rows with a ``name`` were measured, the others are predictions (not built)."""
    ok = [(m, v) for m, v in rows if set(v) == {limit} and (best is None or m["kl"] < WORTH * best["kl"])]
    if not ok:
        return None
    m, v = min(ok, key=lambda mv: (mv[1][limit], mv[0]["kl"]))
    built = "name" in m
    what = m["name"] if built else (f"an ONNX {m['onnx']} folder of {m['file_bytes'] / 1e6:.1f} MB" if m.get("onnx")
                                    else f"a {m['file_bytes'] / 1e6:.1f} MB file with a {m['kv_type']} KV cache") + (
        f", {m['drop_blocks']} blocks removed" if m.get("drop_blocks") else "")
    kl = f"KL about {m['kl']:.4f} predicted (not built)" if not built else f"KL {m['kl']:.4f}" + (
        f" (estimated from {m['screened']} windows)" if m.get("screened") else "")
    return {"variant": m.get("name"), "measured": built, "kl": m["kl"], "relax_pct": round(100 * v[limit], 1),
            "text": f"relax {LIMIT_WORDS[limit]} by {100 * v[limit]:.0f}%: {what}, {kl}"}

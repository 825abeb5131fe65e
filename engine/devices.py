"""Device profiles (the targets a variant should fit) and budgets (a profile plus the user's limits).

Bundled profiles live in ``assets/devices/*.json``, one real device per file, each with its sources and a
note for every figure that is an estimate rather than a published number. Users add or override profiles
with their own JSON files in ``<data folder>/devices/``. ``this-machine`` is measured here: memory from the
OS, bandwidth with a STREAM-like copy, compute with a float32 matrix multiply (see ``measure_host``).

    get_device("raspberry-pi-5-8gb").memory_bandwidth_gbs
    Budget(get_device("pixel-8"), max_memory_bytes=2e9, min_decode_tps=10).check(variant_metrics)
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EdgeTailorError

GIB = 1024**3
HOST_ID = "this-machine"
REQUIRED = ("id", "name", "kind", "memory_total_gib", "memory_available_gib", "memory_bandwidth_gbs", "cpu_cores",
            "compute_gflops", "power_typical_w", "power_peak_w", "sources")
# Power of one busy x86 server/desktop core, for this machine when its CPU's power is unknown (VMs report
# no package power): AMD EPYC 7763 280 W TDP / 64 cores = 4.4 W, EPYC 9654 360 W / 96 cores = 3.75 W,
# Intel Xeon 6980P 500 W / 128 cores = 3.9 W.
HOST_WATTS_PER_CORE = 4.0
HOST_POWER_NOTE = ("estimate: 4 W per busy core, a server core's share of its TDP (AMD EPYC 7763: 280 W / 64 "
                   "cores, Intel Xeon 6980P: 500 W / 128 cores); put your CPU's figures in "
                   "<data>/devices/this-machine.json")


@dataclass
class DeviceProfile:
    id: str
    name: str
    kind: str
    memory_total_gib: float
    memory_available_gib: float     # what one app may use
    memory_bandwidth_gbs: float     # GB/s (1e9)
    cpu_cores: int
    compute_gflops: float           # CPU FP32 peak (llama.cpp's CPU backend); accelerators listed separately
    power_typical_w: float          # sustained power under load
    power_peak_w: float
    sources: list = field(default_factory=list)
    estimates: dict = field(default_factory=dict)   # figure -> how it was estimated
    cpu: str = ""
    accelerator: dict | None = None
    origin: str = "bundled"         # bundled | user | measured
    schema: int = 1

    @property
    def memory_available_bytes(self) -> int:
        return int(self.memory_available_gib * GIB)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, origin: str, where: str) -> DeviceProfile:
        missing = [k for k in REQUIRED if d.get(k) in (None, "", [])]
        if missing:
            raise EdgeTailorError(f"Device profile {where} lacks {', '.join(missing)}.",
                                  f"Add them; every profile needs: {', '.join(REQUIRED)} (sources: where the "
                                  "figures come from).")
        for k in REQUIRED[3:-1]:
            if not isinstance(d[k], (int, float)) or d[k] <= 0:
                raise EdgeTailorError(f"Device profile {where}: {k} = {d[k]!r} is not a positive number.",
                                      "Fix the figure.")
        if d["memory_available_gib"] > d["memory_total_gib"]:
            raise EdgeTailorError(f"Device profile {where}: memory_available_gib exceeds memory_total_gib.",
                                  "Memory available to apps is part of the total.")
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise EdgeTailorError(f"Device profile {where} has unknown fields {', '.join(extra)}.",
                                  f"Known fields: {', '.join(sorted(known))}.")
        return cls(**{**d, "origin": origin})


def bundled_devices() -> dict[str, DeviceProfile]:
    from .paths import asset_path

    out = {}
    for f in sorted(asset_path("devices").glob("*.json")):
        p = DeviceProfile.from_dict(json.loads(f.read_text(encoding="utf-8")), "bundled", f.name)
        out[p.id] = p
    return out


def user_devices_dir() -> Path:
    from .paths import data_dir

    return data_dir() / "devices"


def list_devices(measure_host: bool = True, unreadable: list | None = None) -> dict[str, DeviceProfile]:
    """Bundled profiles, then the user's (same id = override), then this machine (measured once, cached). A user
    profile that cannot be read or is incomplete is skipped; its problem goes to ``unreadable`` when given."""
    out = bundled_devices()
    d = user_devices_dir()
    for f in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            try:
                raw = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise EdgeTailorError(f"Device profile {f} is not valid JSON: {exc}", "Fix or remove the file.") from exc
            if not isinstance(raw, dict):
                raise EdgeTailorError(f"Device profile {f} is not a JSON object.",
                                      "Write it as an object with the fields of a bundled profile.")
            if raw.get("id") != HOST_ID:
                profile = DeviceProfile.from_dict(raw, "user", str(f))
                out[profile.id] = profile
        except (EdgeTailorError, TypeError) as exc:
            if unreadable is not None:
                unreadable.append(exc if isinstance(exc, EdgeTailorError) else
                                  EdgeTailorError(f"Device profile {f}: {exc}", "Fix or remove the file."))
    if measure_host:
        out[HOST_ID] = host_profile()
    return out


def get_device(name: str) -> DeviceProfile:
    devices = list_devices(measure_host=(name == HOST_ID))
    if name not in devices:
        raise EdgeTailorError(f"There is no device profile '{name}'.",
                              f"Use one of: {', '.join(sorted(devices) + [HOST_ID])} (edgetailor devices), or "
                              f"add your own JSON file in {user_devices_dir()}.")
    return devices[name]


# --- this machine -------------------------------------------------------------------------------------
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_has_bf16() -> bool:
    """The CPU computes bfloat16 natively (AVX512-BF16 or AMX): autocast to bf16 then speeds training up."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(threads: int, mbytes_per_thread: int = 128, repeats: int = 7) -> dict:
    """STREAM-style copy bandwidth: each thread copies its own array; bytes = 2 x size (read + write).

    numpy's copy releases the GIL, so the threads run in parallel. Median of ``repeats`` runs after a warm-up.
    """
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mbytes_per_thread * 1024 * 1024 // 8
    srcs = [np.ones(n) for _ in range(threads)]
    dsts = [np.zeros(n) for _ in range(threads)]
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for r in range(repeats + 1):
            t = time.perf_counter()
            list(pool.map(lambda i: np.copyto(dsts[i], srcs[i]), range(threads)))
            dt = time.perf_counter() - t
            if r:
                rates.append(2 * 8 * n * threads / dt / 1e9)
    return {"gbs": statistics.median(rates), "runs_gbs": [round(x, 2) for x in rates], "threads": threads,
            "method": f"numpy copy, {threads} threads x {mbytes_per_thread} MiB, 2 bytes moved per byte copied, "
                      f"median of {repeats}"}


def measure_compute(n: int = 1024, repeats: int = 5) -> dict:
    """float32 matrix multiply through numpy's BLAS (all usable cores): 2 n^3 FLOP per product, median."""
    import statistics

    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return {"gflops": statistics.median(rates), "method": f"numpy float32 matmul {n}x{n}, median of {repeats}"}


def host_profile(refresh: bool = False) -> DeviceProfile:
    """This machine, measured once and cached; ``<data>/devices/this-machine.json`` may set any figure."""
    import psutil

    from . import atomic
    from .paths import cache_dir

    cores = usable_cores()
    key = {"cpu": cpu_model(), "cores": cores, "ram": psutil.virtual_memory().total, "node": platform.node()}
    cache = cache_dir() / "host-profile.json"
    measured = None
    if not refresh and cache.exists():
        try:
            cached = json.loads(cache.read_text())
            measured = cached["measured"] if cached.get("key") == key else None
        except (OSError, ValueError, KeyError):
            measured = None
    if measured is None:
        measured = {"bandwidth": measure_bandwidth(cores), "compute": measure_compute(), "measured_at": time.time()}
        atomic.write_json(cache, {"key": key, "measured": measured})
    vm = psutil.virtual_memory()
    d = {"id": HOST_ID, "name": f"This machine ({key['cpu']}, {cores} cores)", "kind": "host",
         "memory_total_gib": vm.total / GIB, "memory_available_gib": vm.available / GIB,
         "memory_bandwidth_gbs": round(measured["bandwidth"]["gbs"], 2), "cpu_cores": cores,
         "compute_gflops": round(measured["compute"]["gflops"], 1),
         "power_typical_w": HOST_WATTS_PER_CORE * cores, "power_peak_w": HOST_WATTS_PER_CORE * cores,
         "cpu": key["cpu"], "sources": ["measured on this machine"],
         "estimates": {"memory_available_gib": "the OS's available memory now",
                       "memory_bandwidth_gbs": "measured: " + measured["bandwidth"]["method"],
                       "compute_gflops": "measured: " + measured["compute"]["method"],
                       "power_typical_w": HOST_POWER_NOTE, "power_peak_w": HOST_POWER_NOTE}}
    user = user_devices_dir() / f"{HOST_ID}.json"
    if user.exists():
        d.update(json.loads(user.read_text(encoding="utf-8")))
        d["sources"] = list(d["sources"]) + [str(user)]
    return DeviceProfile.from_dict(d, "measured", HOST_ID)


# --- budgets -------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """A device profile plus the user's limits; ``check`` says why a variant does not fit (empty = fits)."""

    device: DeviceProfile
    max_memory_bytes: float | None = None     # default: the device's memory available to apps
    min_decode_tps: float | None = None
    max_j_per_token: float | None = None
    max_ppl_increase_pct: float | None = None
    max_kl: float | None = None

    @property
    def memory_limit(self) -> float:
        return self.max_memory_bytes or self.device.memory_available_bytes

    def check(self, metrics: dict, projected: dict | None = None, reference: bool = False) -> list[str]:
        """Reasons the variant misses the budget, from its metrics on this device.

        ``projected`` (from ``projection.project``) gives the device's figures (memory, decode tok/s, J/token);
        without it the measured ones are used. A figure that is missing is reported as unknown. The
        ``reference`` (the baseline) has no quality loss by definition.
        """
        p = projected or {}
        if reference:
            metrics = {**metrics, "ppl_increase_pct": 0.0, "kl": 0.0}
        reasons = []

        def need(label, value, ok, unit):
            if value is None:
                reasons.append(f"{label}: not measured")
            elif not ok(value):
                reasons.append(f"{label} {unit(value)}")

        measured_peak = metrics.get("peak_rss_os_bytes") or metrics.get("peak_rss_bytes")
        need("memory", p.get("memory_bytes", measured_peak),
             lambda v: v <= self.memory_limit,
             lambda v: f"{v / 1e6:.0f} MB > {self.memory_limit / 1e6:.0f} MB")
        if self.min_decode_tps:
            need("decode", p["decode_tps"] if "decode_tps" in p else metrics.get("decode_tps"), lambda v: v >= self.min_decode_tps,
                 lambda v: f"{v:.1f} tok/s < {self.min_decode_tps:g}")
        if self.max_j_per_token:
            need("energy", p["j_per_token"] if "j_per_token" in p else metrics.get("energy_j_per_token"),
                 lambda v: v <= self.max_j_per_token, lambda v: f"{v:.4f} J/token > {self.max_j_per_token:g}")
        if self.max_ppl_increase_pct is not None:
            need("perplexity", metrics.get("ppl_increase_pct"), lambda v: v <= self.max_ppl_increase_pct,
                 lambda v: f"+{v:.2f}% > +{self.max_ppl_increase_pct:g}%")
        if self.max_kl is not None:
            need("KL", metrics.get("kl"), lambda v: v <= self.max_kl, lambda v: f"{v:.4f} > {self.max_kl:g}")
        return reasons

    def to_dict(self) -> dict:
        return {"device": self.device.id, "max_memory_bytes": self.memory_limit,
                "min_decode_tps": self.min_decode_tps, "max_j_per_token": self.max_j_per_token,
                "max_ppl_increase_pct": self.max_ppl_increase_pct, "max_kl": self.max_kl}

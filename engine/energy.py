"""Energy of a benchmark, measured where the machine exposes it, otherwise estimated, always labelled.

Measured sources (read as cumulative energy counters before and after each phase):
    RAPL     Linux powercap, ``/sys/class/powercap/intel-rapl:N/energy_uj`` (Intel, and AMD Zen through the
             same driver); the top-level package zones, whole package (other processes included),
             counter wrap-around handled with ``max_energy_range_uj``
    NVML     NVIDIA GPUs through ``pynvml`` (nvidia-ml-py): ``nvmlDeviceGetTotalEnergyConsumption`` (mJ)
    hwmon    Linux hwmon energy counters, ``/sys/class/hwmon/hwmon*/energy*_input`` (µJ; amd_energy, some
             Arm boards)
Estimated when none is readable (the usual case in VMs and containers, or where RAPL is root-only):
    joules = CPU seconds of the measured process x (device peak power / device cores)
i.e. every core kept busy for a second draws its share of the device's peak power; idle power of the rest of
the machine is not counted. The device is a profile from ``engine.devices`` (default: this machine).

Every figure carries ``provenance``: "measured: ..." or "estimated: ...", with the sources or the formula.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
HWMON = Path("/sys/class/hwmon")


@dataclass
class Counter:
    """One cumulative energy counter: a sysfs file in microjoules, or an NVML device in millijoules."""

    label: str
    kind: str                   # "rapl" | "hwmon" | "nvml"
    path: str = ""              # sysfs file
    wrap_uj: int = 0            # the counter's range (RAPL), 0 = does not wrap
    index: int = 0              # NVML device index

    def read_uj(self) -> int:
        if self.kind == "nvml":
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) * 1000
        return int(Path(self.path).read_text().strip())

    def delta_uj(self, before: int, after: int) -> int:
        if after < before and self.wrap_uj:
            return after + self.wrap_uj - before
        return after - before


def rapl_counters(root: Path = POWERCAP) -> list[Counter]:
    """Readable top-level RAPL zones (packages/psys), not their sub-zones (which they already include)."""
    out = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:
            continue
        f = zone / "energy_uj"
        try:
            int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        name = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
        try:
            wrap = int((zone / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError):
            wrap = 0
        out.append(Counter(label=f"RAPL {name} ({zone.name})", kind="rapl", path=str(f), wrap_uj=wrap))
    return out


def hwmon_counters(root: Path = HWMON) -> list[Counter]:
    out = []
    for f in sorted(root.glob("hwmon*/energy*_input")):
        try:
            int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        name_file = f.parent / "name"
        name = name_file.read_text().strip() if name_file.exists() else f.parent.name
        out.append(Counter(label=f"hwmon {name} {f.name}", kind="hwmon", path=str(f)))
    return out


def nvml_counters() -> list[Counter]:
    try:
        import pynvml

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)      # raises on GPUs without the counter
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            out.append(Counter(label=f"NVML GPU {i} {name}", kind="nvml", index=i))
        return out
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU, or a GPU without an energy counter
        return []


@dataclass
class EnergyMeter:
    """Reads energy counters (measured) or turns CPU seconds into joules (estimated)."""

    counters: list[Counter] = field(default_factory=list)
    watts_per_core: float = 0.0      # for the estimate
    device: str = ""                 # the profile the estimate's power figures come from
    power_note: str = ""             # how that profile's power figure was obtained

    @classmethod
    def detect(cls, profile=None, powercap_root: Path = POWERCAP, hwmon_root: Path = HWMON) -> EnergyMeter:
        """Every readable counter of this machine; the device profile (default: this machine) for estimates."""
        from .devices import host_profile

        profile = profile or host_profile()
        counters = rapl_counters(powercap_root) or hwmon_counters(hwmon_root)
        counters += nvml_counters()
        return cls(counters, profile.power_peak_w / profile.cpu_cores, profile.id,
                   profile.estimates.get("power_peak_w", "") or "from its datasheet")

    @property
    def measured(self) -> bool:
        return bool(self.counters)

    @property
    def provenance(self) -> str:
        if self.counters:
            return "measured: " + " + ".join(c.label for c in self.counters) + " energy counters, whole device"
        return (f"estimated: CPU seconds x {self.watts_per_core:.2f} W per busy core "
                f"(peak power / cores of device profile '{self.device}'; {self.power_note}); "
                "no energy counter is readable here")

    def read(self) -> list[int] | None:
        return [c.read_uj() for c in self.counters] if self.counters else None

    def joules(self, before: list[int] | None, after: list[int] | None, cpu_seconds: float) -> float:
        if self.counters and before is not None and after is not None:
            return sum(c.delta_uj(b, a) for c, b, a in zip(self.counters, before, after)) / 1e6
        return cpu_seconds * self.watts_per_core

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnergyMeter:
        return cls([Counter(**c) for c in d.get("counters", [])], d.get("watts_per_core", 0.0),
                   d.get("device", ""), d.get("power_note", ""))

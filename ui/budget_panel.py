"""The device budget: pick a device profile (engine.devices), edit its limits; variants are checked against
them with the engine's own ``Budget.check`` and the benchmark step gets them as its parameters."""
from __future__ import annotations

from edgetailor.engine.devices import HOST_ID, Budget, host_profile, list_devices
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QSpinBox

from .common import Background


class BudgetPanel(QGroupBox):
    changed = Signal(dict)

    def __init__(self, background: Background | None = None, parent=None):
        super().__init__("&Device budget", parent)
        unreadable: list = []
        self.devices = list_devices(measure_host=False, unreadable=unreadable)
        #: the user's device profiles that could not be read, each with its fix (the window says so)
        self.skipped_profiles = [f"{exc.problem} {exc.fix}" for exc in unreadable]
        self.profile = QComboBox()
        self.profile.setObjectName("budgetProfile")
        self.profile.setAccessibleName("Device profile")
        for pid, d in sorted(self.devices.items(), key=lambda kv: kv[1].memory_available_gib):
            self.profile.addItem(d.name, pid)
        self.memory = _spin(QSpinBox(), 0, 10_000_000, " MB", "Memory the model may use on the device "
                                                              "(default: the device's memory for apps)")
        self.min_tps = _spin(QDoubleSpinBox(), 0, 100_000, " tok/s", "Slowest acceptable decode speed (0 = any)")
        self.max_j = _spin(QDoubleSpinBox(), 0, 1000, " J/tok", "Most energy per token (0 = any)", decimals=4)
        self.max_ppl = _spin(QDoubleSpinBox(), 0, 10_000, " %", "Largest perplexity increase (0 = any)")
        self.max_kl = _spin(QDoubleSpinBox(), 0, 100, "", "Largest KL divergence to the baseline (0 = any)", decimals=4)
        self.note = QLabel()
        self.note.setWordWrap(True)
        form = QFormLayout(self)
        form.addRow("&Profile", self.profile)
        form.addRow("&Memory", self.memory)
        form.addRow("Min &speed", self.min_tps)
        form.addRow("Max &energy", self.max_j)
        form.addRow("Max PPL &increase", self.max_ppl)
        form.addRow("Max &KL", self.max_kl)
        form.addRow(self.note)
        self.profile.currentIndexChanged.connect(lambda _: self._apply_profile())
        for w in (self.memory, self.min_tps, self.max_j, self.max_ppl, self.max_kl):
            w.valueChanged.connect(lambda _: self.changed.emit(self.budget()))
        self._apply_profile()
        if background is not None:      # this machine is measured (bandwidth, compute) once, off the GUI thread
            background.run(host_profile, self._add_host, lambda e: None)

    def _add_host(self, profile) -> None:
        self.devices[HOST_ID] = profile
        self.profile.insertItem(0, f"This machine ({profile.name})" if profile.name != HOST_ID else "This machine",
                                HOST_ID)

    def device(self):
        return self.devices[self.profile.currentData()]

    def _apply_profile(self) -> None:
        d = self.device()
        self.memory.blockSignals(True)
        self.memory.setValue(int(d.memory_available_bytes / 1e6))
        self.memory.blockSignals(False)
        self.note.setText(f"{d.kind}: {d.memory_available_gib:g} GiB for apps, {d.memory_bandwidth_gbs:g} GB/s, "
                          f"{d.compute_gflops:g} GFLOP/s, {d.power_typical_w:g} W typical")
        self.changed.emit(self.budget())

    def set_profile(self, device_id: str) -> None:
        self.profile.setCurrentIndex(self.profile.findData(device_id))

    def budget(self) -> dict:
        """The limits as plain data (None = no limit; memory defaults to the device's memory for apps)."""
        return {"device": self.profile.currentData(), "device_name": self.profile.currentText(),
                "memory_bytes": self.memory.value() * 1_000_000 or None,
                "min_decode_tps": self.min_tps.value() or None, "max_j_per_token": self.max_j.value() or None,
                "max_ppl_increase_pct": self.max_ppl.value() or None, "max_kl": self.max_kl.value() or None}

    def engine_budget(self) -> Budget:
        b = self.budget()
        return Budget(self.device(), max_memory_bytes=b["memory_bytes"], min_decode_tps=b["min_decode_tps"],
                      max_j_per_token=b["max_j_per_token"], max_ppl_increase_pct=b["max_ppl_increase_pct"],
                      max_kl=b["max_kl"])


def benchmark_params(budget: dict) -> dict:
    """The benchmark step's parameters for this budget (it records fits and scores against them)."""
    out = {"device": budget["device"]}
    if budget.get("memory_bytes"):
        out["max_memory_mb"] = budget["memory_bytes"] / 1e6
    for k in ("min_decode_tps", "max_j_per_token", "max_ppl_increase_pct", "max_kl"):
        if budget.get(k):
            out[k] = budget[k]
    return out


def check_variant(budget: Budget | None, metrics: dict) -> tuple[bool | None, str]:
    """(fits, why) of one variant against the budget; fits is None when it was not measured for this device."""
    if budget is None or "peak_rss_bytes" not in metrics:
        return None, "not benchmarked"
    device = budget.device.id
    if device == HOST_ID:
        projected = None
    elif metrics.get("projected_device") == device:
        projected = {"memory_bytes": metrics.get("predicted_memory_bytes"),
                     "decode_tps": metrics.get("projected_decode_tps"), "j_per_token": metrics.get("projected_j_per_token")}
    else:
        return None, f"projected for {metrics.get('projected_device') or 'another device'}; benchmark again for {device}"
    reasons = budget.check(metrics, projected)
    if not reasons:
        return True, "fits"
    if all(r.endswith("not measured") for r in reasons):
        return None, "; ".join(reasons)
    return False, "; ".join(r for r in reasons if not r.endswith("not measured"))


def _spin(w, lo, hi, suffix: str, tip: str, decimals: int | None = None):
    w.setRange(lo, hi)
    if decimals is not None:
        w.setDecimals(decimals)
    w.setSuffix(suffix)
    w.setToolTip(tip)
    w.setSpecialValueText("no limit")
    return w

"""NVML energy on a real NVIDIA GPU: skipped where none is present (CI); run on a GPU machine to check it.

The engine's NVML counter (total energy since driver load, mJ) must agree with the GPU's own power readings
integrated over the same busy interval, and the figure must say it was measured.
"""
from __future__ import annotations

import threading
import time

import pytest
from edgetailor.engine.energy import EnergyMeter, nvml_counters

pytestmark = pytest.mark.skipif(not nvml_counters(), reason="no NVIDIA GPU with an energy counter")


def test_nvml_energy_matches_integrated_power_under_load():
    import pynvml
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    meter = EnergyMeter(nvml_counters()[:1])
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))   # W
            time.sleep(0.02)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = threading.Thread(target=sample)
    before, t0 = meter.read(), time.perf_counter()
    t.start()
    while time.perf_counter() - t0 < 6.0:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    after, t1 = meter.read(), time.perf_counter()
    stop.set()
    t.join()
    joules = meter.joules(before, after, cpu_seconds=0.0)
    integrated = sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(samples, samples[1:]))
    integrated *= (t1 - t0) / (samples[-1][0] - samples[0][0])
    print(f"NVML counter {joules:.1f} J, integrated power {integrated:.1f} J over {t1 - t0:.2f} s, "
          f"mean {joules / (t1 - t0):.0f} W")
    assert meter.provenance.startswith("measured: NVML GPU 0")
    assert joules > 100 * (t1 - t0) * 0.5          # a busy H100-class GPU draws well over 50 W
    assert joules == pytest.approx(integrated, rel=0.25)

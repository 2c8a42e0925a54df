"""NVML sampling in a background thread: memory used, utilisation, energy (nvidia-ml-py).

Readings are per request: `start()` before it, `stop()` after it returns the averages,
peaks and the energy counter's delta. Where NVML or a GPU is absent every value is None.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class GpuSample:
    nvml_used_mb: float | None = None
    gpu_util_pct: float | None = None
    energy_j: float | None = None


class GpuMonitor:
    def __init__(self, device_index: int | None, interval_s: float = 0.01):
        self.interval_s = interval_s
        self._handle = None
        self._nvml = None
        if device_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # no driver, no library: readings stay empty
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _energy_mj(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    def _sample(self) -> None:
        n = self._nvml
        try:
            self._used.append(n.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)
            self._util.append(n.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except Exception:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        if not self.available:
            return
        self._used, self._util = [], []
        self._stop = threading.Event()
        self._e0 = self._energy_mj()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> GpuSample:
        if not self.available:
            return GpuSample()
        self._stop.set()
        self._thread.join()
        self._sample()
        e1 = self._energy_mj()
        energy = (e1 - self._e0) / 1e3 if e1 is not None and self._e0 is not None else None
        return GpuSample(
            nvml_used_mb=max(self._used) if self._used else None,
            gpu_util_pct=sum(self._util) / len(self._util) if self._util else None,
            energy_j=energy,
        )

    def device_facts(self) -> dict:
        """Name, driver and clocks for env.json."""
        if not self.available:
            return {}
        n, h = self._nvml, self._handle
        facts = {}
        for key, fn in {
            "gpu_name": lambda: n.nvmlDeviceGetName(h),
            "driver": lambda: n.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM),
            "power_limit_w": lambda: n.nvmlDeviceGetPowerManagementLimit(h) / 1e3,
            "memory_total_mb": lambda: n.nvmlDeviceGetMemoryInfo(h).total / 2**20,
        }.items():
            try:
                v = fn()
                facts[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:
                facts[key] = None
        return facts

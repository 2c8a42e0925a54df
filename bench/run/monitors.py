"""NVML readings around each request (nvidia-ml-py): memory used, utilisation, energy.

`start()` before a request and `stop()` after it read NVML; nothing runs during the request. The
driver keeps its own utilisation samples (one per sampling period: 1/6 s to 1 s, as NVML
documents), so `stop()` asks it for those taken since `start()` (nvmlDeviceGetSamples) instead of
a thread polling the counter: a thread waking every few milliseconds takes the interpreter lock
from the request's host work for a value that changes a few times a second. Where NVML or a GPU
is absent every value is None.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class GpuSample:
    nvml_used_mb: float | None = None
    gpu_util_pct: float | None = None
    energy_j: float | None = None


# c_nvmlValue_t's member for each nvmlValueType_t (NVML_VALUE_TYPE_DOUBLE = 0, ...)
_VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def mean_since(value_type: int, samples, t0_us: int) -> float | None:
    """Mean value of NVML samples (c_nvmlSample_t) taken at or after t0_us (CPU time, µs)."""
    field = _VALUE_FIELDS[value_type] if 0 <= value_type < len(_VALUE_FIELDS) else "uiVal"
    values = [float(getattr(s.sampleValue, field)) for s in samples if s.timeStamp >= t0_us]
    return sum(values) / len(values) if values else None


class GpuMonitor:
    def __init__(self, device_index: int | None):
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

    def _read(self, fn):
        try:
            return fn(self._nvml, self._handle)
        except Exception:  # a reading the device does not offer stays empty
            return None

    def _energy_mj(self) -> float | None:
        return self._read(lambda n, h: float(n.nvmlDeviceGetTotalEnergyConsumption(h)))

    def _used_mb(self) -> float | None:
        return self._read(lambda n, h: n.nvmlDeviceGetMemoryInfo(h).used / 2**20)

    def _utilization_since(self, t0_us: int) -> float | None:
        """Mean of the driver's utilisation samples since t0_us; the current reading (the last
        sampling period) when the request was shorter than a period."""
        found = self._read(lambda n, h: mean_since(*n.nvmlDeviceGetSamples(h, n.NVML_GPU_UTILIZATION_SAMPLES,
                                                                           t0_us), t0_us))
        if found is None:
            found = self._read(lambda n, h: float(n.nvmlDeviceGetUtilizationRates(h).gpu))
        return found

    def start(self) -> None:
        if not self.available:
            return
        self._used0 = self._used_mb()
        self._e0 = self._energy_mj()
        self._t0_us = int(time.time() * 1e6)

    def stop(self) -> GpuSample:
        if not self.available:
            return GpuSample()
        e1 = self._energy_mj()
        used = [u for u in (self._used0, self._used_mb()) if u is not None]
        return GpuSample(
            nvml_used_mb=max(used) if used else None,
            gpu_util_pct=self._utilization_since(self._t0_us),
            energy_j=(e1 - self._e0) / 1e3 if e1 is not None and self._e0 is not None else None,
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

"""What machine a measurement ran on, and GPU utilization sampled through NVML where there is one.

Nothing here is estimated: a figure that cannot be read on this machine is None.
"""

from __future__ import annotations

import os
import platform
import threading
import time


def describe(device: str) -> dict:
    import psutil
    import torch

    info = {
        "device": device,
        "name": _cpu_name(),
        "memory_bytes": psutil.virtual_memory().total,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=props.name, memory_bytes=props.total_memory)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class GpuUtilizationSampler:
    """Samples NVML's GPU utilization in a thread; `mean()` is None where NVML or a GPU is absent."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.1) -> None:
        self.samples: list[float] = []
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML, no driver, or no GPU: nothing to sample
            self._handle = None

    def __enter__(self) -> GpuUtilizationSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            time.sleep(self.interval_s)

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None

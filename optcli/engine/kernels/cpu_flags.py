"""The CPU's feature flags, as /proc/cpuinfo names them: the one thing both the kernel rules (`cpu_caps`) and
the kernel builds (`cpu_amx`, which builds only where the flags say its instructions exist) read. In its own
module so that `cpu_caps` (which asks the builds whether they exist) and the builds import it, not each other.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch  # no /proc/cpuinfo: torch's own dispatch level is the best we know

    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    level = torch.backends.cpu.get_cpu_capability()
    flags = {"avx2", "fma", "f16c"} if level in ("AVX2", "AVX512") else set()
    if level == "AVX512":
        flags |= {"avx512f", "avx512bw", "avx512vl"}
    return frozenset(flags)

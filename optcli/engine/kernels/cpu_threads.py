"""How many threads the CPU engine computes with: the cores this process may use (affinity, cgroup quota),
less the ones other processes are busy on right now.

Why: torch's intra-op threads and our C kernels (`cpu_lowbit.c`, `cpu_amx.c`) share one OpenMP pool, and
every parallel region ends at a barrier that waits for its slowest thread. A thread that shares its core
with another busy process is descheduled for whole scheduler slices, so with 2 threads on 2 cores beside
one CPU-bound process every region waits about a slice: the 56M-parameter Llama of
`benchmarks/engine_cpu.py` fell from 1,322 to 155 tok/s at 2 threads, and kept 905 at 1 thread
(2-core Xeon). With fewer threads than free cores no region waits on a descheduled thread, and
the dynamic work split in the C kernels covers a thread that is descheduled for a moment.

`ThreadGovernor.update()` runs once per engine step and samples /proc/stat at most every `interval`
seconds: CPU time of the CPUs in our affinity (steal time included: the hypervisor took it) less this
process's own (`os.times()`) is what the others used. A governor starts from the load since the last one
started (or since this module's import: the model's load); the first sample sets the count when there was
none to start from; after that the count moves only when two samples in a row agree, so one busy moment does not flip it back and forth.
`OPTCLI_CPU_THREADS=N` pins the count (no sampling). The kernel paths never depend on it: they follow from the CPU's flags (`cpu_caps.py`).

The ceiling also follows the model's size (`size_ceiling`, from the mean weight elements of its matmuls):
a toy model keeps one thread, quiet or busy, so its figures take the same path whatever the machine's load
(why, with the figures: `SPLIT_MIN_ELEMENTS`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores the cgroup's CPU quota allows (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs in our affinity mask, capped by the cgroup quota (rounded up: a 1.5-core quota runs 2 threads)."""
    cores = len(_affinity()) or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


class CpuShare:
    """Cores other processes (and the hypervisor, as steal) used between two `sample()` calls."""

    def __init__(self) -> None:
        self.cpus = {f"cpu{i}" for i in _affinity()}
        self._last = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        busy = steal = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name not in self.cpus:
                continue
            v = [int(x) for x in rest.split()]
            # user nice system idle iowait irq softirq steal: busy = all but idle, iowait
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            steal += v[7] if len(v) > 7 else 0
        own = os.times()
        return time.monotonic(), busy / CLOCK_TICKS, steal / CLOCK_TICKS, own.user + own.system

    def sample(self) -> dict | None:
        """{"others_cores", "steal_cores", "seconds"} since the last sample (None where /proc/stat is unreadable)."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        wall = now[0] - last[0]
        others = max(0.0, (now[1] - last[1]) - (now[3] - last[3])) / wall
        return {"others_cores": others, "steal_cores": (now[2] - last[2]) / wall, "seconds": wall}


# Below this mean matmul (weight elements n x k per parallel region: toy models such as the demo model, 0.20M,
# or stories260K) the engine keeps one thread. Not because a second is slower: on a quiet 2-core Zen 5
# (`benchmarks/thread_rule.py`, 2026-12-06) it is faster at every size, 1.09x at batch 1 and 1.28x offline at
# 0.22M, 1.3-1.8x from 0.68M up. But a step of such a model is about a millisecond, and the second thread
# changes the comparison, not only the speed: the demo model's 4-bit artifact against its source measured
# batch-1 decode 0.97x at 2 threads and 1.04x at 1. Under load the governor must drop to one thread anyway
# (beside a busy process two threads ran at 0.02-0.06x), so a small model on two threads quiet and one busy
# gives a CI job two different answers; on one thread always, its verdicts are the same quiet or busy
# (`benchmarks/busy_verdicts.py`: every ratio within 2% of the quiet median). Real LLMs sit far above the line.
SPLIT_MIN_ELEMENTS = 300_000


def size_ceiling(mean_matmul: float | None, cores: int) -> tuple[int, str]:
    """The thread ceiling for a model whose matmuls hold `mean_matmul` weight elements on average (None: not
    known) on `cores` usable cores, and why."""
    if cores > 1 and mean_matmul is not None and mean_matmul < SPLIT_MIN_ELEMENTS:
        return 1, (f"1 thread: its matmuls average {mean_matmul / 1e6:.2f}M weights, under "
                   f"{SPLIT_MIN_ELEMENTS / 1e6:.2f}M, where one thread keeps its figures the same quiet or busy "
                   "(engine/kernels/cpu_threads.py)")
    return cores, f"{cores} thread(s): the usable cores (affinity, cgroup quota), fewer while other processes are busy"


BOOT = CpuShare()  # since this module's import (before a model loads): a governor's first sample at once
_LAST_SET: list[int] = []  # the thread count a governor set last (so a later one tells it from the user's)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    _LAST_SET[:] = [n]


class ThreadGovernor:
    """Sets torch's (and so our kernels') OpenMP thread count to the cores free of other work. Its ceiling:
    `OPTCLI_CPU_THREADS` or `max_threads`, else `size_ceiling` over the usable cores, capped by a thread count
    the user set in torch before."""

    def __init__(self, max_threads: int | None = None, interval: float = 0.25, mean_matmul: float | None = None) -> None:
        pinned = os.environ.get("OPTCLI_CPU_THREADS")
        self.pinned = int(pinned) if pinned and pinned.isdigit() and int(pinned) > 0 else None
        current = torch.get_num_threads()
        users = None if _LAST_SET == [current] else current  # a count we set ourselves is no user's ceiling
        ceiling, self.reason = size_ceiling(mean_matmul, usable_cores())
        if users is not None and users < ceiling:
            ceiling, self.reason = users, f"{users} thread(s): torch's thread count, set before the engine started"
        if self.pinned or max_threads:
            self.reason = f"{self.pinned} thread(s): OPTCLI_CPU_THREADS" if self.pinned else f"{max_threads} thread(s) asked"
        self.max_threads = self.pinned or max_threads or ceiling
        self.interval = interval
        self.threads = self.max_threads
        self.changes = 0
        self.others_cores: float | None = None
        self._share = None if self.pinned else CpuShare()
        self._next = time.monotonic() + interval
        self._pending: int | None = None
        self._first = True
        if self._share is not None:  # decide from the load so far (a model's load: a second or more) at once,
            self._first = False      # so a short run does not start on a count that waits on a busy core
            start = BOOT.sample()
            if start is not None and start["seconds"] >= 0.1:
                self.others_cores = start["others_cores"]
                self.threads = self.target(self.others_cores)
            else:
                self._first = True
        _set_threads(self.threads)

    def target(self, others_cores: float) -> int:
        """Threads for this much of the CPU taken by others: the free cores, rounded, at least one."""
        return max(1, min(self.max_threads, int(self.max_threads - others_cores + 0.5)))

    def update(self) -> int:
        """Called once per engine step; samples at most every `interval` seconds."""
        if self._share is None or time.monotonic() < self._next:
            return self.threads
        self._next = time.monotonic() + self.interval
        sample = self._share.sample()
        if sample is None:
            return self.threads
        self.others_cores = sample["others_cores"]
        want = self.target(self.others_cores)
        first, self._first = self._first, False
        if want == self.threads:
            self._pending = None
        elif first or want == self._pending:  # the first sample, or two in a row agree: move
            self.threads, self._pending = want, None
            self.changes += 1
            _set_threads(want)
        else:
            self._pending = want
        return self.threads

    def stats(self) -> dict:
        return {"max": self.max_threads, "current": self.threads, "changes": self.changes,
                "pinned": self.pinned is not None, "others_cores": self.others_cores, "reason": self.reason}

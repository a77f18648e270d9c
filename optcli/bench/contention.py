"""Was the machine busy while we measured? A small sampler over /proc, in the manner of pyperf's system
checks: it cannot make a busy machine quiet, but a report must say when its figures were taken on one.

Three signals, over the CPUs this process may run on (`os.sched_getaffinity`) and the cgroup's CPU quota
(`cpu.max`, v1's `cpu.cfs_quota_us`):

- busy_share: other processes' CPU time (busy time of our CPUs in /proc/stat, minus our own process
  tree's) as a share of the CPU we could use. Others are assumed to fill CPUs our quota leaves unused
  first, so on a 64-CPU host with a 2-core quota, others using 30 cores take nothing from us.
- steal_share: time the hypervisor ran someone else on our virtual CPUs (/proc/stat's steal column).
- load_per_core: the 1-minute load average over usable cores (context only: it decays over a minute and
  counts our own threads, so it does not decide the warning).

The warning fires at busy_share >= 0.10 or steal_share >= 0.05. Why 10%: an idle machine's daemons stay
well under it (a few %), while the engine's CPU kernels split each step statically over a fixed thread
count, so a core taken even a tenth of the time stalls whole steps; issue 32 measured one busy-loop
process on 2 cores turning a 1.22x ratio into 0.64x and batch-1 decode into 2.3-5.4x. Steal is flagged
earlier (5%) because it is invisible to every other check and hits all threads at once.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUSY_THRESHOLD = 0.10
STEAL_THRESHOLD = 0.05
INTERVAL_S = 1.0


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one moment (seconds of CPU time, summed over our CPUs)."""

    wall: float  # a monotonic clock, s
    busy: float  # non-idle, non-steal CPU time of our CPUs (everyone's)
    steal: float
    own: float  # our process tree's CPU time
    load1: float | None  # /proc/loadavg's 1-minute figure


@dataclass(frozen=True)
class Cores:
    cpus: tuple[int, ...]  # the CPUs we may run on
    quota: float | None  # cgroup CPU quota in cores; None: unlimited

    @property
    def usable(self) -> float:
        return min(len(self.cpus), self.quota) if self.quota else float(len(self.cpus))


def read_cores(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Cores:
    """Our CPUs and the tightest CPU quota on our cgroup's path (v2 `cpu.max`, else v1 CFS files)."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cpus = tuple(range(os.cpu_count() or 1))
    return Cores(cpus, _quota(proc, cgroup_root))


def _quota(proc: Path, root: Path) -> float | None:
    """The smallest quota/period on the way from our cgroup up to the root; None when unlimited."""
    paths: list[Path] = []
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            hierarchy, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if hierarchy == "0":  # v2 unified
                base = root / rel
                paths += [p / "cpu.max" for p in (base, *base.parents) if p.is_relative_to(root)]
            elif "cpu" in controllers.split(","):
                for mount in ("cpu,cpuacct", "cpu"):
                    base = root / mount / rel
                    paths += [p / "cpu.cfs_quota_us" for p in (base, *base.parents) if p.is_relative_to(root / mount)]
    except (OSError, ValueError):
        pass
    paths += [root / "cpu.max"]
    best = None
    for path in paths:
        try:
            if path.name == "cpu.max":
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = path.read_text().strip(), (path.parent / "cpu.cfs_period_us").read_text().strip()
            if quota in ("max", "-1") or float(period) <= 0:
                continue
            cores = float(quota) / float(period)
        except (OSError, ValueError):
            continue
        best = cores if best is None else min(best, cores)
    return best


def read_cpu(proc: Path, cpus: tuple[int, ...]) -> tuple[float, float]:
    """(busy, steal) CPU seconds so far over `cpus`, from /proc/stat (the aggregate line when per-CPU lines
    are missing, as in some containers)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wanted = {f"cpu{c}" for c in cpus}
    busy = steal = 0.0
    found = 0
    total_line = None
    for line in (proc / "stat").read_text().splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        if name == "cpu":
            total_line = fields
            continue
        if name in wanted:
            b, s = _busy_steal(fields)
            busy, steal, found = busy + b, steal + s, found + 1
    if not found and total_line is not None:
        busy, steal = _busy_steal(total_line)
    return busy / tick, steal / tick


def _busy_steal(fields: list[str]) -> tuple[float, float]:
    # user nice system idle iowait irq softirq steal (guest and guest_nice are already in user and nice)
    v = [float(x) for x in fields[:8]] + [0.0] * max(0, 8 - len(fields))
    return v[0] + v[1] + v[2] + v[5] + v[6], v[7]


def own_cpu_seconds() -> float:
    """CPU seconds of this process, its live descendants, and the descendants it has reaped."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited in between
            continue
        total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


def read_load1(proc: Path) -> float | None:
    try:
        return float((proc / "loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def assess(first: Sample, last: Sample, cores: Cores, loads: list[float] | None = None,
           with_baseline: bool = True) -> dict:
    """`hardware.contention` for the window between two samples: busy_share, steal_share, warning (null on a
    quiet machine), and the context they were computed in."""
    wall = last.wall - first.wall
    n, usable = len(cores.cpus), cores.usable
    if wall <= 0 or usable <= 0:
        return {"busy_share": None, "steal_share": None, "warning": None, "usable_cores": usable,
                "load_per_core": None, "window_s": max(wall, 0.0)}
    others = max(0.0, (last.busy - first.busy) - (last.own - first.own))
    spare = max(0.0, n - usable) * wall  # CPU our quota cannot use anyway: others fill it first
    busy_share = min(1.0, max(0.0, others - spare) / (usable * wall))
    steal_share = min(1.0, max(0.0, last.steal - first.steal) / (n * wall))
    loads = [x for x in (loads or []) if x is not None]
    load = max(loads) if loads else None
    return {
        "busy_share": round(busy_share, 4),
        "steal_share": round(steal_share, 4),
        "warning": warning(busy_share, steal_share, with_baseline),
        "usable_cores": usable,
        "load_per_core": None if load is None else round(load / usable, 3),
        "window_s": round(wall, 3),
    }


def warning(busy_share: float, steal_share: float, with_baseline: bool = True) -> str | None:
    """One sentence when the machine was busy enough to move the figures, else None."""
    busy, steal = busy_share >= BUSY_THRESHOLD, steal_share >= STEAL_THRESHOLD
    if not busy and not steal:
        return None
    if busy and steal:
        who = f"another process used {busy_share:.0%} and the hypervisor {steal_share:.0%} (steal time) of the CPU"
    elif busy:
        who = f"another process used {busy_share:.0%} of the CPU"
    else:
        who = f"the hypervisor took {steal_share:.0%} of the CPU (steal time)"
    tail = "absolute figures are low, ratios are interleaved" if with_baseline else "absolute figures are low"
    return f"{who} during this run: {tail}"


class ContentionMonitor:
    """Samples the machine every `interval` s on a daemon thread while the `with` block runs; `result()`
    is `assess` over the whole block. The counters are cumulative, so the first and last samples decide
    the shares; the samples between keep the peak load average."""

    def __init__(self, interval: float = INTERVAL_S, proc: Path = Path("/proc"),
                 cgroup_root: Path = Path("/sys/fs/cgroup"), own: Callable[[], float] = own_cpu_seconds,
                 clock: Callable[[], float] = time.monotonic, with_baseline: bool = True) -> None:
        self.interval, self.proc, self.own, self.clock = interval, proc, own, clock
        self.cores = read_cores(proc, cgroup_root)
        self.with_baseline = with_baseline
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Sample | None:
        try:
            busy, steal = read_cpu(self.proc, self.cores.cpus)
        except OSError:  # no /proc (not Linux): nothing to say
            return None
        s = Sample(self.clock(), busy, steal, self.own(), read_load1(self.proc))
        self.samples.append(s)
        return s

    def __enter__(self) -> ContentionMonitor:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="optcli-contention", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def result(self) -> dict | None:
        """`hardware.contention`, or None when /proc could not be read."""
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        result = assess(first, last, self.cores, [s.load1 for s in self.samples], self.with_baseline)
        if result["busy_share"] is not None and not math.isfinite(result["busy_share"]):
            return None
        return result

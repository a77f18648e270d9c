"""`hardware.contention`: other processes' CPU share and steal time while profile measures, and its warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optcli.bench.contention import ContentionMonitor, Cores, Sample, assess, read_cores

TICK = os.sysconf("SC_CLK_TCK")
CPUS = tuple(sorted(os.sched_getaffinity(0)))


def write_proc(root: Path, busy_s: float, steal_s: float = 0.0, load1: float = 0.5) -> None:
    """A /proc with our CPUs' counters: `busy_s` and `steal_s` CPU seconds in all, spread evenly."""
    per_busy, per_steal = busy_s * TICK / len(CPUS), steal_s * TICK / len(CPUS)
    lines = [f"cpu  {busy_s * TICK:.0f} 0 0 999999 0 0 0 {steal_s * TICK:.0f} 0 0"]
    # user nice system idle iowait irq softirq steal guest guest_nice; busy split over user/system/irq
    lines += [f"cpu{c} {per_busy * 0.7:.0f} 0 {per_busy * 0.2:.0f} 99999 7 {per_busy * 0.1:.0f} 0 {per_steal:.0f} 0 0"
              for c in CPUS]
    lines += ["intr 1 2 3", "ctxt 42"]
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("\n".join(lines) + "\n")
    (root / "loadavg").write_text(f"{load1} 0.40 0.30 1/123 4567\n")
    (root / "self" / "cgroup").write_text("0::/\n")


def fake_monitor(tmp_path: Path, own: list[float], clock: list[float], with_baseline: bool = True) -> ContentionMonitor:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")
    write_proc(proc, 0.0)
    return ContentionMonitor(proc=proc, cgroup_root=cgroup, own=lambda: own[0], clock=lambda: clock[0],
                             with_baseline=with_baseline)


def test_a_quiet_machine_gets_no_warning(tmp_path: Path) -> None:
    """Over 10 s we used 15 CPU-seconds and the whole machine 15.2: others took 1% of our CPUs."""
    own, clock = [100.0], [50.0]
    monitor = fake_monitor(tmp_path, own, clock)
    write_proc(tmp_path / "proc", 1000.0)
    monitor.sample()
    own[0], clock[0] = 115.0, 60.0
    write_proc(tmp_path / "proc", 1015.2 + 0.0, load1=1.9)
    monitor.sample()
    result = monitor.result()
    usable = float(len(CPUS))
    assert result["busy_share"] == pytest.approx(0.2 / (usable * 10), abs=2e-3)
    assert result["steal_share"] == 0 and result["warning"] is None
    assert result["usable_cores"] == usable and result["load_per_core"] == pytest.approx(1.9 / usable, abs=1e-3)
    assert result["window_s"] == 10


def test_other_processes_and_steal_get_a_sentence() -> None:
    cores = Cores((0, 1), quota=None)
    start = Sample(wall=0.0, busy=0.0, steal=0.0, own=0.0, load1=1.0)
    # 10 s on 2 CPUs: we used 10 CPU-s, the CPUs were busy 19.6 s: others took 9.6 of 20 = 48%
    busy = assess(start, Sample(10.0, 19.6, 0.0, 10.0, 2.0), cores)
    assert busy["busy_share"] == pytest.approx(0.48)
    assert busy["warning"] == ("another process used 48% of the CPU during this run: absolute figures are low, "
                               "ratios are interleaved")
    alone = assess(start, Sample(10.0, 19.6, 0.0, 10.0, 2.0), cores, with_baseline=False)
    assert alone["warning"] == "another process used 48% of the CPU during this run: absolute figures are low"
    steal = assess(start, Sample(10.0, 10.0, 2.4, 10.0, 1.0), cores)
    assert steal["busy_share"] == 0 and steal["steal_share"] == pytest.approx(0.12)
    assert steal["warning"].startswith("the hypervisor took 12% of the CPU (steal time) during this run")
    # under both thresholds (10% busy, 5% steal): quiet
    assert assess(start, Sample(10.0, 11.9, 0.9, 10.0, 1.0), cores)["warning"] is None


def test_a_cpu_quota_counts_only_what_others_take_from_our_share(tmp_path: Path) -> None:
    """4 CPUs but a 1-core quota: others using 3 cores leave our one core free; using 3.5 take half of it."""
    cores = Cores((0, 1, 2, 3), quota=1.0)
    start = Sample(0.0, 0.0, 0.0, 0.0, None)
    assert assess(start, Sample(10.0, 40.0, 0.0, 10.0, None), cores)["busy_share"] == 0  # 30 CPU-s of others
    assert assess(start, Sample(10.0, 45.0, 0.0, 10.0, None), cores)["busy_share"] == pytest.approx(0.5)
    # the quota is read from the cgroup on our path, v2 (cpu.max) or v1 (CFS quota / period), the tightest wins
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/jobs/ci\n")
    (root / "jobs" / "ci").mkdir(parents=True)
    (root / "jobs" / "ci" / "cpu.max").write_text("max 100000\n")
    (root / "jobs" / "cpu.max").write_text("150000 100000\n")
    assert read_cores(proc, root).quota == pytest.approx(1.5) and read_cores(proc, root).cpus == CPUS
    (proc / "self" / "cgroup").write_text("4:cpu,cpuacct:/docker/abc\n")
    v1 = root / "cpu,cpuacct" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert read_cores(proc, root).quota == pytest.approx(0.5)
    assert Cores((0, 1), None).usable == 2 and Cores((0, 1), 0.5).usable == 0.5


def test_a_busy_loop_process_is_seen(tmp_path: Path) -> None:
    """A CPU-bound process outside our process tree (started through a shell that exits, so it is not our
    child) while we wait: the monitor sees its share and warns; our own spinning child is not 'another'."""
    pid_file = tmp_path / "hog.pid"
    subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $! > {pid_file}"],
                   check=True)
    hog = int(pid_file.read_text())
    try:
        time.sleep(0.3)
        with ContentionMonitor(interval=0.2) as monitor:
            time.sleep(2.0)
        result = monitor.result()
    finally:
        os.kill(hog, signal.SIGKILL)
    usable = len(CPUS)
    assert result["busy_share"] >= min(0.9, 1 / usable) * 0.8, result  # about one core of ours, at least
    assert result["warning"].startswith("another process used ") and result["warning"].endswith(
        "of the CPU during this run: absolute figures are low, ratios are interleaved")
    # our own child spinning is ours, not contention: its CPU time lands in our tree's
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        spun = psutil.Process(child.pid).cpu_times()
        with ContentionMonitor(interval=0.2) as mine:
            time.sleep(2.0)
        after = psutil.Process(child.pid).cpu_times()
    finally:
        child.kill()
        child.wait()
    child_s = after.user + after.system - spun.user - spun.system
    own_s = mine.samples[-1].own - mine.samples[0].own
    assert child_s > 0 and own_s >= 0.8 * child_s, (own_s, child_s)

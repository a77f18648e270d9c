"""Interleaved repeats of source and artifact (bench/repeats.py), and the offline >= online sanity notes."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import optcli.bench.measure as measure
import optcli.bench.repeats as repeats
from optcli.bench.comparison import offline_online_notes
from optcli.bench.workload import Workload
from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig

WORKLOAD = dict(requests=4, prompt_len=(20, 40), output_len=4, concurrency=2)


def log_median(values) -> float:
    """The median on the log scale, as stats.py takes it: the middle value, or the geometric mean of the middle two."""
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else math.sqrt(values[middle - 1] * values[middle])


def spy(monkeypatch) -> list[dict]:
    """Record each timed and warm-up run: which model, phase, thread, and prefix-cache hits during it."""
    events: list[dict] = []
    roles: dict[int, str] = {}  # id(engine) -> the model it runs
    ctx = threading.local()  # whether the run on this thread is a warm-up

    def wrap(name: str, phase: str):
        real = getattr(repeats, name)

        def timed(engine, *args, **kwargs):
            hits = engine.blocks.prefix_hits
            result = real(engine, *args, **kwargs)
            events.append({"model": roles[id(engine)], "phase": phase, "warm": ctx.warm,
                           "main": threading.current_thread() is threading.main_thread(),
                           "hits": engine.blocks.prefix_hits - hits})
            return result
        monkeypatch.setattr(repeats, name, timed)

    for name, phase in (("offline_run", "offline"), ("decode_tok_s", "decode"), ("prompt_tok_s", "prompt"),
                        ("online_load", "online")):
        wrap(name, phase)

    def tagged(method: str, warm: bool):
        real = getattr(repeats._Repeats, method)

        def run(self, *args):
            ctx.warm = warm
            return real(self, *args)
        monkeypatch.setattr(repeats._Repeats, method, run)

    tagged("warm_up", True)
    tagged("run", False)
    tagged("run_together", False)
    real_load = repeats._Repeats.load

    def load(self, side):
        events.append({"model": side.role, "phase": "load"})
        real_engine = repeats.Engine

        def engine(*args, **kwargs):
            made = real_engine(*args, **kwargs)
            roles[id(made)] = side.role
            return made
        monkeypatch.setattr(repeats, "Engine", engine)
        real_load(self, side)
        monkeypatch.setattr(repeats, "Engine", real_engine)
    monkeypatch.setattr(repeats._Repeats, "load", load)
    return events


def sources(stories_dir: Path):
    spec = resolve_model(str(stories_dir))
    return spec, SimpleNamespace(spec="baseline", path=spec.path)


def test_both_models_interleave_abba_each_run_cold_and_off_the_main_thread(stories_dir: Path, monkeypatch) -> None:
    events = spy(monkeypatch)
    candidate, baseline = sources(stories_dir)
    cand, base, schedule = repeats.measure_models(candidate, baseline, Workload(**WORKLOAD, repeats=3, min_time_s=0.0),
                                                  None, EngineConfig(device="cpu"), lambda message: None)
    assert schedule["repeats"] == 3 and schedule["order"] == "ABBA" and schedule["resident"] == "both"
    loads = [e["model"] for e in events if e["phase"] == "load"]
    assert loads == ["candidate", "baseline"]  # resident: loaded once each
    runs = [e for e in events if e["phase"] != "load"]
    # each model warmed up (every phase once, untimed) before its first timed run
    for model in ("candidate", "baseline"):
        first_timed = next(i for i, e in enumerate(runs) if e["model"] == model and not e["warm"])
        assert {e["phase"] for e in runs[:first_timed] if e["model"] == model and e["warm"]} == set(repeats.PHASES)
    timed = [(e["model"][0], e["phase"]) for e in runs if not e["warm"]]
    for phase in ("offline", "decode", "prompt"):  # A B | B A | A B, phase by phase
        assert "".join(m for m, p in timed if p == phase) == "cbbccb", phase
    # the same engine path as `serve` (a thread of its own) and a cold prefix cache for every run, timed or not
    assert not any(e["main"] for e in runs) and all(e["hits"] == 0 for e in runs if e["phase"] == "offline")
    # the figures are the medians of the repeats
    for run in (cand, base):
        assert len(run.runs) == 3
        for key in ("output_tok_s", "total_tok_s", "requests_s"):
            assert run.throughput[key] == pytest.approx(log_median(r[f"throughput.{key}"] for r in run.runs))
        assert run.decode_tok_s == log_median(r["throughput.decode_tok_s"] for r in run.runs) > 0
        assert run.prompt_tok_s == log_median(r["throughput.prompt_tok_s"] for r in run.runs) > 0
        assert run.online["throughput"]["output_tok_s"] == log_median(
            r["throughput.online_output_tok_s"] for r in run.runs)
        assert run.online["latency_ms"]["ttft"]["p50"] == log_median(r["latency_ms.ttft.p50"] for r in run.runs)
        assert run.online["requests"]["completed"] == WORKLOAD["requests"]  # one run's, as each level reports
        assert run.online["failures"]["total"] == 3 * WORKLOAD["requests"]  # failures: over every repeat
        assert len(run.samples["e2e"]) == 3 * WORKLOAD["requests"]
        intervals = run.intervals()["throughput.output_tok_s"]
        assert intervals["repeats"] == 3 and intervals["ci_low"] <= intervals["median"] <= intervals["ci_high"]


def test_each_repeat_is_the_median_run_of_its_timed_window(monkeypatch) -> None:
    """A run shorter than the window is repeated until the window has passed, an odd number of times (at least
    3), and the median run kept; a run longer than the window runs once; an unmeasurable run ends it."""
    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def runs(figures: list[float | None], seconds: float):
        it = iter(figures)

        def run():
            clock[0] += seconds
            return next(it)
        return run

    # 0.1 s runs in a 0.5 s window: 5 runs (the 5th reaches it), the median of 5
    assert measure.within_window(runs([9.0, 1.0, 5.0, 7.0, 3.0, 100.0], 0.1), lambda x: x, 0.5) == (5.0, 5)
    # 0.2 s runs: the window passes at the 3rd run; 3 is odd and >= 3
    assert measure.within_window(runs([4.0, 8.0, 6.0, 1.0], 0.2), lambda x: x, 0.5) == (6.0, 3)
    # 0.3 s runs: past the window at the 2nd run, but an even count: one more for a true median
    assert measure.within_window(runs([2.0, 9.0, 4.0, 1.0], 0.3), lambda x: x, 0.5) == (4.0, 3)
    # a run that lasts 3 windows alone (a real model's) runs once
    assert measure.within_window(runs([42.0, 1.0], 2.0), lambda x: x, 0.5) == (42.0, 1)
    # one about a window long still gets a median of 3
    assert measure.within_window(runs([8.0, 2.0, 5.0, 1.0], 0.6), lambda x: x, 0.5) == (5.0, 3)
    # the median run is returned whole (its other figures belong to the same run)
    dicts = [{"tok_s": v, "id": i} for i, v in enumerate([3.0, 1.0, 2.0])]
    assert measure.within_window(runs(dicts, 0.2), lambda d: d["tok_s"], 0.5) == ({"tok_s": 2.0, "id": 2}, 3)
    # a figure that cannot be measured (None) ends the window as it is
    assert measure.within_window(runs([None, 5.0], 0.01), lambda x: x, 0.5) == (None, 1)


def test_two_models_share_a_window_run_by_run(monkeypatch) -> None:
    """Resident together, source and artifact alternate inside one window (A B, B A, ...) until each has had its
    share of it and an odd number of runs; each keeps its own median run, and an unmeasurable run ends the
    window with its round."""
    clock, calls = [0.0], []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def runs(name: str, figures: list[float | None], seconds: float):
        it = iter(figures)

        def run():
            clock[0] += seconds
            calls.append(name)
            return next(it)
        return run

    # 0.125 s runs, a 0.5 s window each (1 s together): 5 rounds, each model's median of 5
    kept, rounds = measure.within_shared_window(
        [runs("a", [9.0, 1.0, 5.0, 7.0, 3.0, 0.0], 0.125), runs("b", [2.0, 8.0, 4.0, 6.0, 0.5, 0.0], 0.125)],
        lambda x: x, 0.5)
    assert (kept, rounds) == ([5.0, 4.0], 5)
    assert "".join(calls) == "abbaabbaab"
    # past the shared window at an even round count: one more round for a true median
    calls.clear()
    kept, rounds = measure.within_shared_window(
        [runs("a", [1.0, 2.0, 3.0, 4.0], 0.3), runs("b", [4.0, 3.0, 2.0, 1.0], 0.3)], lambda x: x, 0.5)
    assert (kept, rounds, "".join(calls)) == ([2.0, 3.0], 3, "abbaab")
    # a round that lasts 3 windows alone (a real model's runs) is the only one; one about a window long is not
    kept, rounds = measure.within_shared_window([runs("a", [7.0], 2.0), runs("b", [3.0], 2.0)], lambda x: x, 0.5)
    assert (kept, rounds) == ([7.0, 3.0], 1)
    kept, rounds = measure.within_shared_window([runs("a", [7.0, 1.0, 4.0], 0.5), runs("b", [3.0, 6.0, 2.0], 0.5)],
                                                lambda x: x, 0.5)
    assert (kept, rounds) == ([4.0, 3.0], 3)
    # an unmeasurable figure ends the window after its round: the other model keeps its median so far
    kept, rounds = measure.within_shared_window(
        [runs("a", [2.0, 3.0, 1.0], 0.01), runs("b", [5.0, None, 9.0], 0.01)], lambda x: x, 0.5)
    assert (kept, rounds) == ([3.0, 5.0], 2)
    kept, rounds = measure.within_shared_window(
        [runs("a", [None], 0.01), runs("b", [4.0], 0.01)], lambda x: x, 0.5)
    assert (kept, rounds) == ([None, 4.0], 1)


def test_a_profile_run_fills_each_timed_window_with_an_odd_number_of_runs(stories_dir: Path) -> None:
    """The window through the real engine: stories260K's runs are milliseconds long, so every phase of every
    repeat runs at least 3 times (an odd count: a true median), and the schedule says so. The window is half a
    second: one run alone never fills it, even with the rest of the suite running beside it (at 0.1 s a
    decode run on a loaded CI machine once did, and rightly ran once)."""
    candidate, baseline = sources(stories_dir)
    _, _, schedule = repeats.measure_models(candidate, baseline, Workload(**WORKLOAD, repeats=2, min_time_s=0.5),
                                            None, EngineConfig(device="cpu"), lambda message: None)
    window = schedule["window"]
    assert window["min_s"] == 0.5 and window["shared"] and set(window["runs"]) == {"candidate", "baseline"}
    for side in window["runs"].values():
        assert set(side) == {"offline", "decode", "prompt", "online"}
        assert all(len(runs) == 2 and all(n >= 3 and n % 2 for n in runs) for runs in side.values()), side
    assert window["runs"]["candidate"] == window["runs"]["baseline"]  # one shared window: as many runs each


def test_without_room_for_both_the_models_take_turns(stories_dir: Path, monkeypatch) -> None:
    """Not resident together: one engine at a time, reloaded (and warmed up again) at its turn; ABBA order
    keeps it to one reload per repeat."""
    events = spy(monkeypatch)
    monkeypatch.setattr(repeats, "fits_beside", lambda *args: False)
    candidate, baseline = sources(stories_dir)
    _, base, schedule = repeats.measure_models(candidate, baseline, Workload(**WORKLOAD, repeats=3), None,
                                               EngineConfig(device="cpu"), lambda message: None)
    assert schedule["resident"] == "one at a time" and len(base.runs) == 3
    loads = [e["model"] for e in events if e["phase"] == "load"]
    assert loads == ["candidate", "baseline", "candidate", "baseline"]
    # a model's timed runs come after its latest (re)load and warm-up: never two engines in memory at once
    current = None
    for e in events:
        if e["phase"] == "load":
            current = e["model"]
        else:
            assert e["model"] == current


def run_with(offline: list[float], online: list[float], preemptions: int = 0):
    return SimpleNamespace(runs=[{"throughput.output_tok_s": a, "throughput.online_output_tok_s": b}
                                 for a, b in zip(offline, online, strict=True)], offline_preemptions=preemptions)


def test_offline_below_online_is_explained_or_called_a_bug() -> None:
    workload = Workload(requests=16, concurrency=8)
    quiet = {"hardware": {"contention": {"warning": None}}}
    busy = {"hardware": {"contention": {"warning": "another process used 48% of the CPU during this run: x"}}}
    fine = run_with([4000, 4100, 3900], [1400, 1450, 1380])
    assert offline_online_notes(quiet, fine, fine, workload) == []
    preempted = run_with([1000, 1010, 990], [1400, 1450, 1380], preemptions=12)
    assert offline_online_notes(quiet, preempted, None, workload) == [
        "offline output tok/s of the artifact (1,000.0) is below its online (1,400.0, concurrency 8): the KV cache "
        "could not hold all 16 requests at once, so offline preempted and recomputed 12 sequences over its repeats"]
    noisy = run_with([1300, 1600, 1200], [1400, 1350, 1450])
    assert offline_online_notes(quiet, fine, noisy, workload)[0].endswith(
        "within measurement noise: their 95% intervals overlap")
    assert "of the source (1,300.0)" in offline_online_notes(quiet, fine, noisy, workload)[0]
    apart = run_with([1000, 1010, 990], [1400, 1410, 1390])
    assert offline_online_notes(busy, apart, None, workload)[0].endswith(
        "the machine was busy (another process used 48% of the CPU)")
    assert offline_online_notes(quiet, apart, None, workload)[0].endswith("a measurement bug, please report it")


def test_one_repeat_gives_figures_without_intervals(stories_dir: Path) -> None:
    from optcli.bench.comparison import comparison

    candidate, baseline = sources(stories_dir)
    cand, base, _ = repeats.measure_models(candidate, baseline, Workload(**WORKLOAD, repeats=1), None,
                                           EngineConfig(device="cpu"), lambda message: None)

    def figures(run):
        return {"throughput": {**run.throughput, "online_output_tok_s": run.online["throughput"]["output_tok_s"],
                               "decode_tok_s": run.decode_tok_s, "prompt_tok_s": run.prompt_tok_s},
                "latency_ms": run.online["latency_ms"], "memory": run.memory}

    result = comparison({"model": "m", **figures(cand)}, figures(base), Workload(**WORKLOAD),
                        runs={"value": cand.runs, "baseline": base.runs})
    for row in result["rows"]:
        assert row["ci_low"] is None and row["verdict"] is None
        assert row["repeats"] in (1, None) and (row["ratio"] is None or row["ratio"] > 0)

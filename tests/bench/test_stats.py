"""The statistics behind every speed row of `profile`: medians, 95% intervals, paired ratios, verdicts."""

from __future__ import annotations

import math
import random

import pytest

from optcli.bench.stats import (
    FASTER,
    SAME,
    SLOWER,
    median_interval,
    ratio_interval,
    sign_test_rank,
    t_quantile,
    verdict,
)


def test_t_quantiles_match_the_tables() -> None:
    for df, expected in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.95996, abs=1e-4)


def test_three_repeats_give_students_t_interval_on_the_logs() -> None:
    """log-values 0.0, 0.1, 0.2: mean 0.1, sd 0.1, so the interval is exp(0.1 +- 4.3027 x 0.1 / sqrt 3)."""
    values = [math.exp(x) for x in (0.2, 0.0, 0.1)]
    interval = median_interval(values)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert interval.median == values[2] and interval.n == 3
    assert interval.low == pytest.approx(math.exp(0.1 - half)) and interval.high == pytest.approx(math.exp(0.1 + half))
    assert median_interval([5.0]).low is None and median_interval([None, 0.0]) is None


def test_from_six_repeats_the_distribution_free_interval_for_the_median() -> None:
    assert [sign_test_rank(n) for n in (5, 6, 8, 9, 12, 20)] == [None, 1, 1, 2, 3, 6]
    interval = median_interval([float(x) for x in (9, 1, 8, 2, 7, 3, 6, 4, 5)])  # n = 9: [x(2), x(8)]
    assert (interval.median, interval.low, interval.high) == (5.0, pytest.approx(2.0), pytest.approx(8.0))
    # one wild repeat (a busy moment) leaves the median and its interval where they were
    wild = median_interval([float(x) for x in (9000, 1, 8, 2, 7, 3, 6, 4, 5)])
    assert (wild.median, wild.low, wild.high) == (5.0, pytest.approx(2.0), pytest.approx(8.0))


@pytest.mark.parametrize("n", [3, 5, 8])
def test_intervals_cover_the_true_median_95_percent_of_the_time(n: int) -> None:
    """Log-normal timings around a known median (1000 tok/s, 10% noise): about 95% of intervals (at least
    95% for the sign-test interval from 6) contain it."""
    rng = random.Random(n)
    trials = 4000
    hits = sum(median_interval([1000 * math.exp(rng.gauss(0, 0.1)) for _ in range(n)]).contains(1000)
               for _ in range(trials))
    assert 0.935 <= hits / trials <= (1.0 if n >= 6 else 0.965), hits / trials


def test_ratio_pairs_repeats_so_shared_drift_cancels() -> None:
    """The machine slows down over the run (both models alike), the artifact stays 1.2x its source in every
    pair: the pairs' interval is tight around 1.2 though each model's own interval is wide."""
    drift = [1.0, 0.6, 0.9, 0.4, 0.8]
    noise = [1.0, 1.01, 0.99, 1.005, 0.995]
    source = [1000 * d for d in drift]
    artifact = [1200 * d * e for d, e in zip(drift, noise, strict=True)]
    ratio = ratio_interval(artifact, source)
    assert ratio.median == pytest.approx(1.2, rel=0.01) and 1.18 < ratio.low < ratio.high < 1.22
    own = median_interval(artifact)
    assert own.high / own.low > 2  # unpaired, drift swamps the difference
    assert verdict(ratio, higher_is_better=True) == FASTER
    with pytest.raises(ValueError, match="paired"):
        ratio_interval([1.0, 2.0], [1.0])


def test_unmeasured_pairs_are_left_out() -> None:
    ratio = ratio_interval([110.0, None, 120.0, 115.0], [100.0, 100.0, None, 100.0])
    assert ratio.n == 2 and ratio.median == pytest.approx(math.sqrt(1.1 * 1.15))
    assert ratio_interval([None], [1.0]) is None


def test_verdicts_both_directions_and_no_measurable_difference() -> None:
    rng = random.Random(7)
    source = [1000 * math.exp(rng.gauss(0, 0.02)) for _ in range(5)]

    def with_ratio(r: float, noise: float = 0.02) -> list[float]:
        return [s * r * math.exp(rng.gauss(0, noise)) for s in source]

    faster, slower = ratio_interval(with_ratio(1.3), source), ratio_interval(with_ratio(0.7), source)
    assert faster.low > 1 and verdict(faster, higher_is_better=True) == FASTER
    assert slower.high < 1 and verdict(slower, higher_is_better=True) == SLOWER
    # a latency (lower is better): 0.7x the source's is the faster side, 1.3x the slower
    assert verdict(slower, higher_is_better=False) == FASTER and verdict(faster, higher_is_better=False) == SLOWER
    # 3% apart with 20% noise over 3 repeats: the interval straddles 1.0
    source3 = source[:3]
    same = ratio_interval([s * 1.03 * f for s, f in zip(source3, (1.25, 0.8, 1.1), strict=True)], source3)
    assert same.low < 1 < same.high and verdict(same, True) == verdict(same, False) == SAME
    assert verdict(ratio_interval([1.0], [1.0]), True) is None  # one repeat: no interval, no verdict
    # identical pairs: a zero-width interval at exactly 1.0 is no difference, not a tie broken either way
    assert verdict(ratio_interval([5.0, 5.0, 5.0], [5.0, 5.0, 5.0]), True) == SAME

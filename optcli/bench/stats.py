"""Medians of repeated speed figures with 95% confidence intervals, for one model and for a paired ratio,
and the verdict a ratio's interval supports. Standard library only.

Why these intervals (profile runs few repeats, 3 by default, because each costs a whole measurement):

- Speed figures are positive and their noise is multiplicative (a busy core slows a run by a share, not
  by a fixed number of tok/s), so everything is done on logarithms: an interval for a ratio r then maps
  onto the interval for 1/r exactly: "the artifact at 1.25x its source" and "the source at 0.8x the
  artifact" get the same verdict.
- For n < 6 repeats no distribution-free 95% interval for a median exists: even [min, max] covers the
  median with probability only 1 - 2^(1-n) (75% at n = 3). So below 6 we assume log-normal noise and
  use Student's t on the logs, mean +- t(0.975, n-1) s / sqrt(n). That is exact under the assumption and
  honest about small n (t = 4.30 at n = 3: one disturbed repeat widens the interval a lot, and the verdict
  becomes "no measurable difference" rather than a confident wrong answer). A bootstrap was rejected: at
  n = 3 it resamples three numbers and its intervals badly undercover.
- From 6 repeats on, the sign-test (order-statistic) interval for the median: [x(k), x(n+1-k)] with the
  largest k whose two-sided binomial(n, 1/2) tail is <= 5%. Exact >= 95% coverage whatever the noise's
  shape, and robust to a disturbed repeat.
- The point estimate is always the median (on the log scale too: with an even count, the geometric mean of
  the middle two), and both intervals contain it: a sample's mean and median are
  at most its population deviation s sqrt((n-1)/n) apart, below the t half-width t s / sqrt(n) whenever
  t(0.975, n-1) >= sqrt(n-1), true for every n < 6; the order-statistic interval contains it by construction.
- The ratio of two models is measured in pairs: repeat i of the artifact and of its source ran back to back
  (in alternating order), so drift and contention that hit repeat i hit both. The interval is the one above
  over the paired log-ratios log(a_i / b_i), which cancels what the pair shares.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
FASTER, SLOWER, SAME = "faster", "slower", "no measurable difference"
VERDICTS = (FASTER, SLOWER, SAME)
SIGN_TEST_FROM = 6  # repeats from which the distribution-free interval reaches 95%


@dataclass(frozen=True)
class Interval:
    """A median and its confidence interval; low/high are None with fewer than 2 values."""

    median: float
    low: float | None
    high: float | None
    n: int
    method: str

    def contains(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The median of positive figures (one per repeat) and its interval; None without a value."""
    logs = _logs(values)
    if logs is None:
        return None
    center, low, high, method = _log_interval(logs, confidence)
    positive = sorted(v for v in values if _positive(v))
    return Interval(_middle(positive, center), _exp(low), _exp(high), len(logs), method)


def ratio_interval(values: Sequence[float | None], baselines: Sequence[float | None],
                   confidence: float = CONFIDENCE) -> Interval | None:
    """values[i] / baselines[i] over the repeats where both were measured (paired): the median ratio and its
    interval; None when no pair was measured."""
    if len(values) != len(baselines):
        raise ValueError(f"{len(values)} values against {len(baselines)} baselines: repeats are paired")
    pairs = [(a, b) for a, b in zip(values, baselines, strict=True) if _positive(a) and _positive(b)]
    if not pairs:
        return None
    logs = [math.log(a) - math.log(b) for a, b in pairs]
    center, low, high, method = _log_interval(logs, confidence)
    ratios = sorted(a / b for a, b in pairs)
    return Interval(_middle(ratios, center), _exp(low), _exp(high), len(logs), method)


def verdict(ratio: Interval | None, higher_is_better: bool) -> str | None:
    """`faster` / `slower` when the ratio's whole interval lies on one side of 1.0, `no measurable
    difference` when it contains 1.0; None without an interval (a single repeat). For a latency
    (lower is better) a ratio below 1 is the faster side."""
    if ratio is None or ratio.low is None or ratio.high is None:
        return None
    if ratio.low <= 1.0 <= ratio.high:
        return SAME
    above = ratio.low > 1.0
    return FASTER if above == higher_is_better else SLOWER


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (the inverse CDF at p, 0.5 < p < 1), by bisection on the CDF."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1 (got p={p}, df={df})")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sign_test_rank(n: int, confidence: float = CONFIDENCE) -> int | None:
    """The largest k with P(Binomial(n, 1/2) <= k-1) <= (1-confidence)/2: [x(k), x(n+1-k)] (1-based order
    statistics) covers the median with at least `confidence`; None when even k = 1 does not."""
    alpha = (1 - confidence) / 2
    best, tail = None, 0.0
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n  # P(B <= k-1)
        if tail > alpha:
            break
        best = k
    return best


# --- internals --------------------------------------------------------------------------------------


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _logs(values: Sequence[float | None]) -> list[float] | None:
    logs = [math.log(v) for v in values if _positive(v)]
    return logs or None


def _middle(ordered: list[float], log_center: float) -> float:
    """The median as the middle value itself when there is one (no exp(log(x)) rounding), else the
    geometric mean of the middle two (the median on the log scale)."""
    return ordered[len(ordered) // 2] if len(ordered) % 2 else math.exp(log_center)


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(value)


def _log_interval(logs: list[float], confidence: float) -> tuple[float, float | None, float | None, str]:
    """(median, low, high, method) of values on the log scale (module docstring)."""
    n = len(logs)
    center = statistics.median(logs)
    if n < 2:
        return center, None, None, "single repeat: no interval"
    k = sign_test_rank(n, confidence) if n >= SIGN_TEST_FROM else None
    if k is not None:
        ordered = sorted(logs)
        return center, ordered[k - 1], ordered[n - k], f"sign-test interval for the median (n={n})"
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    # the median lies inside for n < 6 (module docstring); min/max guard rounding at sd = 0
    return center, min(mean - half, center), max(mean + half, center), f"t-interval on logs (n={n})"


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    x = df / (df + t * t)
    return 1 - 0.5 * _betainc(df / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h

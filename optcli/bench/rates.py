"""The load levels of an online run, under the names GuideLLM users know: synchronous (one request at a
time), throughput (all at once), concurrent (C in flight), constant or poisson (R requests/s), and the
sweep (a synchronous run, a throughput run, then constant rates spaced between the two rates measured).

`plan_levels` turns `--rate`, `--rate-type` and `--concurrency` into levels; `sweep_rates` spaces a
sweep's constant rates; `parse_exclusion` reads `--warmup` / `--cooldown` (a count or a fraction).
"""

from __future__ import annotations

from dataclasses import dataclass

from optcli.errors import UsageError

RATE_TYPES = ("poisson", "constant", "sweep", "synchronous", "throughput", "concurrent")
ARRIVALS = ("poisson", "constant")
DEFAULT_SWEEP_SIZE = 10  # benchmarks in a sweep, as GuideLLM's default: synchronous + 8 constant + throughput


@dataclass(frozen=True)
class LoadLevel:
    """One online run's load: how requests arrive (`mode`), at what rate, with how many in flight at most."""

    mode: str  # synchronous | throughput | concurrent | constant | poisson
    rate: float | None = None  # requests/s, for constant and poisson
    concurrency: int | None = None  # requests in flight at most (None: no limit)

    @property
    def label(self) -> str:
        if self.mode == "concurrent":
            return f"concurrency {self.concurrency}"
        if self.rate is not None:
            cap = f", at most {self.concurrency} in flight" if self.concurrency else ""
            return f"{self.mode} {self.rate:.4g} req/s{cap}"
        return self.mode

    def as_dict(self) -> dict:
        return {"mode": self.mode, "rate": self.rate, "concurrency": self.concurrency, "label": self.label}


SYNCHRONOUS = LoadLevel("synchronous", concurrency=1)
THROUGHPUT = LoadLevel("throughput")


def sweep_rates(sync_rps: float, throughput_rps: float, size: int) -> list[float]:
    """`size - 2` constant rates spaced evenly strictly between the synchronous and the throughput run's
    request rates (GuideLLM's sweep); when throughput is not above synchronous, none lie between."""
    between = size - 2
    if between < 1 or not throughput_rps > sync_rps > 0:
        return []
    step = (throughput_rps - sync_rps) / (between + 1)
    return [sync_rps + step * (i + 1) for i in range(between)]


def _numbers(text: str, flag: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be a number or a comma-separated list (got '{text}')") from None
    if any(not v > 0 or v == float("inf") for v in values):  # `inf` alone is a throughput run (see below)
        raise UsageError(f"{flag} values must be finite and > 0 (got '{text}')")
    return values


def plan_levels(rate: str | None, rate_type: str | None, concurrency: str | None,
                requests: int) -> tuple[tuple[LoadLevel, ...], int, str]:
    """(levels, sweep size, arrivals) from the CLI. A sweep's levels are decided as it runs (its constant
    rates come from its first two runs), so it returns no levels and its size. Examples:
    `--rate 2` Poisson 2 req/s; `--rate 1,2,4 --rate-type constant`; `--rate sweep` or `--rate-type sweep
    --rate 6`; `--concurrency 1,4,16` (or `--rate-type concurrent --rate 1,4,16`); `--rate-type synchronous`."""
    if rate_type is not None and rate_type not in RATE_TYPES:
        raise UsageError(f"--rate-type must be one of {', '.join(RATE_TYPES)} (got '{rate_type}')")
    text = (rate or "").strip().lower()
    if text.startswith("sweep") or rate_type == "sweep":
        if rate_type not in (None, "sweep", *ARRIVALS):
            raise UsageError(f"--rate sweep runs synchronous, throughput and constant levels: not --rate-type {rate_type}")
        size_text = text.partition(":")[2] if text.startswith("sweep") else text
        if concurrency is not None:
            raise UsageError("--rate sweep sets every level itself: not with --concurrency")
        try:
            size = int(size_text) if size_text else DEFAULT_SWEEP_SIZE
        except ValueError:
            raise UsageError(f"--rate sweep:N needs an integer N (got '{rate}')") from None
        if size < 3:
            raise UsageError(f"a sweep needs at least 3 levels (synchronous, one rate, throughput); got {size}")
        return (), size, rate_type if rate_type in ARRIVALS else "constant"
    if rate_type in ("synchronous", "throughput"):
        if rate is not None or concurrency is not None:
            raise UsageError(f"--rate-type {rate_type} takes no --rate or --concurrency")
        return (SYNCHRONOUS if rate_type == "synchronous" else THROUGHPUT,), 0, "poisson"
    if rate_type == "concurrent":
        if rate is None or concurrency is not None:
            raise UsageError("--rate-type concurrent takes the levels in --rate C1,C2,... (or use --concurrency)")
        concurrency, rate = rate, None
    cap = None
    if concurrency is not None:
        levels = _numbers(concurrency, "--concurrency", int)
        if rate is None:
            return tuple(LoadLevel("concurrent", concurrency=c) for c in levels), 0, "poisson"
        if len(levels) > 1:
            raise UsageError("--concurrency with --rate caps requests in flight: give one value, not a list")
        cap = levels[0]
    arrivals = rate_type if rate_type in ARRIVALS else "poisson"
    if rate is None and rate_type in ARRIVALS:
        raise UsageError(f"--rate-type {rate_type} needs --rate R (requests/s)")
    if rate is None:
        return (LoadLevel("concurrent", concurrency=min(8, requests)),), 0, arrivals
    if text == "inf":  # `vllm bench serve --request-rate inf`: everything at once, up to the cap if one is set
        return ((LoadLevel("concurrent", concurrency=cap),) if cap else (THROUGHPUT,)), 0, arrivals
    return tuple(LoadLevel(arrivals, rate=r, concurrency=cap) for r in _numbers(rate, "--rate")), 0, arrivals


def parse_exclusion(text: str | None, flag: str) -> float:
    """`--warmup` / `--cooldown`: N requests (an integer >= 1) or a fraction of each level's (0 <= F < 1)."""
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a request count (N) or a fraction (0.1) (got '{text}')") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise UsageError(f"{flag} must be a whole count >= 1 or a fraction in [0, 1) (got '{text}')")
    return value


def excluded_count(spec: float, sent: int) -> int:
    """How many of `sent` requests a `--warmup` / `--cooldown` spec leaves out."""
    return int(spec) if spec >= 1 else int(spec * sent)

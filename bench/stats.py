"""Pure helpers: percentiles, medians, ratios and time series. No I/O, no servers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default);
    NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """The median of the finite values (NaN when there are none)."""
    return percentile([v for v in values if not math.isnan(v)], 50)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when either is NaN or the denominator is not positive."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return math.nan
    return numerator / denominator


def rate(count: float, seconds: float) -> float:
    return ratio(count, seconds)


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of latencies given in seconds, returned in milliseconds."""
    ms = [value * 1000 for value in latencies]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
    }


def time_bins(
    samples: Sequence[tuple[float, float]], width: float = 1.0, start: float | None = None
) -> list[dict[str, float]]:
    """(arrival time, latency in s) samples -> per-window rows: t (window start, s from `start`),
    throughput (events/s), and p50/p95/p99 latency in ms. Empty windows are kept (throughput 0)."""
    if not samples:
        return []
    if width <= 0:
        raise ValueError("width must be positive")
    origin = min(t for t, _ in samples) if start is None else start
    buckets: dict[int, list[float]] = {}
    for arrived, latency in samples:
        buckets.setdefault(int((arrived - origin) // width), []).append(latency)
    rows = []
    for index in range(min(buckets), max(buckets) + 1):
        bucket = buckets.get(index, [])
        summary = latency_summary(bucket)
        rows.append(
            {
                "t": index * width,
                "throughput": len(bucket) / width,
                "p50": summary["p50"],
                "p95": summary["p95"],
                "p99": summary["p99"],
            }
        )
    return rows


def value_at_fraction(
    progress: Sequence[tuple[float, float]], series: Sequence[tuple[float, float]], fraction: float
) -> float:
    """The last `series` (time, value) sample at or before the moment `progress` (time, fraction
    done 0..1) first reaches `fraction`; NaN when it never does. E.g. RSS at 50 % of a drain."""
    reached = next((t for t, done in progress if done >= fraction), None)
    if reached is None:
        return math.nan
    before = [value for t, value in series if t <= reached]
    return before[-1] if before else math.nan

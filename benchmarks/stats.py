"""Pure statistics used by every scenario: percentiles, summaries of samples, ratios."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TypedDict


class Summary(TypedDict):
    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default).

    Raises ``ValueError`` on an empty sequence or a ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    fraction = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def summarize(values: Iterable[float]) -> Summary:
    """n, p50, p90, p99, mean, min and max of a non-empty sample."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("summary of an empty sample")
    return Summary(
        n=len(data),
        p50=percentile(data, 50),
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        mean=sum(data) / len(data),
        min=data[0],
        max=data[-1],
    )


def median(values: Iterable[float]) -> float:
    data = list(values)
    return percentile(data, 50)


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` rounded, or ``None`` when either side is missing or the divisor is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


def max_overlap(intervals: Iterable[tuple[int, int]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant.

    An interval that ends at the same instant another starts does not overlap it: an environment that wrote
    its end mark and then served the next request cannot have been running both at once.
    """
    events: list[tuple[int, int]] = []
    for start, end in intervals:
        if end < start:
            raise ValueError(f"interval ends before it starts: {(start, end)}")
        events.append((start, 1))
        events.append((end, -1))
    # ends (-1) sort before starts (+1) at equal timestamps
    events.sort()
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def starts_above(intervals: Iterable[tuple[int, int]], cap: int) -> int:
    """How many intervals started while ``cap`` or more others were already open (would run above the cap).

    Same tie rule as :func:`max_overlap`: an end and a start at the same instant do not overlap.
    """
    events: list[tuple[int, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort()
    running = above = 0
    for _, delta in events:
        if delta > 0 and running >= cap:
            above += 1
        running += delta
    return above

"""Benchmark statistics: percentiles, summaries, ratios and the concurrency counts used for throttling."""

import pytest

from benchmarks import stats


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 99) == pytest.approx(3.97)


def test_percentile_ignores_input_order() -> None:
    assert stats.percentile([9.0, 1.0, 5.0], 50) == 5.0


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        stats.percentile([1.0], 101)


def test_summarize_reports_every_field() -> None:
    summary = stats.summarize(range(1, 101))
    assert summary["n"] == 100
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["mean"] == pytest.approx(50.5)
    assert (summary["min"], summary["max"]) == (1.0, 100.0)


def test_ratio_is_none_when_a_side_is_missing_or_zero() -> None:
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(None, 2.0) is None
    assert stats.ratio(1.0, 0.0) is None
    assert stats.ratio(1.0, 3.0, digits=2) == 0.33


def test_max_overlap_counts_simultaneous_intervals() -> None:
    assert stats.max_overlap([(0, 10), (5, 15), (6, 7)]) == 3
    assert stats.max_overlap([]) == 0


def test_an_end_and_a_start_at_the_same_instant_do_not_overlap() -> None:
    assert stats.max_overlap([(0, 10), (10, 20), (20, 30)]) == 1


def test_max_overlap_rejects_reversed_intervals() -> None:
    with pytest.raises(ValueError, match="ends before"):
        stats.max_overlap([(10, 5)])


def test_starts_above_counts_invocations_that_exceed_the_cap() -> None:
    intervals = [(0, 100), (10, 100), (20, 30), (25, 40)]
    assert stats.starts_above(intervals, 4) == 0
    assert stats.starts_above(intervals, 3) == 1
    assert stats.starts_above(intervals, 2) == 2


def test_starts_above_is_zero_for_back_to_back_invocations() -> None:
    assert stats.starts_above([(0, 10), (10, 20), (0, 20)], 2) == 0

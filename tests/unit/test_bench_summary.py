"""The headline ratios and goals computed from a run's results, and the README tables made from them."""

from typing import Any

import pytest

from benchmarks import cold, report, summary, warm, wrk


def _row(target: str, c: int, rps: float, p50: float, p99: float, *, boot: tuple[float, float] | None = None) -> Any:
    row: dict[str, Any] = {
        "target": target,
        "label": target,
        "concurrency": c,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": 0,
    }
    if boot is not None:
        row["bootstrap_ms"] = {"p50": boot[0], "p99": boot[1]}
    return row


RESULTS: dict[str, Any] = {
    "warm": [
        _row("gateway", 8, 1500.0, 2.0, 6.0, boot=(0.4, 1.5)),
        _row("agent", 8, 2000.0, 1.0, 3.0, boot=(0.3, 1.0)),
        _row("rie", 8, 3000.0, 0.8, 2.0),
        _row("floor_aiohttp", 8, 12000.0, 0.3, 1.0),
    ],
    "cold": {
        "gateway": {"trials": 30, "total": {"p50": 60.0, "p99": 90.0}},
        "rie": {"trials": 30, "total": {"p50": 40.0, "p99": 50.0}},
    },
    "scale": {
        "gateway_burst": {"total_ms": 900.0, "p50_ms": 500.0, "statuses": {"200": 200}},
        "rie_burst": {"total_ms": 600.0, "p50_ms": 400.0, "statuses": {"200": 200}},
        "throttle": {
            "cap": 4,
            "clients": 8,
            "seconds": 3,
            "statuses": {"200": 10, "429": 5},
            "invocations_run": 10,
            "max_running": 4,
            "invocations_above_cap": 0,
        },
    },
    "memory": {"agent_env": {"rss_mb": 50.0, "pss_mb": 30.0}, "rie_env": {"rss_mb": 20.0, "pss_mb": 10.0}},
}


def test_throughput_and_latency_are_ratios_to_the_emulator() -> None:
    out = summary.build(RESULTS)
    assert out["gateway_rps_vs_emulator_c8"] == 0.5
    assert out["gateway_p50_vs_emulator_c8"] == 2.5
    assert out["agent_rps_vs_floor_aiohttp_c8"] == pytest.approx(0.167)
    assert out["emulator_rps_vs_floor_aiohttp_c8"] == 0.25


def test_platform_overhead_subtracts_the_bootstraps_own_time() -> None:
    out = summary.build(RESULTS)
    assert out["overhead_p50_ms_c8"] == pytest.approx(1.6)
    assert out["overhead_p99_ms_c8"] == pytest.approx(4.5)


def test_goals_report_measured_values_and_whether_they_are_met() -> None:
    goals = summary.build(RESULTS)["goals"]
    assert goals["overhead_p50_ms_c8"] == {"goal": 1.0, "measured": 1.6, "met": False}
    assert goals["gateway_rps_vs_emulator_c8"]["met"] is False
    assert goals["cold_p50_ms_embedded"]["measured"] == 60.0
    assert goals["invocations_above_cap"]["met"] is True


def test_missing_sections_leave_goals_unmeasured() -> None:
    goals = summary.build({"warm": []})["goals"]
    assert all(goal["met"] is None for goal in goals.values())


def test_cold_start_and_burst_are_compared_with_the_emulator() -> None:
    out = summary.build(RESULTS)
    assert out["cold_p50_vs_emulator_gateway"] == 1.5
    assert out["burst_200_vs_emulator"] == 1.5
    assert out["environment_pss_vs_emulator"] == 3.0


def test_warm_aggregate_takes_medians_over_rounds_and_pools_bootstrap_times() -> None:
    def run(rps: float, p50: float, durations: tuple[float, ...]) -> wrk.WrkResult:
        ok = int(rps)
        return wrk.WrkResult(ok, 1.0, p50, p50, p50 * 3, p50 * 4, p50, p50 * 5, 0, {200: ok}, durations)

    row = warm.aggregate("agent", "(b)", 8, [run(100, 1.0, (0.2,)), run(300, 3.0, (0.4,)), run(200, 2.0, (0.6,))])
    assert row["rps"] == 200.0
    assert row["p50_ms"] == 2.0
    assert row["statuses"] == {"200": 600}
    assert row["bootstrap_ms"]["p50"] == pytest.approx(0.4)


def test_cold_phases_follow_the_critical_path_and_add_up() -> None:
    ms = 1_000_000
    out = cold.phases(0, 100 * ms, 90 * ms, 95 * ms, 130 * ms)
    assert out["spawn"] == 100.0
    assert out["runtime_init"] == 0.0
    assert out["handler_import"] == 0.0
    assert out["first_response"] == 30.0
    assert out["spawn"] + out["runtime_init"] + out["handler_import"] + out["first_response"] == out["total"]


def test_cold_phases_without_a_listening_time_merge_spawn_and_init() -> None:
    ms = 1_000_000
    out = cold.phases(0, None, 40 * ms, 41 * ms, 45 * ms)
    assert out["spawn_and_runtime_init"] == 40.0
    assert "spawn" not in out


def test_readme_tables_are_spliced_between_markers_and_replaced_on_the_next_run() -> None:
    results = dict(RESULTS, summary=summary.build(RESULTS), meta={"command": "make bench"})
    document = "# Benchmarks\n\nmethod text\n"
    first = report.splice(document, report.render(results))
    assert first.startswith(document)
    assert "| (c) emulator process started" in first
    assert f"0.50{report.TIMES}" in first
    second = report.splice(first + "trailing text\n", "new tables\n")
    assert second.count(report.BEGIN) == 1
    assert "new tables" in second
    assert f"0.50{report.TIMES}" not in second
    assert second.endswith("trailing text\n")


def test_headline_quotes_the_measured_figures_and_the_command() -> None:
    results = dict(RESULTS, summary=summary.build(RESULTS), meta={"command": "make bench", "machine": "2 cores"})
    text = report.headline(results)
    assert text.startswith("`make bench`")
    assert "1,500 req/s" in text  # the gateway's throughput at concurrency 8
    assert f"0.50{report.TIMES} the emulator's throughput" in text
    assert "60.0 ms by default" in text
    assert "above a concurrency cap under 2x overload: 0" in text

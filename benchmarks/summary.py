"""The headline ratios of a run, computed from its results (pure: a dict in, a dict out)."""

from __future__ import annotations

from typing import Any

from benchmarks.stats import ratio

GOALS = {
    "overhead_p50_ms_c8": 1.0,
    "overhead_p99_ms_c8": 3.0,
    "gateway_rps_vs_emulator_c8": 1.0,
    "cold_p50_ms_embedded": 50.0,
    "invocations_above_cap": 0,
}


def warm_row(results: dict[str, Any], target: str, concurrency: int) -> dict[str, Any] | None:
    for row in results.get("warm", []):
        if row["target"] == target and row["concurrency"] == concurrency:
            return dict(row)
    return None


def _get(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or row.get(key) is None:
        return None
    return float(row[key])


def _path(results: dict[str, Any], *keys: str) -> Any:
    node: Any = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def overhead(row: dict[str, Any] | None, quantile: str) -> float | None:
    """Client latency minus the bootstrap's own time (X-Lambdalet-Duration-Ms) at the same percentile."""
    if row is None or "bootstrap_ms" not in row:
        return None
    key = {"p50": "p50_ms", "p99": "p99_ms"}[quantile]
    return round(float(row[key]) - float(row["bootstrap_ms"][quantile]), 3)


def build(results: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios and the issue's goals with their measured values."""
    out: dict[str, Any] = {}
    concurrencies = sorted({row["concurrency"] for row in results.get("warm", [])})
    for c in concurrencies:
        rie = warm_row(results, "rie", c)
        floor = warm_row(results, "floor_aiohttp", c)
        for name in ("gateway", "agent"):
            row = warm_row(results, name, c)
            if row is None:
                continue
            out[f"{name}_rps_vs_emulator_c{c}"] = ratio(_get(row, "rps"), _get(rie, "rps"))
            out[f"{name}_p50_vs_emulator_c{c}"] = ratio(_get(row, "p50_ms"), _get(rie, "p50_ms"))
            out[f"{name}_p99_vs_emulator_c{c}"] = ratio(_get(row, "p99_ms"), _get(rie, "p99_ms"))
            out[f"{name}_rps_vs_floor_aiohttp_c{c}"] = ratio(_get(row, "rps"), _get(floor, "rps"))
        if rie is not None:
            out[f"emulator_rps_vs_floor_aiohttp_c{c}"] = ratio(_get(rie, "rps"), _get(floor, "rps"))
    gateway1 = warm_row(results, "gateway", 1)
    out["overhead_p50_ms_c1"] = overhead(gateway1, "p50")
    out["overhead_p99_ms_c1"] = overhead(gateway1, "p99")
    gateway8 = warm_row(results, "gateway", 8)
    agent8 = warm_row(results, "agent", 8)
    out["overhead_p50_ms_c8"] = overhead(gateway8, "p50")
    out["overhead_p99_ms_c8"] = overhead(gateway8, "p99")
    out["agent_overhead_p50_ms_c8"] = overhead(agent8, "p50")
    out["agent_overhead_p99_ms_c8"] = overhead(agent8, "p99")

    cold_gateway = _path(results, "cold", "gateway", "total", "p50")
    cold_agent = _path(results, "cold", "agent", "total", "p50")
    cold_rie = _path(results, "cold", "rie", "total", "p50")
    # the emulator's trials run in the same rounds as the gateway's, where the run has them
    cold_rie_rounds = _path(results, "cold", "rie_gateway_rounds", "total", "p50") or cold_rie
    out["cold_p50_ms_gateway"] = cold_gateway
    out["cold_p50_ms_agent"] = cold_agent
    out["cold_p50_ms_emulator"] = cold_rie
    out["cold_p50_vs_emulator_gateway"] = ratio(cold_gateway, cold_rie_rounds)
    out["cold_p50_ms_emulator_gateway_rounds"] = cold_rie_rounds
    out["cold_p50_vs_emulator_agent"] = ratio(cold_agent, cold_rie)
    out["cold_p50_ms_embedded"] = cold_gateway if cold_gateway is not None else cold_agent
    for config in ("no_spare", "no_fast_start"):
        value = _path(results, "cold", f"gateway_{config}", "total", "p50")
        out[f"cold_p50_ms_gateway_{config}"] = value
        out[f"cold_p50_vs_emulator_gateway_{config}"] = ratio(value, cold_rie_rounds)

    burst_gateway = _path(results, "scale", "gateway_burst", "total_ms")
    burst_rie = _path(results, "scale", "rie_burst", "total_ms")
    out["burst_200_ms_gateway"] = burst_gateway
    out["burst_200_ms_emulator"] = burst_rie
    out["burst_200_vs_emulator"] = ratio(burst_gateway, burst_rie)
    burst_spawned = _path(results, "scale", "gateway_burst_no_fast_start", "total_ms")
    out["burst_200_ms_gateway_no_fast_start"] = burst_spawned
    out["burst_200_vs_emulator_no_fast_start"] = ratio(burst_spawned, burst_rie)
    above = [
        _path(results, "scale", key, "invocations_above_cap")
        for key in ("throttle", "throttle_no_fast_start", "throttle_account")
    ]
    measured = [value for value in above if value is not None]
    out["invocations_above_cap"] = max(measured) if measured else None

    out["gateway_rss_mb_1000_functions"] = _path(results, "memory", "gateway_1000", "rss_mb")
    out["gateway_kb_per_function"] = _path(results, "memory", "gateway_kb_per_function")
    env_pss = _path(results, "memory", "agent_env", "pss_mb")
    rie_pss = _path(results, "memory", "rie_env", "pss_mb")
    out["environment_pss_mb"] = env_pss
    out["environment_pss_vs_emulator"] = ratio(env_pss, rie_pss)
    forked_pss = _path(results, "memory", "gateway_env", "pss_mb")
    out["environment_pss_mb_forked"] = forked_pss
    out["environment_pss_vs_emulator_forked"] = ratio(forked_pss, rie_pss)
    out["goals"] = goals(out)
    return out


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the issue: target, measured value, met or not (None when not measured)."""
    out: dict[str, Any] = {}
    for key, limit in GOALS.items():
        value = summary.get(key)
        if value is None:
            met = None
        elif key == "gateway_rps_vs_emulator_c8":
            met = value >= limit
        else:
            met = value <= limit
        out[key] = {"goal": limit, "measured": value, "met": met}
    return out

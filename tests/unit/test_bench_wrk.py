"""Parsing what benchmarks/wrk.lua makes wrk print, and the command line the harness runs."""

import shutil

import pytest

from benchmarks import wrk

OUTPUT = """Running 5s test @ http://127.0.0.1:9000/2015-03-31/functions/function/invocations
  8 threads and 8 connections
Requests/sec:   1200.00
WRKJSON {"requests": 6000, "duration_us": 5000000, "bytes": 900000, \
"errors": {"connect": 0, "read": 1, "write": 0, "status": 10, "timeout": 2}, \
"latency_us": {"p50": 650.0, "p90": 900.5, "p99": 2500.0, "p999": 9000.0, "mean": 700.2, "max": 12000.0}, \
"statuses": {"200": 5990, "429": 10}, "duration_ms": [0.4000,0.5000,0.6000]}
"""


def test_parse_reads_latency_in_milliseconds() -> None:
    result = wrk.parse(OUTPUT)
    assert result.p50_ms == pytest.approx(0.65)
    assert result.p99_ms == pytest.approx(2.5)
    assert result.p999_ms == pytest.approx(9.0)
    assert result.max_ms == pytest.approx(12.0)


def test_throughput_counts_only_successful_responses() -> None:
    result = wrk.parse(OUTPUT)
    assert result.requests == 6000
    assert result.ok == 5990
    assert result.rps == pytest.approx(1198.0)


def test_errors_add_transport_failures_and_non_2xx_responses() -> None:
    assert wrk.parse(OUTPUT).errors == 1 + 2 + 10


def test_bootstrap_durations_are_collected() -> None:
    result = wrk.parse(OUTPUT)
    assert result.durations_ms == (0.4, 0.5, 0.6)
    summary = wrk.duration_summary(result)
    assert summary is not None
    assert summary["p50"] == pytest.approx(0.5)


def test_targets_without_duration_header_have_no_bootstrap_summary() -> None:
    text = OUTPUT.replace('"duration_ms": [0.4000,0.5000,0.6000]', '"duration_ms": []')
    assert wrk.duration_summary(wrk.parse(text)) is None


def test_parse_fails_loudly_without_the_json_line() -> None:
    with pytest.raises(wrk.WrkError, match="no WRKJSON line"):
        wrk.parse("Running 5s test\nsocket errors\n")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by make apt-deps")
def test_command_opens_one_thread_per_connection_on_the_given_path() -> None:
    argv = wrk.command([("127.0.0.1", 9000), ("127.0.0.1", 9001)], 8, 5, "/2015-03-31/functions/noop/invocations")
    assert "--threads=8" in argv
    assert "--connections=8" in argv
    assert "--duration=5s" in argv
    assert argv[-1] == "http://127.0.0.1:9000/2015-03-31/functions/noop/invocations"

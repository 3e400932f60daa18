"""Deadline arithmetic, billed duration, Lambda's START/END/REPORT lines and error messages, the
4 KB log tail, and the line splitting of the runtime's output."""

from __future__ import annotations

import pytest
from lambdalet_agent import report
from lambdalet_agent.process import MAX_LINE, _Pump

RID = "6bc28136-xmpl-4365-b021-0ce6b2e64ab0"


def test_deadline_is_start_plus_timeout_in_epoch_ms() -> None:
    assert report.deadline_ms(1542409703888, 3) == 1542409706888
    assert report.deadline_ms(1000, 0.5) == 1500
    assert report.deadline_ms(1000, 900) == 901000


def test_deadline_of_a_pending_invocation_counts_from_its_acceptance() -> None:
    # Accepted at t, handed to the runtime 0.25 s later with a 3 s timeout: 2.75 s remain.
    assert report.deadline_ms(1_000_250, 2.75) == 1_003_000


@pytest.mark.parametrize(
    ("duration", "billed"), [(0.01, 1), (1.0, 1), (1.0001, 2), (198.5, 199), (200.0, 200), (0.0, 1)]
)
def test_billed_duration_rounds_up_to_the_millisecond(duration: float, billed: int) -> None:
    assert report.billed_ms(duration) == billed


def test_memory_rounds_up_to_whole_mb() -> None:
    assert report.memory_mb(1) == 1
    assert report.memory_mb(90 * report.MIB) == 90
    assert report.memory_mb(90 * report.MIB + 1) == 91


def test_start_end_lines() -> None:
    assert report.start_line(RID, "$LATEST") == f"START RequestId: {RID} Version: $LATEST"
    assert report.end_line(RID) == f"END RequestId: {RID}"


def test_report_line_cold_and_warm() -> None:
    cold = report.report_line(
        RID, duration_ms=198.5, memory_size_mb=512, max_memory_used_mb=90, init_duration_ms=524.75
    )
    assert cold == (
        f"REPORT RequestId: {RID}\tDuration: 198.50 ms\tBilled Duration: 199 ms\tMemory Size: 512 MB\t"
        "Max Memory Used: 90 MB\tInit Duration: 524.75 ms\t"
    )
    warm = report.report_line(RID, duration_ms=1.234, memory_size_mb=128, max_memory_used_mb=40)
    assert warm == (
        f"REPORT RequestId: {RID}\tDuration: 1.23 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\t"
        "Max Memory Used: 40 MB\t"
    )


def test_timeout_messages() -> None:
    assert report.timeout_error(RID, 3) == f"RequestId: {RID} Error: Task timed out after 3.00 seconds"
    line = report.timeout_log_line(RID, 3, 1605000000.1234)
    assert line == f"2020-11-10T09:20:00.123Z {RID} Task timed out after 3.00 seconds"


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (1, "exit status 1"),
        (0, "exit status 0"),
        (-9, "signal: killed"),
        (-11, "signal: segmentation fault"),
        (-15, "signal: terminated"),
    ],
)
def test_exit_error_messages_use_gos_wording(returncode: int, text: str) -> None:
    assert report.exit_error(RID, returncode) == f"RequestId: {RID} Error: Runtime exited with error: {text}"


def test_exit_without_status() -> None:
    assert report.exit_error(RID, None) == f"RequestId: {RID} Error: Runtime exited without providing a reason"


def test_tail_keeps_the_last_4096_bytes() -> None:
    tail = report.LogTail()
    assert tail.value() == b""
    tail.add(b"START\n")
    assert tail.value() == b"START\n"
    for i in range(2000):
        tail.add(f"line {i}\n".encode())
    value = tail.value()
    assert len(value) == 4096
    assert value.endswith(b"line 1999\n")


def test_pump_splits_lines_across_chunks_and_flushes_the_rest() -> None:
    lines: list[bytes] = []
    exits: list[int | None] = []
    pump = _Pump(lines.append, exits.append)
    pump.pipe_data_received(1, b"hello ")
    pump.pipe_data_received(2, b"err one\nerr ")
    pump.pipe_data_received(1, b"world\nsecond\nthi")
    assert lines == [b"err one\n", b"hello world\n", b"second\n"]
    pump.pipe_connection_lost(1, None)
    pump.pipe_connection_lost(2, None)
    assert lines[-2:] == [b"thi\n", b"err \n"]


def test_pump_cuts_very_long_lines() -> None:
    lines: list[bytes] = []
    pump = _Pump(lines.append, lambda code: None)
    pump.pipe_data_received(1, b"x" * (MAX_LINE * 2 + 10))
    assert lines == [b"x" * MAX_LINE + b"\n"] * 2
    pump.pipe_connection_lost(1, None)
    assert lines[-1] == b"x" * 10 + b"\n"

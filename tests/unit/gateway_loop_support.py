"""Shared by the gateway's unit test modules: a fixture that fails a test whose event loop was blocked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

#: Longer than any step of ours may take; a blocking call (sleep, sync I/O) shows up well above it.
BLOCKING_THRESHOLD_S = 0.5


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and "took" in message:
            self.found.append(message)


@pytest.fixture
async def no_blocking() -> AsyncIterator[None]:
    """Run the test's loop in debug mode and fail if any step blocked it for over the threshold."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = BLOCKING_THRESHOLD_S
    handler = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        loop.set_debug(False)
    assert not handler.found, f"the event loop was blocked: {handler.found}"

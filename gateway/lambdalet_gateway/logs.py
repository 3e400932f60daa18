"""Per-function log lines (function output and START/END/REPORT), kept for ``lambdalet logs``.

A bounded buffer per function plus live subscribers; appending never blocks and never grows without
bound (a slow follower loses lines rather than slowing the function down).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncIterator

_FOLLOWER_BACKLOG = 10000


class LogStore:
    def __init__(self, lines_per_function: int = 5000, *, echo: bool = False) -> None:
        self._size = lines_per_function
        self._lines: dict[str, deque[str]] = {}
        self._followers: dict[str, set[asyncio.Queue[str]]] = {}
        self._echo = echo

    def append(self, function: str, line: str) -> None:
        buffer = self._lines.get(function)
        if buffer is None:
            buffer = self._lines[function] = deque(maxlen=self._size)
        buffer.append(line)
        for queue in self._followers.get(function, ()):
            if queue.qsize() < _FOLLOWER_BACKLOG:
                queue.put_nowait(line)
        if self._echo:
            sys.stdout.write(f"[{function}] {line}\n")
            sys.stdout.flush()

    def lines(self, function: str) -> list[str]:
        return list(self._lines.get(function, ()))

    async def follow(self, function: str) -> AsyncIterator[str]:
        """The buffered lines, then new ones as they come (until the consumer stops)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        for line in self._lines.get(function, ()):
            queue.put_nowait(line)
        self._followers.setdefault(function, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._followers[function].discard(queue)

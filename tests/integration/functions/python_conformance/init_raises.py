"""Raises while it is imported: an init error of the raised type."""

from __future__ import annotations


class ConformanceError(Exception):
    """The error type the function raises."""


raise ConformanceError("init failed")

"""The crate clock: 10 ns ticks since the crate's time origin.

Every board of a crate stamps its events from one clock, so timestamps of
different boards are comparable, and the origin maps them back to wall time
(``time.monotonic_ns()``) for latency measurements. Tests use `ManualClock`
so the same seed and the same clock steps give the same bytes.
"""

from __future__ import annotations

import abc
import threading
import time

#: Nanoseconds per timestamp tick.
TICK_NS = 10
#: Ticks per second of crate time.
TICKS_PER_SECOND = 1_000_000_000 // TICK_NS


class CrateClock(abc.ABC):
    """A source of 10 ns ticks counted from `origin_ns`."""

    @abc.abstractmethod
    def now_ticks(self) -> int:
        """Ticks elapsed since the origin (never decreases)."""

    @abc.abstractmethod
    def origin_ns(self) -> int:
        """``time.monotonic_ns()`` at tick 0."""


class MonotonicClock(CrateClock):
    """Real time: ticks follow ``time.monotonic_ns()`` from the moment of creation."""

    def __init__(self, origin_ns: int | None = None) -> None:
        self._origin_ns = time.monotonic_ns() if origin_ns is None else origin_ns

    def now_ticks(self) -> int:
        return (time.monotonic_ns() - self._origin_ns) // TICK_NS

    def origin_ns(self) -> int:
        return self._origin_ns


class HorizonClock(CrateClock):
    """Real time, but only as far as it was last moved (`advance_to_now`).

    The crate process moves it once per build of every board and shows that
    instant as its heartbeat: no event is ever built past the heartbeat, so a
    timestamp the IOC latches up to the heartbeat is never older than an event
    already in a FIFO (or already read), and never newer than one still to come.
    """

    def __init__(self) -> None:
        self._origin_ns = time.monotonic_ns()
        self._ticks = 0

    def now_ticks(self) -> int:
        return self._ticks

    def origin_ns(self) -> int:
        return self._origin_ns

    def advance_to_now(self) -> int:
        """Move to the present; returns it as ``time.monotonic_ns()``."""
        now_ns = time.monotonic_ns()
        self._ticks = max(self._ticks, (now_ns - self._origin_ns) // TICK_NS)
        return now_ns


class ManualClock(CrateClock):
    """A clock that only moves when told to, for deterministic tests and benchmarks."""

    def __init__(self, start_ticks: int = 0, origin_ns: int = 0) -> None:
        if start_ticks < 0:
            raise ValueError("a clock cannot start before its origin")
        self._ticks = start_ticks
        self._origin_ns = origin_ns
        self._lock = threading.Lock()

    def now_ticks(self) -> int:
        return self._ticks

    def origin_ns(self) -> int:
        return self._origin_ns

    def advance(self, ticks: int) -> int:
        """Move forward by ``ticks`` (>= 0); returns the new tick count."""
        if ticks < 0:
            raise ValueError("the crate clock never runs backwards")
        with self._lock:
            self._ticks += int(ticks)
            return self._ticks

    def advance_seconds(self, seconds: float) -> int:
        """Move forward by a duration in seconds, rounded to whole ticks."""
        return self.advance(round(seconds * TICKS_PER_SECOND))

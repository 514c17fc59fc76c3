"""When events arrive: a Bernoulli process on the 10 ns tick grid.

A board whose channels each fire at ``r`` Hz is one stream at ``channels * r``
with each event's channel drawn uniformly; that is equivalent to independent
per-channel Poisson processes and yields strictly increasing timestamps with
no sort. On the tick grid the process is Bernoulli (at most one event per tick
and board, probability ``p`` per tick), so gaps are geometric and at least 1.
Being memoryless, the process can restart at any tick (rate change, master
logic on) and can count arrivals it never materialises (a long pause with a
full FIFO) with one binomial draw.
"""

from __future__ import annotations

import math

import numpy as np

from sim.clock import TICKS_PER_SECOND

#: `ArrivalProcess.next_tick` while the rate is 0: later than any clock reading.
NEVER = 1 << 62


class ArrivalProcess:
    """Arrival ticks of one board's event stream, drawn lazily in clock order."""

    def __init__(self, rng: np.random.Generator, rate_hz: float = 0.0) -> None:
        self._rng = rng
        self._p = 0.0
        self._gap_scale = 0.0
        self.next_tick = NEVER
        self._set_probability(rate_hz)

    @property
    def probability_per_tick(self) -> float:
        return self._p

    def _set_probability(self, rate_hz: float) -> None:
        if not math.isfinite(rate_hz) or rate_hz < 0:
            raise ValueError(f"event rate must be a finite number >= 0, not {rate_hz!r}")
        self._p = min(1.0, rate_hz / TICKS_PER_SECOND)
        # Geometric gaps by inversion of an exponential: floor(E / -ln(1 - p)) + 1.
        self._gap_scale = 1.0 / -math.log1p(-self._p) if 0.0 < self._p < 1.0 else 0.0

    def _gaps(self, count: int) -> np.ndarray:
        gaps = self._rng.standard_exponential(count)
        gaps *= self._gap_scale
        return gaps.astype(np.int64) + 1

    def restart(self, after_tick: int, rate_hz: float | None = None) -> None:
        """Forget the pending arrival; the next one comes after ``after_tick``."""
        if rate_hz is not None:
            self._set_probability(rate_hz)
        self.next_tick = NEVER if self._p == 0.0 else after_tick + int(self._gaps(1)[0])

    def take(self, until_tick: int, limit: int) -> np.ndarray:
        """Arrival ticks up to and including ``until_tick``, at most ``limit`` of them.

        Stops early at ``limit``; the arrivals not taken remain pending.
        """
        chunks: list[np.ndarray] = []
        taken = 0
        while self.next_tick <= until_tick and taken < limit:
            expected = (until_tick - self.next_tick) * self._p
            want = min(limit - taken, int(expected + 6.0 * math.sqrt(expected)) + 16)
            gaps = self._gaps(want)
            ticks = np.cumsum(gaps)
            after_last = self.next_tick + int(ticks[-1])
            ticks -= gaps
            ticks += self.next_tick
            inside = int(np.searchsorted(ticks, until_tick, side="right"))
            if inside < want:
                self.next_tick = int(ticks[inside])
                ticks = ticks[:inside]
            else:
                self.next_tick = after_last
            chunks.append(ticks)
            taken += ticks.size
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)

    def skip(self, until_tick: int) -> int:
        """Count and discard every pending arrival up to ``until_tick`` without building them."""
        if self.next_tick > until_tick:
            return 0
        count = 1 + int(self._rng.binomial(until_tick - self.next_tick, self._p))
        self.restart(until_tick)
        return count

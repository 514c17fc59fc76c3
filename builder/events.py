"""Coincidence events: time-ordered hits grouped within a window.

The grouping rule (the same online and offline): the first hit not yet in an
event opens an event, and the event takes every following hit whose timestamp
is at most ``window_ticks`` after that FIRST hit's (``t ≤ t_first + window``);
the next hit opens the next event. A window of 0 groups hits with equal
timestamps only. Windows never chain: a run of hits each 60 ticks apart with a
100-tick window makes events of two hits, not one long event.

`DEFAULT_WINDOW_TICKS` is 100 ticks = 1 µs: wider than the timing spread of
HPGe signals with leading-edge or CFD timing (a few hundred ns), and narrow
enough that random coincidences stay rare at tens of kHz per detector.

The rule is sequential, yet no Python runs per hit or per event: every hit's
"first hit outside my window" comes from one ``searchsorted``, and the chain of
event openers from hit 0 is followed by pointer doubling (log2(events) numpy
passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.hits import HIT_DTYPE, concat_hits

#: 100 × 10 ns = 1 µs (see the module doc).
DEFAULT_WINDOW_TICKS = 100


@dataclass
class Events:
    """Events back to back: event ``i`` is ``hits[offsets[i]:offsets[i + 1]]``.

    ``traces`` (rows aligned with ``hits``) when the builder was fed traces.
    """

    hits: np.ndarray
    offsets: np.ndarray
    traces: np.ndarray | None = None

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def multiplicity(self) -> np.ndarray:
        """Hits per event."""
        return np.diff(self.offsets)

    @classmethod
    def empty(cls) -> Events:
        return cls(np.empty(0, dtype=HIT_DTYPE), np.zeros(1, dtype=np.int64))


def event_starts(timestamps: np.ndarray, window_ticks: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the hits that open events, and each one's end (first hit outside).

    ``timestamps`` must be non-decreasing. Ends equal ``timestamps.size`` for an
    event whose window reaches past the last hit given.
    """
    count = timestamps.size
    if count == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    limit = timestamps.astype(np.uint64) + np.uint64(window_ticks)
    outside = np.searchsorted(timestamps, limit, side="right").astype(np.int64)
    jump = np.append(outside, count)  # jump[count] = count: the end absorbs
    # starts holds the chain's first 2^k openers and jump = next^(2^k): one pass doubles both.
    starts = np.zeros(1, dtype=np.int64)
    while True:
        reached = jump[starts]
        reached = reached[reached < count]
        starts = np.concatenate([starts, reached])
        if reached.size < starts.size - reached.size:
            break
        jump = jump[jump]
    return starts, outside[starts]


class EventBuilder:
    """Groups hits arriving in timestamp order into events (rule: see the module doc).

    `feed` returns the events that can no longer grow (a later hit lies outside
    their window); the hits of the last, still open events wait for the next
    `feed` or for `flush`.
    """

    def __init__(self, window_ticks: int = DEFAULT_WINDOW_TICKS) -> None:
        if window_ticks < 0:
            raise ValueError("the coincidence window cannot be negative")
        self.window_ticks = int(window_ticks)
        self._hits = np.empty(0, dtype=HIT_DTYPE)
        self._traces: np.ndarray | None = None
        self._last_timestamp = 0

    def feed(self, hits: np.ndarray, traces: np.ndarray | None = None) -> Events:
        """Add hits (non-decreasing timestamps, none before those fed earlier)."""
        if hits.size:
            stamps = hits["timestamp"]
            if int(stamps[0]) < self._last_timestamp or bool((stamps[1:] < stamps[:-1]).any()):
                raise ValueError("hits must come in non-decreasing timestamp order")
            self._last_timestamp = int(stamps[-1])
        pending = concat_hits([self._hits, hits]) if self._hits.size else hits
        pending_traces = _join_traces(self._traces, traces)
        starts, ends = event_starts(pending["timestamp"], self.window_ticks)
        done = int(np.searchsorted(ends, pending.size, side="left"))
        stop = int(starts[done]) if done < starts.size else pending.size
        self._hits = concat_hits([pending[stop:]])  # a copy: numpy's own is as slow
        self._traces = None if pending_traces is None else pending_traces[stop:].copy()
        offsets = np.append(starts[:done], stop).astype(np.int64)
        traces_out = None if pending_traces is None else pending_traces[:stop]
        return Events(pending[:stop], offsets, traces_out)

    def flush(self) -> Events:
        """Every event still open (the end of the data)."""
        pending, traces = self._hits, self._traces
        self._hits, self._traces = np.empty(0, dtype=HIT_DTYPE), None
        starts, _ = event_starts(pending["timestamp"], self.window_ticks)
        return Events(pending, np.append(starts, pending.size).astype(np.int64), traces)


def _join_traces(held: np.ndarray | None, new: np.ndarray | None) -> np.ndarray | None:
    """Held and new trace rows as one array (widths padded with −1 to the wider)."""
    if held is None or held.shape[0] == 0:
        return new
    if new is None:
        return held
    width = max(held.shape[1], new.shape[1])
    joined = np.full((held.shape[0] + new.shape[0], width), -1, dtype=np.int16)
    joined[: held.shape[0], : held.shape[1]] = held
    joined[held.shape[0] :, : new.shape[1]] = new
    return joined

"""Online time-ordered merge of every board of every crate a receiver pulls (issue 16).

Records wait in memory until they can be written in timestamp order. Each board
has a watermark, the largest timestamp it has sent; a board that sent its
end-of-run (0xD) header has none left to wait for. A board's error headers
(type F, channel 0xF: almost full, overflow) do not move its watermark: the
IOC latches their timestamp when it decides to send one, ahead of the older
events still in the FIFO, which it reads and sends after. An "empty" header (0xE)
does move it: the IOC stamps one only when the FIFO is still empty after the
latch, so nothing older follows it. A held record is released
once every board still running has sent data past its timestamp. Which boards
to wait for: the enabled boards of the crates' begin-of-run PV snapshots
(``expected``; the receiver's ``--pv-pva``), and any other board from its first
record on. Without that list, boards are known only once they send (an IOC
serves a crate's boards in turn, so a crate's first reply shows one board): then
nothing is released on watermarks before every connection has delivered records
and ``wait_s`` has passed since the first record, so that every board sending
has been seen.

A silent board (disabled mid-run, a slow crate) would hold everything back, so
a record never waits longer than ``wait_s`` (``--merge-wait``): when the oldest
held record has waited that long, everything up to its timestamp is released.
Records arriving afterwards with a timestamp older than the last written one
are written anyway, after, and counted as late (they are not in timestamp
order); late records are not given to the event builder, whose input must be
in order. `close` flushes what is left. Memory is what is held: at most about
``wait_s`` times the data rate.

Work is per reply and vectorised: the held records are a table kept sorted by
timestamp (a stable sort of the held table and the reply's records, ties in
arrival order) over one word buffer that is compacted when it fills; the
released prefix is gathered into one contiguous block and written at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from receiver.geb import Batch

#: Default ``--merge-wait``: longer than the IOC's usual reply cycle and a crate's
#: readout lag (the single-file layout saw records 105 ms out of order), short
#: enough that little is held in memory.
DEFAULT_WAIT_S = 2.0
_DONE = np.iinfo(np.uint64).max
#: Channel id of a type-F error header (almost full, overflow, underflow, read error).
ERROR_HEADER_CHANNEL = 0xF
_INITIAL_WORDS = 1 << 20


class _Held(NamedTuple):
    """Held records, one column per field (numpy copies plain columns several times faster
    than the rows of a structured array: 6 µs against 50 to append 600 rows to 3,300)."""

    ts: np.ndarray  # uint64 timestamp
    start: np.ndarray  # int64: where the record starts in the word buffer
    nwords: np.ndarray  # int64
    arrival: np.ndarray  # float64: when it arrived (monotonic)

    @classmethod
    def empty(cls) -> _Held:
        return cls(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64),
                   np.empty(0, np.float64))

    @property
    def size(self) -> int:
        return self.ts.size

    def split(self, count: int) -> tuple[_Held, _Held]:
        """The first ``count`` records and the rest (views)."""
        return _Held(*(c[:count] for c in self)), _Held(*(c[count:] for c in self))

    def take(self, order: np.ndarray) -> _Held:
        return _Held(*(c[order] for c in self))


@dataclass
class Released:
    """Records released in timestamp order (late ones flagged), contiguous GEB bytes."""

    data: np.ndarray  # uint8
    bounds: np.ndarray  # byte offset of each record, records + 1 entries
    timestamp: np.ndarray
    late: np.ndarray  # bool per record

    def __len__(self) -> int:
        return self.bounds.size - 1


@dataclass
class MergeCounters:
    records: int = 0  # written
    late: int = 0
    released_by_wait: int = 0  # releases forced by --merge-wait
    max_held: int = 0


class Merger:
    """Holds records from every puller and hands them on in timestamp order.

    ``output`` receives each `Released` block (write the merged file, feed the
    event builder); it runs under the merger's lock, so blocks arrive in order.
    An error it raises propagates to whichever thread added or ticked.
    """

    def __init__(self, connections: int, wait_s: float, output: Callable[[Released], None],
                 expected: set[int] | None = None) -> None:
        self.wait_s = wait_s
        self.expected = expected
        self.output = output
        self.counters = MergeCounters()
        self._lock = threading.Lock()
        self._delivered = [False] * connections
        self._watermarks: dict[int, int] = dict.fromkeys(expected or (), 0)
        self._first_arrival: float | None = None
        self._words = np.empty(_INITIAL_WORDS, dtype=np.uint32)
        self._used = 0
        self._held = _Held.empty()  # sorted by timestamp
        self._last_written = -1
        #: Which crate each board came from (for the hits' ``crate`` column).
        self.crate_of_board: dict[int, int] = {}

    # ---------------------------------------------------------------- input

    def add(self, connection: int, batch: Batch, ends: list[int], crate: int | None = None,
            now: float | None = None) -> None:
        """One reply's records (any order) from ``connection`` (of ``crate``, if known);
        ``ends`` the boards whose end-of-run header it held. Writes whatever can be
        released now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(batch):
                self._delivered[connection] = True
                if self._first_arrival is None:
                    self._first_arrival = now
                self._hold(batch, now)
                progress = batch.channel != ERROR_HEADER_CHANNEL
                self._advance(batch.board[progress], batch.timestamp[progress], crate)
            for board in ends:
                self._watermarks[board] = int(_DONE)
            self._release(now)

    def tick(self, now: float | None = None) -> None:
        """Release what has waited ``wait_s`` (called regularly: a silent system adds nothing)."""
        with self._lock:
            self._release(time.monotonic() if now is None else now)

    def close(self) -> None:
        """End of run: write everything still held."""
        with self._lock:
            self._emit(self._held.size)

    @property
    def held(self) -> int:
        return self._held.size

    # ------------------------------------------------------------ internals

    def _hold(self, batch: Batch, now: float) -> None:
        words = batch.data.view(np.uint32)
        self._reserve(words.size)
        base = self._used
        self._words[base : base + words.size] = words
        self._used += words.size
        bounds = batch.bounds // 4
        new = _Held(np.asarray(batch.timestamp, dtype=np.uint64), base + bounds[:-1],
                    np.diff(bounds), np.full(bounds.size - 1, now))
        self._held = held = _merge_sorted(self._held, new)
        self.counters.max_held = max(self.counters.max_held, held.size)

    def _advance(self, board: np.ndarray, timestamp: np.ndarray, crate: int | None) -> None:
        if not board.size:
            return
        if bool((board == board[0]).all()):  # the usual reply: one board's buffer
            boards, highest = [int(board[0])], [int(timestamp.max())]
        else:
            found, inverse = np.unique(board, return_inverse=True)
            most = np.zeros(found.size, dtype=np.uint64)
            np.maximum.at(most, inverse, timestamp.astype(np.uint64))
            boards, highest = found.tolist(), most.tolist()
        for b, ts in zip(boards, highest, strict=True):
            if self._watermarks.get(b, -1) < ts:
                self._watermarks[b] = ts
            if crate is not None:
                self.crate_of_board[b] = crate

    def _release(self, now: float) -> None:
        if not self._held.size:
            return
        held = self._held
        cutoff = -1
        if self._boards_known(now):
            cutoff = min(self._watermarks.values())
        expired = held.arrival <= now - self.wait_s
        forced = bool(expired.any())
        if forced:
            cutoff = max(cutoff, int(held.ts[np.flatnonzero(expired)[-1]]))
        if cutoff < 0:
            return
        count = int(np.searchsorted(held.ts, np.uint64(min(cutoff, int(_DONE))),
                                    side="right"))
        if forced and count:
            self.counters.released_by_wait += 1
        self._emit(count)

    def _boards_known(self, now: float) -> bool:
        """Whether every board that will send is among the watermarks."""
        if self.expected:
            return True
        return (all(self._delivered) and self._first_arrival is not None
                and now - self._first_arrival >= self.wait_s)

    def _emit(self, count: int) -> None:
        """Write the ``count`` oldest held records and drop them from the table."""
        if count == 0:
            return
        released, self._held = self._held.split(count)
        ts, nwords = released.ts, released.nwords
        data = _gather(self._words, released.start, nwords).view(np.uint8)
        bounds = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(nwords * 4, out=bounds[1:])
        late = ts.astype(np.int64) < self._last_written if self._last_written >= 0 else (
            np.zeros(count, dtype=bool))
        self._last_written = max(self._last_written, int(ts.max()))
        if not self._held.size:
            self._used = 0
        self.output(Released(data, bounds, ts, late))
        self.counters.records += count
        self.counters.late += int(np.count_nonzero(late))

    def _reserve(self, words: int) -> None:
        """Room for ``words`` more at the end of the buffer: compact the live records
        (amortised: only when the buffer is full) and grow it if they fill half of it."""
        if self._used + words <= self._words.size:
            return
        held = self._held
        live = int(held.nwords.sum())
        size = self._words.size
        while live + words > size // 2:
            size *= 2
        compacted = np.empty(size, dtype=np.uint32)
        compacted[:live] = _gather(self._words, held.start, held.nwords)
        starts = np.zeros(held.size, dtype=np.int64)
        np.cumsum(held.nwords[:-1], out=starts[1:])
        self._held = held._replace(start=starts)
        self._words, self._used = compacted, live


def _merge_sorted(held: _Held, new: _Held) -> _Held:
    """``held`` (sorted by timestamp) with ``new`` merged in, stably: a new record goes
    after held ones of the same timestamp, and keeps its order among the new ones."""
    stamps = new.ts
    if not bool((stamps[1:] >= stamps[:-1]).all()):  # several boards in one reply
        new = new.take(np.argsort(stamps, kind="stable"))
        stamps = new.ts
    if not held.size or int(stamps[0]) >= int(held.ts[-1]):
        return _Held(*(np.concatenate(pair) for pair in zip(held, new, strict=True)))
    total = held.size + new.size
    into = np.searchsorted(held.ts, stamps, side="right") + np.arange(new.size)
    keep = np.ones(total, dtype=bool)
    keep[into] = False
    columns = []
    for old, added in zip(held, new, strict=True):
        merged = np.empty(total, dtype=old.dtype)
        merged[into] = added
        merged[keep] = old
        columns.append(merged)
    return _Held(*columns)


def _gather(words: np.ndarray, start: np.ndarray, nwords: np.ndarray) -> np.ndarray:
    """The records (``start``, ``nwords``) of ``words`` back to back, in the given order.

    Per record length (a run has one or two: events and type-F headers), the
    records are rows of an overlapping ``(positions, length)`` view of the
    buffer, so one fancy index on rows copies them whole: no index per word.
    """
    if not start.size:
        return np.empty(0, dtype=np.uint32)
    ends = np.cumsum(nwords)
    out = np.empty(int(ends[-1]), dtype=np.uint32)
    first = int(nwords[0])
    if bool((nwords == first).all()):
        out.reshape(-1, first)[:] = _rows(words, first)[start]
        return out
    for length in np.unique(nwords).tolist():
        chosen = np.flatnonzero(nwords == length)
        _rows(out, length, writeable=True)[ends[chosen] - length] = _rows(words, length)[
            start[chosen]]
    return out


def _rows(words: np.ndarray, length: int, writeable: bool = False) -> np.ndarray:
    """Every ``length``-word window of ``words`` as a row (a view, no copy)."""
    return np.lib.stride_tricks.as_strided(
        words, shape=(words.size - length + 1, length), strides=(words.itemsize,) * 2,
        writeable=writeable,
    )

"""What the crate threw away, per card and by reason (the loss ledger).

Data leave the crate either through a receiver or through one of these doors;
each door is counted separately so an operator (and `dgs-run stop`) can tell
a full pool from a corrupt buffer from a receiver that vanished:

- ``MEMORY``: the retention memory was exhausted (nobody took data for long
  enough); outLoop discarded whole incoming buffers, never an end-of-run header.
- ``CHECK``: a fatal check error discarded that buffer (spec 02 §3).
- ``UNREACHABLE``: the listener had closed and nobody was connected, so the
  sender dropped what was queued.
- ``IN_FLIGHT``: replies already handed to the kernel for a classic receiver
  that the sender then had to close (they cannot have arrived).
- ``SUPERSEDED``: the previous run's undelivered data, dropped by this run's
  Start. Kept apart from this run's totals: they belong to the run before.

Stages record into one ledger; the publisher reads snapshots of it.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np

from ioc import packets
from ioc.decoder import NATIVE_MARKER, gather, native_view
from ioc.hardware import CARDS
from ioc.pool import Buffer


class LossReason(enum.Enum):
    """Why data were thrown away; the value is the PV name part (``OL_Lost<value>``)."""

    MEMORY = "Memory"
    CHECK = "Check"
    UNREACHABLE = "Unreachable"
    IN_FLIGHT = "InFlight"
    SUPERSEDED = "Superseded"

    @property
    def this_run(self) -> bool:
        """Counted in the run's own totals (`OL_DataLost<n>`); Superseded is the run before."""
        return self is not LossReason.SUPERSEDED


def count_events(words: np.ndarray) -> int:
    """Events in a span of big-endian words of one board, type-F headers not counted.

    Digitizer events are counted by their markers (one vectorised pass; a trace
    word equal to the marker would count once too often, which is rare and only
    affects a loss figure); master-trigger data are whole 16-word packets.
    """
    if words.size == 0:
        return 0
    if int(words[0]) == packets.TRIGGER_MARKER:
        return words.size // packets.TRIGGER_WORDS
    native = native_view(words)
    starts = np.flatnonzero(native[:-3] == NATIVE_MARKER)
    if starts.size == 0:
        return 0
    types = packets.header_type(gather(native, starts + 3))
    return int(np.count_nonzero(types != packets.HEADER_TYPE_F))


def buffer_events(buf: Buffer, start: int = 0, end: int | None = None) -> int:
    """Events in bytes [start, end) of a buffer: arithmetic when outLoop's walk found
    equal-size packets throughout, a marker count otherwise."""
    end = buf.nbytes if end is None else end
    if buf.is_type_f:
        return 0
    if buf.packet_words:
        return (end - start) // (4 * buf.packet_words)
    return count_events(buf.words[start // 4 : end // 4])


@dataclass(frozen=True)
class LossSnapshot:
    """Bytes, events and buffers lost per reason and card, at one moment."""

    bytes: dict[LossReason, tuple[int, ...]]
    events: dict[LossReason, tuple[int, ...]]
    buffers: dict[LossReason, int]

    def run_bytes_by_card(self) -> tuple[int, ...]:
        """This run's losses per card, all reasons but Superseded (`OL_DataLost<n>`)."""
        return tuple(
            sum(self.bytes[r][card] for r in LossReason if r.this_run) for card in range(CARDS)
        )

    def run_buffers(self, *reasons: LossReason) -> int:
        return sum(self.buffers[r] for r in reasons)


class LossLedger:
    """Thread-safe loss counters; everything but Superseded restarts with each run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {r: [0] * CARDS for r in LossReason}
        self._events = {r: [0] * CARDS for r in LossReason}
        self._buffers = dict.fromkeys(LossReason, 0)

    def reset_run(self) -> None:
        """Run start: zero this run's counters and the superseded ones (set again at once)."""
        with self._lock:
            for reason in LossReason:
                self._bytes[reason] = [0] * CARDS
                self._events[reason] = [0] * CARDS
                self._buffers[reason] = 0

    def add(self, reason: LossReason, card: int, nbytes: int, events: int, buffers: int = 1):
        """Count ``nbytes`` of card ``card`` (``events`` events in them) lost for ``reason``."""
        if not 0 <= card < CARDS or nbytes <= 0:
            return
        with self._lock:
            self._bytes[reason][card] += nbytes
            self._events[reason][card] += events
            self._buffers[reason] += buffers

    def snapshot(self) -> LossSnapshot:
        with self._lock:
            return LossSnapshot(
                bytes={r: tuple(v) for r, v in self._bytes.items()},
                events={r: tuple(v) for r, v in self._events.items()},
                buffers=dict(self._buffers),
            )

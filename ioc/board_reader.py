"""Reading one board for inLoop (spec 02 §2): its polls, faults and buffers.

A poll applies the fault decision order and reads the board only when the
coalescing rule says so (so a trickle of events does not become thousands of
tiny buffers). Overflow, underflow and read errors reset the FIFO; type-F
headers are decided at once (timestamp latched then) and built when a buffer is
free. At Stop a board is read empty, ignoring flow control, and ends with its
end-of-run (0xD) type-F header.

Every buffer taken from qFree here is either queued to qWritten or released
back to qFree on every path, faults included.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ioc import packets
from ioc.hardware import WORD, Board, ReadError
from ioc.pool import Buffer, BufferPool
from ioc.scan_timing import FILL_RATE_DECAY, FILL_SAMPLE_S, read_rule

#: Empty (0xE) and almost-full (0xF) headers: at most one per board per period.
PRESCALE_PERIOD_S = 2.0
#: A trigger read takes at most 256 KiB, in 64 KiB chunks.
TRIGGER_MAX_WORDS = 256 * 1024 // 4
TRIGGER_CHUNK_WORDS = 64 * 1024 // 4
#: After a drain deadline, how long the remaining 0xD headers may wait for buffers.
MARKER_GRACE_S = 0.5
#: Room for the partial event a deep FIFO's read may end with (two longest events).
CARRY_WORDS = 2 * (packets.MAX_PACKET_LENGTH + 2)
#: Waits for a free buffer re-check the (possibly shortened) deadline this often.
_BUFFER_WAIT_SLICE_S = 0.05

#: InLoop4 codes for transfers that did not happen.
TRANSFER_OVERFLOW = -1
TRANSFER_UNDERFLOW = -2
TRANSFER_READ_ERROR = -3


class ReadSettings(Protocol):
    """The part of the configuration that decides when a board is read."""

    read_threshold_bytes: int
    max_latency_s: float
    #: Free buffers a board's visit leaves for the others (it reads a deep FIFO whole).
    min_free_buffers: int


class DrainTimeout(Exception):
    """The drain deadline passed while a board was still being drained."""


def whole_events_words(words: np.ndarray) -> int:
    """Length of the prefix of ``words`` that ends with a whole digitizer event.

    The last event start is sought among the markers of the final CARRY_WORDS
    words; a marker counts as an event start only where the event before it
    ends, so a trace word that happens to equal the marker is not taken for
    one. Data too corrupt to tell are kept whole (the checker will report them).
    """
    total = words.size
    base = max(0, total - CARRY_WORDS)
    starts = (np.flatnonzero(words[base:] == packets.MARKER) + base).tolist()
    ends = {
        start: start + 1 + int(packets.packet_length(int(words[start + 1])))
        for start in starts
        if start + 1 < total
    }
    chained = set(ends.values())
    for start in reversed(starts):
        if start == 0 or start in chained:
            end = ends.get(start, total + 1)
            return end if end <= total else start
    return total


@dataclass
class BoardRun:
    """What inLoop keeps about one enabled board during a run."""

    board: Board
    fifo: int
    package_data: int
    #: Monotonic time up to which the FIFO is known consumed (age origin of unread data).
    clean_at: float
    empty_flag: bool = True
    almost_full_flag: bool = True
    #: The next buffer queued for this board follows a FIFO reset.
    after_reset: bool = False
    #: The last poll found the FIFO empty.
    idle: bool = False
    #: FIFO capacity from the backend (None: unknown), the deepest poll and the last poll time.
    capacity_words: int | None = None
    peak_depth_words: int = 0
    last_poll_at: float = 0.0
    #: The fill-rate reference: words in the FIFO at a poll or reset, when that was,
    #: and the words read since; the fastest recent fill rate seen (None: not yet measured).
    left_words: int = 0
    left_at: float = 0.0
    read_since_left: int = 0
    fill_words_per_s: float | None = None
    #: Type-F headers decided but not yet built for lack of a buffer: (channel, type, ts).
    pending: collections.deque[tuple[int, int, int]] = field(default_factory=collections.deque)
    #: Head of a partial event cut off at the end of the previous buffer (deep FIFOs only).
    carry: np.ndarray = field(default_factory=lambda: np.empty(CARRY_WORDS, dtype=WORD))
    carry_words: int = 0
    #: Fault log throttling, per kind of fault: quiet until, and lines held back.
    log_quiet_until: dict[str, float] = field(default_factory=dict)
    log_held_back: dict[str, int] = field(default_factory=dict)

    @property
    def card(self) -> int:
        return self.board.identity.card

    def note_fill(self, depth_words: int, polled_at: float) -> None:
        """Update the fill-rate estimate with the depth found at this poll."""
        span = polled_at - self.left_at
        if span < FILL_SAMPLE_S:
            return
        rate = (depth_words + self.read_since_left - self.left_words) / span
        if self.fill_words_per_s is not None:
            rate = max(rate, self.fill_words_per_s * FILL_RATE_DECAY)
        self.fill_words_per_s = rate
        self.restart_fill(polled_at, depth_words)

    def restart_fill(self, at: float, depth_words: int = 0) -> None:
        """Measure the fill rate from here (a poll, a run start or a FIFO reset)."""
        self.left_words, self.left_at, self.read_since_left = depth_words, at, 0

    def fill_time_s(self) -> float | None:
        """Seconds an empty FIFO takes to fill at the estimated rate (inf: it does not
        fill or its size is unknown; None: not measured yet)."""
        if self.fill_words_per_s is None:
            return None
        if not self.capacity_words or self.fill_words_per_s <= 0:
            return math.inf
        return self.capacity_words / self.fill_words_per_s

    @property
    def is_trigger(self) -> bool:
        return self.board.identity.kind.is_trigger


def _read_exact(reader: BoardRun, out: np.ndarray, nwords: int) -> None:
    """One transfer; a short one is as bad as a failed one (the FIFO position is unknown)."""
    if nwords and reader.board.read(out, nwords, reader.fifo) != nwords:
        raise ReadError(f"short read of {nwords} words")


class BoardReader:
    """Polls, reads and drains inLoop's boards one at a time, and counts what it did.

    The run counters are guarded by ``lock``, inLoop's condition, so that its
    statistics are one consistent snapshot.
    """

    def __init__(
        self,
        pool: BufferPool,
        config: ReadSettings,
        lock: threading.Condition,
        log: logging.Logger,
    ) -> None:
        self._pool = pool
        self._config = config
        self._cond = lock
        self._log = log
        self.zero_counters()

    def zero_counters(self) -> None:
        """Start a run's counters afresh (under ``lock`` once inLoop's thread runs)."""
        self.bytes_read = 0
        self.type_f_built = 0
        self.polls = 0
        self.last_transfer = 0
        self.read_errors = 0
        #: Longest wait between two polls of one enabled board in Scan this run.
        self.scan_gap_max_s = 0.0

    # ---------------------------------------------------------------- scan

    def scan_board(self, reader: BoardRun) -> None:
        """One poll of one board, in the decision order of spec 02 §2."""
        reader.idle = False
        if not self._flush_pending(reader, None):
            return
        board = reader.board
        polled_at = time.monotonic()
        since_last_poll = polled_at - reader.last_poll_at if reader.last_poll_at else 0.0
        if since_last_poll > self.scan_gap_max_s:
            self.scan_gap_max_s = since_last_poll
        reader.last_poll_at = polled_at
        status = board.status(reader.fifo)
        reader.note_fill(status.depth_words, polled_at)
        if status.depth_words > reader.peak_depth_words:
            reader.peak_depth_words = status.depth_words
        if status.full:  # it refused events: 100 %, whatever room a whole event lacked
            reader.peak_depth_words = reader.capacity_words or status.depth_words
            self._overflow(reader, reenable=True)
            return
        if status.empty and status.depth_words != 0:
            self._underflow(reader, reenable=True)
            return
        if status.depth_words == 0:
            reader.idle = True
            reader.clean_at = polled_at
            self._count_poll()
            if reader.empty_flag:
                self._announce_empty(reader)
            return
        if status.almost_full and reader.almost_full_flag:
            reader.almost_full_flag = False
            self._fault_log(reader, "FIFO almost full")
            self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW)
            if not self._flush_pending(reader, None):
                self._count_poll()
                return
        threshold, latency = read_rule(
            self._pool.under_pressure(),
            self._config.read_threshold_bytes,
            self._config.max_latency_s,
            reader.capacity_words,
            reader.fill_time_s(),
        )
        due = (
            (status.depth_words + reader.carry_words) * 4 >= threshold
            or polled_at - reader.clean_at >= latency
            or status.almost_full
        )
        if not due:
            self._count_poll()
            return
        # A FIFO deeper than a buffer (a simulated one made bigger) is read whole in this
        # visit, one buffer after another, while other boards keep their spare buffers:
        # one buffer per pass would cap a board at 1 MiB per scan delay (about 50 MB/s
        # once the pool's flow control waits 20 ms), below what such a board can offer.
        unread = status.depth_words
        while unread > 0:
            buf = self._pool.take_free()
            if buf is None:
                break
            words = self._read_into(reader, buf, unread, polled_at, reenable=True)
            if words is None:
                return
            unread -= words
            if words == 0 or len(self._pool.q_free) <= self._config.min_free_buffers:
                break
        self._count_poll()

    def _count_poll(self) -> None:
        with self._cond:
            self.polls += 1

    # ------------------------------------------------------------- reading

    def _read_into(
        self, reader: BoardRun, buf: Buffer, depth_words: int, polled_at: float, reenable: bool
    ) -> int | None:
        """Read the board's unread data into ``buf`` and queue it: the words taken from
        the FIFO, None on a read error.

        ``reenable``: after a read error, turn master logic back on (Scan, not Stopping).
        """
        try:
            if reader.is_trigger:
                fifo_words, kept_words = self._read_trigger(reader, buf, depth_words)
            else:
                fifo_words, kept_words = self._read_digitizer(reader, buf, depth_words)
        except ReadError as error:
            self._pool.release(buf)
            with self._cond:
                self.last_transfer = TRANSFER_READ_ERROR
                self.read_errors += 1
            self._fault_log(reader, "read error", f" ({error}), FIFO reset")
            self._reset(reader, reenable)
            return None
        except BaseException:
            self._pool.release(buf)
            raise
        if kept_words:
            buf.nbytes = kept_words * 4
            self._queue(reader, buf, is_type_f=False)
        else:
            self._pool.release(buf)
        reader.read_since_left += fifo_words
        if fifo_words == depth_words:
            reader.clean_at = polled_at
        if fifo_words:
            with self._cond:
                self.bytes_read += fifo_words * 4
                self.last_transfer = fifo_words * 4
        return fifo_words

    def _read_trigger(self, reader: BoardRun, buf: Buffer, depth_words: int) -> tuple[int, int]:
        """Whole 16-word packets, at most 256 KiB, in 64 KiB chunks into one buffer."""
        limit = min(depth_words, TRIGGER_MAX_WORDS, len(buf.words))
        nwords = limit - limit % packets.TRIGGER_WORDS
        position = 0
        while position < nwords:
            chunk = min(TRIGGER_CHUNK_WORDS, nwords - position)
            _read_exact(reader, buf.words[position : position + chunk], chunk)
            position += chunk
        return nwords, nwords

    def _read_digitizer(self, reader: BoardRun, buf: Buffer, depth_words: int) -> tuple[int, int]:
        """The whole depth when it fits the buffer (it always does with a 1 MiB FIFO).

        A deeper FIFO (a simulator configured bigger) is read one buffer at a
        time: the buffer is cut after its last whole event and the partial event
        behind the cut starts the board's next buffer. Returns (words read from
        the FIFO, words kept in ``buf``).
        """
        carried = reader.carry_words
        buf.words[:carried] = reader.carry[:carried]
        nwords = min(depth_words, len(buf.words) - carried)
        _read_exact(reader, buf.words[carried : carried + nwords], nwords)
        total = carried + nwords
        kept = total if nwords == depth_words else whole_events_words(buf.words[:total])
        reader.carry_words = total - kept
        reader.carry[: reader.carry_words] = buf.words[kept:total]
        return nwords, kept

    # ------------------------------------------------------------ faults

    def _overflow(self, reader: BoardRun, reenable: bool) -> None:
        self._fault_log(reader, "FIFO full", " (overflow), FIFO reset")
        with self._cond:
            self.last_transfer = TRANSFER_OVERFLOW
        self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW)
        self._flush_pending(reader, None)
        self._reset(reader, reenable)

    def _underflow(self, reader: BoardRun, reenable: bool) -> None:
        self._fault_log(reader, "FIFO underflow", ", FIFO reset")
        with self._cond:
            self.last_transfer = TRANSFER_UNDERFLOW
        self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_UNDERFLOW)
        self._flush_pending(reader, None)
        self._reset(reader, reenable)

    def _fault_log(self, reader: BoardRun, kind: str, detail: str = "") -> None:
        """One warning per fault, but per board and kind at most one per prescale period.

        A board overflowing continuously would otherwise write hundreds of lines
        a second; the ones held back are counted in the next line.
        """
        now = time.monotonic()
        if now < reader.log_quiet_until.get(kind, 0.0):
            reader.log_held_back[kind] = reader.log_held_back.get(kind, 0) + 1
            return
        reader.log_quiet_until[kind] = now + PRESCALE_PERIOD_S
        held_back = reader.log_held_back.pop(kind, 0)
        more = f" (+{held_back} more since the last report)" if held_back else ""
        self._log.warning("inLoop: card %d: %s%s%s", reader.card, kind, detail, more)

    def _reset(self, reader: BoardRun, reenable: bool) -> None:
        reader.board.reset_fifo(reader.fifo)
        reader.carry_words = 0
        reader.after_reset = True
        reader.clean_at = time.monotonic()
        reader.restart_fill(reader.clean_at)
        if reenable:
            reader.board.set_master_logic(True)

    # ------------------------------------------------------------- type F

    def _intend_type_f(self, reader: BoardRun, channel: int, event_type: int) -> None:
        """Decide a type-F header now (timestamp latched now); built when a buffer is free."""
        timestamp = reader.board.latch_timestamp()
        reader.pending.append((channel, event_type, timestamp))

    def _announce_empty(self, reader: BoardRun) -> None:
        """The "empty" (0xE) header, stamped only if the FIFO is still empty after the latch.

        Events that came in between the poll and the latch are older than the stamp;
        sent after the header, they would follow a board's sign of progress past them
        (an online merge writes them late). Then the header waits for the next empty
        poll (its flag stays set) and the events go out first.
        """
        timestamp = reader.board.latch_timestamp()
        if reader.board.status(reader.fifo).depth_words:
            return
        reader.empty_flag = False
        reader.pending.append((packets.CH_EMPTY, packets.EVENT_TYPE_NONE, timestamp))
        self._flush_pending(reader, None)

    def _flush_pending(self, reader: BoardRun, until: Callable[[], float] | None) -> bool:
        """Build the board's pending type-F headers; False if a buffer was missing.

        ``until`` None takes only buffers free now (Scan); else waits up to the
        deadline it returns (re-read while waiting: a shutdown may shorten it).
        """
        while reader.pending:
            buf = self._pool.take_free() if until is None else self._take_free_until(until)
            if buf is None:
                return False
            channel, event_type, timestamp = reader.pending.popleft()
            buf.words[: packets.TYPE_F_WORDS] = packets.type_f_words(
                reader.board.identity.slot, reader.package_data, channel, event_type, timestamp
            )
            buf.nbytes = packets.TYPE_F_WORDS * 4
            self._queue(reader, buf, is_type_f=True)
            with self._cond:
                self.type_f_built += 1
        return True

    def _queue(self, reader: BoardRun, buf: Buffer, is_type_f: bool) -> None:
        identity = reader.board.identity
        buf.card = identity.card
        buf.board_type = identity.board_type
        buf.fifo = reader.fifo if reader.is_trigger else -1
        buf.is_type_f = is_type_f
        buf.after_reset = reader.after_reset
        reader.after_reset = False
        self._pool.q_written.put(buf)

    def _take_free_until(self, until: Callable[[], float]) -> Buffer | None:
        """Wait for a free buffer until the deadline ``until`` returns."""
        while True:
            remaining = until() - time.monotonic()
            if remaining <= 0:
                return None
            buf = self._pool.take_free(timeout=min(remaining, _BUFFER_WAIT_SLICE_S))
            if buf is not None:
                return buf

    # ------------------------------------------------------------ stopping

    def drain_board(self, reader: BoardRun, until: Callable[[], float]) -> None:
        """Read the board's FIFO empty, ignoring flow control; raise DrainTimeout if late.

        ``until`` returns the drain deadline (re-read: a shutdown may shorten it).
        """
        if not self._flush_pending(reader, until):
            raise DrainTimeout
        while True:
            if time.monotonic() >= until():
                raise DrainTimeout
            polled_at = time.monotonic()
            status = reader.board.status(reader.fifo)
            if status.full:
                self._overflow(reader, reenable=False)
                continue
            if status.empty and status.depth_words != 0:
                self._underflow(reader, reenable=False)
                continue
            if status.depth_words == 0:
                self._count_poll()
                return
            if status.almost_full and reader.almost_full_flag:
                reader.almost_full_flag = False
                self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW)
                if not self._flush_pending(reader, until):
                    raise DrainTimeout
            buf = self._take_free_until(until)
            if buf is None:
                raise DrainTimeout
            if self._read_into(reader, buf, status.depth_words, polled_at, reenable=False) is None:
                return

    def queue_end_of_run(self, reader: BoardRun, until: Callable[[], float]) -> bool:
        """Queue the board's end-of-run (0xD) header; False if no buffer came in time."""
        self._intend_type_f(reader, packets.CH_END_OF_RUN, packets.EVENT_TYPE_NONE)
        if self._flush_pending(reader, until):
            return True
        reader.pending.pop()
        return False

    def finish_after_timeout(self, remaining: list[BoardRun], undrained: list[BoardRun]) -> None:
        """Deadline passed: clear what is left unread and still give each board its 0xD."""
        self._log.warning(
            "inLoop: drain timeout, FIFOs of cards %s reset",
            [reader.card for reader in undrained],
        )
        for reader in undrained:
            self._reset(reader, reenable=False)
        grace_end = time.monotonic() + MARKER_GRACE_S

        def grace_until() -> float:
            return grace_end

        for reader in remaining:
            if not self._flush_pending(reader, grace_until):
                self._log.error(
                    "inLoop: card %d: %d type-F headers dropped (no free buffer)",
                    reader.card,
                    len(reader.pending),
                )
                reader.pending.clear()
            if not self.queue_end_of_run(reader, grace_until):
                self._log.error(
                    "inLoop: card %d: end-of-run header lost (no free buffer)", reader.card
                )

"""outLoop, the checker thread (spec 02 §3).

Every 50 ms (sooner when inLoop finds qFree running low, see
`ioc.pool.LOW_FREE_SHARE`) it takes the whole backlog of qWritten as one batch, checks
digitizer buffers event by event (`ioc.checker`), keeps per-card statistics,
traces and per-channel spectra (`ioc.spectra`, from the packets the check
walked), and passes buffers to qSender (Save) or back to qFree (No Save).
Every buffer is checked, whatever the sender is doing, so the trace and the
error counts stay live. With Save, `ioc.retention` decides what qSender can
hold: the original's 100-buffer bypass is replaced by a memory budget; past
it whole buffers are discarded (never an end-of-run header) and counted as
lost for lack of memory. At the end of a run outLoop flushes qWritten once
more and reports that the crate is Stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ioc.checker import SHALLOW_EVENTS, Checker
from ioc.losses import LossLedger, LossReason, buffer_events
from ioc.packets import HEADER_WORDS
from ioc.pool import BUFFER_BYTES, Buffer, BufferPool, Owner
from ioc.pvs import CARDS
from ioc.realtime import name_os_thread
from ioc.retention import Retention, is_end_of_run
from ioc.spectra import Spectra

BATCH_PERIOD_S = 0.050
STATS_PERIOD_S = 0.5
TRIGGER_BOARD_TYPE = 4
#: Default memory budget of undelivered data (see `ioc.config.SenderConfig.retain_mib`).
DEFAULT_RETAIN_BYTES = 184 * BUFFER_BYTES

log = logging.getLogger("dgs.outloop")


@dataclass
class CheckSwitches:
    """The three check-enable PVs, read live for every buffer."""

    header: bool = True
    timestamp: bool = True
    deep: bool = True


@dataclass(frozen=True)
class OutLoopStats:
    """What outLoop publishes every 0.5 s."""

    rate_kbps: tuple[float, ...]
    bytes_by_card: tuple[int, ...]
    lost_bytes_by_card: tuple[int, ...]
    errors_by_card: tuple[int, ...]
    first_errors: tuple[tuple[int, int, int, int] | None, ...]
    bufs_written: int
    fbufs_written: int
    bufs_lost: int
    send_rate_kbps: float
    bytes_to_sender: int


@dataclass
class _RunCounters:
    bytes_by_card: list[int] = field(default_factory=lambda: [0] * CARDS)
    lost_bytes_by_card: list[int] = field(default_factory=lambda: [0] * CARDS)
    errors_by_card: list[int] = field(default_factory=lambda: [0] * CARDS)
    first_errors: list[tuple[int, int, int, int] | None] = field(
        default_factory=lambda: [None] * CARDS
    )
    bufs_written: int = 0
    fbufs_written: int = 0
    bufs_lost: int = 0
    bytes_to_sender: int = 0


class OutLoop:
    """The checker stage between qWritten and qSender."""

    def __init__(
        self,
        pool: BufferPool,
        checker: Checker | None = None,
        *,
        on_flushed: Callable[[], None] | None = None,
        losses: LossLedger | None = None,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
        batch_period_s: float = BATCH_PERIOD_S,
    ) -> None:
        self.pool = pool
        self._batch_period_s = batch_period_s
        self.checker = checker or Checker(CARDS)
        self.losses = losses or LossLedger()
        self.retention = Retention(pool, retain_bytes)
        self.switches = CheckSwitches()
        #: SaveData, read live for every batch.
        self.save = False
        self._on_flushed = on_flushed
        #: Called with every buffer that passed its check (the sampling tap; never waits).
        self.tap: Callable[[Buffer], None] | None = None
        self._lock = threading.Lock()
        self._counters = _RunCounters()
        self._running = False
        self._flush_requested = threading.Event()
        self._stop = threading.Event()
        self._traces: dict[tuple[int, int], np.ndarray] = {}
        #: Live per-channel spectra and counts of the checked events (ioc.spectra).
        self.spectra = Spectra(CARDS)
        self._rates = [0.0] * CARDS
        self._send_rate = 0.0
        #: Bumped by reset_run: the statistics thread restarts its rate base with the counters.
        self._run_serial = 0
        self._thread = threading.Thread(target=self._run, name="outLoop", daemon=True)

    # Control, called by run control.

    def start(self) -> None:
        self._thread.start()

    def reset_run(self) -> None:
        """Run start: zero the statistics and forget timestamps and traces."""
        with self._lock:
            self._counters = _RunCounters()
            self._traces.clear()
            self.checker.forget_all()
            self.spectra.reset()
            self._rates = [0.0] * CARDS
            self._send_rate = 0.0
            self._running = True
            self._run_serial += 1
            self._flush_requested.clear()

    def request_flush(self) -> None:
        """inLoop finished its drain: flush qWritten once more, then report Stopped."""
        self._flush_requested.set()

    def shutdown(self) -> None:
        self._stop.set()
        self.pool.running_low.set()  # ends the wait for the next batch
        self._thread.join(timeout=2.0)

    # Observation.

    def stats(self) -> OutLoopStats:
        """Counters as they are now; rates as of the last 0.5-s update."""
        with self._lock:
            return self._snapshot()

    def trace_words(self, card: int, channel: int) -> np.ndarray | None:
        """The trace words (14..N) of the last captured event of (card, channel)."""
        with self._lock:
            words = self._traces.get((card, channel))
            return None if words is None else words.copy()

    # The thread.

    def _run(self) -> None:
        name_os_thread("outLoop")
        last_stats = time.monotonic()
        last_bytes_to_sender = 0
        last_bytes = [0] * CARDS
        rate_serial = self._run_serial
        next_batch = time.monotonic() + self._batch_period_s
        while not self._stop.is_set():
            # A fixed 50 ms cadence (the time spent checking does not stretch the period),
            # or at once when inLoop runs low on free buffers: in a full crate the buffers
            # it needs come back only through a batch (discarded, packed or sent).
            self.pool.running_low.wait(max(0.0, next_batch - time.monotonic()))
            self.pool.running_low.clear()
            next_batch = max(next_batch, time.monotonic()) + self._batch_period_s
            self.process_batch()
            if self._flush_requested.is_set():
                self._flush_requested.clear()
                self.process_batch()
                with self._lock:
                    self._running = False
                if self._on_flushed is not None:
                    self._on_flushed()
            now = time.monotonic()
            dt = now - last_stats
            if dt >= STATS_PERIOD_S:
                with self._lock:
                    c = self._counters
                    if rate_serial != self._run_serial:  # counters were zeroed: so is the base
                        rate_serial = self._run_serial
                        last_bytes, last_bytes_to_sender = [0] * CARDS, 0
                    for card in range(CARDS):
                        sample = (c.bytes_by_card[card] - last_bytes[card]) / dt / 1000.0
                        rate = self._rates[card]
                        self._rates[card] = rate - rate / 5 + sample / 5 if self._running else 0.0
                    sent = c.bytes_to_sender - last_bytes_to_sender
                    self._send_rate = sent / dt / 1000.0 if self._running else 0.0
                    last_bytes = list(c.bytes_by_card)
                    last_bytes_to_sender = c.bytes_to_sender
                last_stats = now

    def process_batch(self) -> int:
        """Take the whole backlog of qWritten and route it; returns the batch size."""
        batch = self.pool.q_written.get_all(Owner.OUTLOOP)
        if not batch:
            return 0
        save = self.save
        to_free: list[Buffer] = []
        with self._lock:
            c = self._counters
            c.bufs_written += len(batch)
            for buf in batch:
                if 0 <= buf.card < CARDS:
                    c.bytes_by_card[buf.card] += buf.nbytes
            seen_channels: set[tuple[int, int]] = set()
            for buf in batch:
                checked = self._check(buf, c, seen_channels)
                if checked and self.tap is not None:
                    self.tap(buf)
                if not checked or not save:
                    to_free.append(buf)
                elif self.retention.exhausted(buf) and not is_end_of_run(buf):
                    self._lose(buf, c, LossReason.MEMORY)
                    to_free.append(buf)
                else:
                    # Each buffer goes on as soon as it is checked: the sender need not
                    # wait for the whole batch, and the pool gets it back sooner.
                    c.bytes_to_sender += buf.nbytes
                    if self.retention.queue(buf):
                        to_free.append(buf)
        self.pool.release_many(to_free)
        return len(batch)

    def _lose(self, buf: Buffer, c: _RunCounters, reason: LossReason) -> None:
        """Count a discarded buffer: per card (bytes, events) and, for memory, in buffers."""
        if reason is LossReason.MEMORY:
            c.bufs_lost += 1
        if 0 <= buf.card < CARDS:
            c.lost_bytes_by_card[buf.card] += buf.nbytes
        self.losses.add(reason, buf.card, buf.nbytes, buffer_events(buf))

    def _check(self, buf: Buffer, c: _RunCounters, seen: set[tuple[int, int]]) -> bool:
        """Check one buffer; False if a fatal error discards it."""
        card = buf.card
        if buf.is_type_f:
            c.fbufs_written += 1
        if buf.after_reset and 0 <= card < CARDS:
            self.checker.forget(card)
        if buf.board_type == TRIGGER_BOARD_TYPE and not buf.is_type_f:
            return True
        switches = self.switches
        if not switches.header or not 0 <= card < CARDS:
            return True
        words = buf.payload_words()
        result = self.checker.check(
            words,
            card,
            timestamps=switches.timestamp,
            max_events=None if switches.deep else SHALLOW_EVENTS,
            histogram=self.spectra.table(card),
        )
        self.spectra.added(card, result.counted)
        if result.errors:
            c.errors_by_card[card] += len(result.errors)
            if c.first_errors[card] is None:
                c.first_errors[card] = result.errors[0].record()
        if result.fatal:
            self._lose(buf, c, LossReason.CHECK)
            return False
        buf.packet_words = result.packet_words
        for channel, (offset, length) in result.first_event_by_channel.items():
            if (card, channel) not in seen:
                seen.add((card, channel))
                self._traces[(card, channel)] = words[
                    offset + HEADER_WORDS : offset + length + 1
                ].copy()
        return True

    def _snapshot(self) -> OutLoopStats:
        c = self._counters
        return OutLoopStats(
            rate_kbps=tuple(self._rates),
            bytes_by_card=tuple(c.bytes_by_card),
            lost_bytes_by_card=tuple(c.lost_bytes_by_card),
            errors_by_card=tuple(c.errors_by_card),
            first_errors=tuple(c.first_errors),
            bufs_written=c.bufs_written,
            fbufs_written=c.fbufs_written,
            bufs_lost=c.bufs_lost,
            send_rate_kbps=self._send_rate,
            bytes_to_sender=c.bytes_to_sender,
        )

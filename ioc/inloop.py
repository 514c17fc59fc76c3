"""inLoop: the reader thread that moves FIFO data into buffers (spec 02 §2).

One thread runs the state machine Idle -> Start -> (NoBoards | Scan) -> Stopping
-> Idle. In Scan it polls every enabled board once per pass in card order,
applies the fault decision order, reads a board only when the coalescing rule
says so (so a trickle of events does not become thousands of tiny buffers),
then waits the flow-control scan delay. Stopping drains every enabled board and
then queues exactly one end-of-run (0xD) type-F header per board, after every
board's last data.

Every buffer inLoop takes from qFree is either queued to qWritten or released
back to qFree on every path, faults included.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ioc import packets
from ioc.hardware import WORD, Board, Crate, ReadError
from ioc.pool import POOL_SIZE, Buffer, BufferPool, Owner
from ioc.realtime import (
    RealtimeState,
    enter_realtime,
    name_os_thread,
    raise_other_threads,
    switch_interval,
)

#: Shortest scan delay, reached with at least 160 of 200 buffers free.
SCAN_DELAY_MIN_S = 0.001
#: Scan delay when every board was empty in the pass: polling idle FIFOs every
#: 1 ms costs about 4 % of a core for nothing (P6 idle: 5-6.5 % at 1 ms,
#: 3.0-5.3 % at 5 ms, 3.7-4.3 % at 10 ms). The first event after a quiet spell
#: waits at most this long to be seen; reads are coalesced over 20 ms anyway.
IDLE_SCAN_DELAY_S = 0.010
#: Reads while the pool is low (see `InLoop._read_rule`): half a physical FIFO, or
#: one outLoop batch period, whichever comes first.
PRESSURE_READ_BYTES = 512 * 1024
PRESSURE_LATENCY_S = 0.050
#: The wait after a pass stays within this share of the shortest time any board's
#: FIFO takes to fill at the rate it has been filling: the pool's flow control may
#: ask up to max_latency_s, and a pass the host delays adds to it. With a physical
#: 1 MiB FIFO at 22.6 MB/s (46 ms to fill) the wait stays under 11.5 ms.
FILL_SHARE = 0.25
#: The fill-rate estimate falls by this factor at each poll: a burst is remembered
#: for a few dozen polls, a rate that has dropped is not held for the whole run.
FILL_RATE_DECAY = 0.95
#: A fill rate is measured over at least this long (shorter spans see the boards'
#: bursts, not their rate); until a board's first measure, waits are this long at most.
FILL_SAMPLE_S = 0.005
#: Empty (0xE) and almost-full (0xF) headers: at most one per board per period.
PRESCALE_PERIOD_S = 2.0
#: A trigger read takes at most 256 KiB, in 64 KiB chunks.
TRIGGER_MAX_WORDS = 256 * 1024 // 4
TRIGGER_CHUNK_WORDS = 64 * 1024 // 4
#: BoardType PVs exist for slots 1..7.
BOARD_SLOTS = 7
#: After a drain deadline, how long the remaining 0xD headers may wait for buffers.
MARKER_GRACE_S = 0.5
#: Room for the partial event a deep FIFO's read may end with (two longest events).
CARRY_WORDS = 2 * (packets.MAX_PACKET_LENGTH + 2)
#: Waits for a free buffer re-check the (possibly shortened) deadline this often.
_BUFFER_WAIT_SLICE_S = 0.05


class InLoopSettings(Protocol):
    """The part of the configuration inLoop reads (ioc.config.InLoopConfig)."""

    read_threshold_bytes: int
    max_latency_s: float
    drain_timeout_s: float
    min_free_buffers: int
    realtime_priority: int
    run_switch_interval_s: float


@dataclass(frozen=True)
class BoardSetup:
    """One board's run set-up, sampled from the PVs at run start only."""

    enabled: bool
    fifo_num: int
    package_data: int


class InLoopState(enum.Enum):
    """The reader's states (spec 02 §2); the lead maps them to _CV_State."""

    IDLE = "Idle"
    START = "Start"
    NO_BOARDS = "NoBoards"
    SCAN = "Scan"
    STOPPING = "Stopping"


#: States in which a run's boards are enabled (or known to be none).
_READING_STATES = frozenset({InLoopState.NO_BOARDS, InLoopState.SCAN, InLoopState.STOPPING})

@dataclass(frozen=True)
class InLoopStats:
    """A consistent snapshot of inLoop's run statistics (spec 02 §2)."""

    running: bool
    state: InLoopState
    mib_read: int
    type_f_built: int
    polls: int
    last_transfer: int
    read_errors: int
    bytes_read: int
    run_serial: int
    #: Longest wait between two polls of one enabled board in Scan this run.
    scan_gap_max_ms: float
    #: Highest FIFO fill a poll saw this run, by board name (0 for boards not enabled).
    fifo_peak_percent: dict[str, float]
    #: Whether the thread reads under the real-time policy (`ioc.realtime`).
    realtime: RealtimeState


#: InLoop4 codes for transfers that did not happen.
TRANSFER_OVERFLOW = -1
TRANSFER_UNDERFLOW = -2
TRANSFER_READ_ERROR = -3


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


def scan_delay(free: int, total: int = POOL_SIZE, longest: float = 0.020) -> float:
    """The flow-control wait after each pass: grows as the pool fills up, but never
    past ``longest`` (the maximum read latency).

    The original's formula alone waits up to 0.45 s; a physical 1 MiB FIFO at
    2000 events/s per channel fills in about 0.1 s, so that wait overflowed
    FIFOs while most of the retention memory was still free. Fewer free buffers
    now make reads larger, not rarer than every ``longest`` seconds.
    """
    used = total - free
    return min(longest, max(SCAN_DELAY_MIN_S, 0.300 * (used - 40) / 100))


class _Command(enum.Enum):
    START = "start"
    STOP = "stop"


def _read_exact(reader: _BoardRun, out: np.ndarray, nwords: int) -> None:
    """One transfer; a short one is as bad as a failed one (the FIFO position is unknown)."""
    if nwords and reader.board.read(out, nwords, reader.fifo) != nwords:
        raise ReadError(f"short read of {nwords} words")


class _DrainTimeout(Exception):
    """The drain deadline passed while a board was still being drained."""


@dataclass
class _BoardRun:
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


class InLoop:
    """The reader thread; the lead drives it with request_start/request_stop."""

    def __init__(
        self,
        crate: Crate,
        pool: BufferPool,
        config: InLoopSettings,
        sample_setup: Callable[[], dict[int, BoardSetup]],
        log: logging.Logger | None = None,
        on_state: Callable[[InLoopState], None] | None = None,
    ) -> None:
        self._crate = crate
        self._pool = pool
        self._config = config
        self._sample_setup = sample_setup
        self._log = log or logging.getLogger("ioc.inloop")
        self._on_state = on_state
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._commands: collections.deque[_Command] = collections.deque()
        self._shutdown_deadline: float | None = None
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._state = InLoopState.IDLE
        self._running = False
        self._run_serial = 0
        self._run_number: int | None = None
        self._zero_counters()
        self._board_types = self._read_board_types()
        self._enabled: frozenset[int] = frozenset()
        self._readers: list[_BoardRun] = []
        self._realtime = RealtimeState.OFF

    # ----------------------------------------------------------------- API

    def start(self) -> None:
        """Start the thread; it waits in Idle for a Start."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="inLoop", daemon=True)
        self._thread.start()

    def request_start(self, run_number: int | None = None) -> None:
        """StartStop = Start; while Stopping it takes effect when the drain completes.

        ``run_number`` (`Online_CS_RunNumber` at Start) only names the run in the log.
        """
        with self._cond:
            self._run_number = run_number
        self._command(_Command.START)

    def request_stop(self) -> None:
        """StartStop = Stop."""
        self._command(_Command.STOP)

    def shutdown(self, drain_timeout: float = 3.0) -> None:
        """Stop as for Stop with the drain bounded by ``drain_timeout``, end the thread."""
        with self._cond:
            if self._shutdown_deadline is None:
                self._shutdown_deadline = time.monotonic() + drain_timeout
            self._cond.notify_all()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(drain_timeout + MARKER_GRACE_S + 1.0)

    def stats(self) -> InLoopStats:
        with self._cond:
            return InLoopStats(
                running=self._running,
                state=self._state,
                mib_read=self._bytes_read // (1 << 20),
                type_f_built=self._type_f_built,
                polls=self._polls,
                last_transfer=self._last_transfer,
                read_errors=self._read_errors,
                bytes_read=self._bytes_read,
                run_serial=self._run_serial,
                scan_gap_max_ms=self._scan_gap_max_s * 1000.0,
                fifo_peak_percent=self._fifo_peaks(),
                realtime=self._realtime,
            )

    def _fifo_peaks(self) -> dict[str, float]:
        peaks = {board.identity.name: 0.0 for board in self._crate.boards}
        for reader in self._readers:
            if reader.capacity_words:
                fill = 100.0 * reader.peak_depth_words / reader.capacity_words
                peaks[reader.board.identity.name] = min(100.0, fill)
        return peaks

    def board_types_by_slot(self) -> tuple[int, ...]:
        """BoardType of slots 1..7 (0 where empty), as published at Idle entry."""
        with self._cond:
            return self._board_types

    def enabled_cards(self) -> frozenset[int]:
        """Cards enabled at the last run start."""
        with self._cond:
            return self._enabled

    def wait_reading(self, timeout: float) -> bool:
        """Wait until the Start asked for has its boards enabled and read (or has ended).

        Run control publishes Running only then, so a client that sees Running
        can act on the run's boards (inject a fault, read the enabled set).
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: _Command.START not in self._commands
                and (not self._running or self._state in _READING_STATES),
                timeout,
            )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run is active or about to start; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._running and _Command.START not in self._commands, timeout
            )

    # ------------------------------------------------------ thread control

    def _command(self, command: _Command) -> None:
        with self._cond:
            if not self._commands or self._commands[-1] is not command:
                self._commands.append(command)
            self._cond.notify_all()
        self._wake.set()

    def _main(self) -> None:
        name_os_thread(self._thread.name if self._thread else "inLoop")
        realtime = enter_realtime(self._config.realtime_priority, self._log)
        if realtime is RealtimeState.ON:
            raise_other_threads(self._log)
        with self._cond:
            self._realtime = realtime
        self._enter_idle()
        while self._wait_for_start():
            try:
                with switch_interval(self._config.run_switch_interval_s):
                    self._run()
            except Exception:
                self._log.exception("inLoop: run aborted by an unexpected error")
                self._all_master_logic_off()
            self._enter_idle()

    def _wait_for_start(self) -> bool:
        """Block in Idle until a Start (True) or a shutdown (False)."""
        with self._cond:
            while True:
                if self._shutdown_deadline is not None:
                    return False
                while self._commands:
                    if self._commands.popleft() is _Command.START:
                        self._zero_counters()
                        self._readers = []
                        self._running = True
                        self._run_serial += 1
                        return True
                self._cond.wait()

    def _stop_requested(self) -> bool:
        """Consume commands up to the first Stop; a later Start stays queued."""
        with self._cond:
            if self._shutdown_deadline is not None:
                return True
            while self._commands:
                if self._commands.popleft() is _Command.STOP:
                    return True
            return False

    def _set_state(self, state: InLoopState) -> None:
        with self._cond:
            if state is self._state:
                return
            self._state = state
            self._cond.notify_all()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                self._log.exception("inLoop: state callback failed")

    def _enter_idle(self) -> None:
        board_types = self._read_board_types()
        with self._cond:
            self._running = False
            self._board_types = board_types
        self._set_state(InLoopState.IDLE)

    def _read_board_types(self) -> tuple[int, ...]:
        types = [0] * BOARD_SLOTS
        for board in self._crate.boards:
            slot = board.identity.slot
            if 1 <= slot <= BOARD_SLOTS:
                types[slot - 1] = board.identity.board_type
        return tuple(types)

    def _zero_counters(self) -> None:
        self._bytes_read = 0
        self._type_f_built = 0
        self._polls = 0
        self._last_transfer = 0
        self._read_errors = 0
        self._scan_gap_max_s = 0.0

    # ----------------------------------------------------------------- run

    def _run(self) -> None:
        self._begin_run()
        if not self._readers:
            self._set_state(InLoopState.NO_BOARDS)
            self._wait_for_stop()
            return
        for reader in self._readers:
            self._enable(reader.board)
        self._set_state(InLoopState.SCAN)
        self._scan_until_stop()
        self._set_state(InLoopState.STOPPING)
        self._stop_run()

    def _begin_run(self) -> None:
        self._set_state(InLoopState.START)
        setups = self._sample_setup()
        now = time.monotonic()
        readers: list[_BoardRun] = []
        for board in sorted(self._crate.boards, key=lambda b: b.identity.card):
            setup = setups.get(board.identity.card)
            if setup is None:
                continue
            board.set_package_data(setup.package_data)
            fifo = setup.fifo_num if board.identity.kind.is_trigger else 0
            board.select_fifo(fifo)
            if setup.enabled:
                board.reset_fifo(fifo)
                reader = _BoardRun(board, fifo, setup.package_data, clean_at=now, left_at=now)
                reader.capacity_words = board.fifo_words
                readers.append(reader)
        self._readers = readers
        with self._cond:
            self._enabled = frozenset(reader.card for reader in readers)
        self._log.info(
            "inLoop: %s started, enabled cards %s",
            self._run_name(),
            sorted(self._enabled) or "none",
        )

    def _run_name(self) -> str:
        with self._cond:
            number = self._run_number
        return f"run {number}" if number is not None else f"run (#{self._run_serial} here)"

    def _wait_for_stop(self) -> None:
        while not self._stop_requested():
            self._wake.wait()
            self._wake.clear()

    def _enable(self, board: Board) -> None:
        if not board.identity.kind.is_trigger:
            board.reinit_pipeline()
        board.set_master_logic(True)

    def _all_master_logic_off(self) -> None:
        for board in self._crate.boards:
            try:
                board.set_master_logic(False)
            except Exception:
                self._log.exception("inLoop: card %d: master logic off failed", board.identity.card)

    # ---------------------------------------------------------------- scan

    def _scan_until_stop(self) -> None:
        next_prescale = time.monotonic() + PRESCALE_PERIOD_S
        while True:
            self._wake.clear()
            if self._stop_requested():
                return
            now = time.monotonic()
            if now >= next_prescale:
                next_prescale = now + PRESCALE_PERIOD_S
                for reader in self._readers:
                    reader.empty_flag = True
                    reader.almost_full_flag = True
            delay_floor = 0.0
            if len(self._pool.q_free) >= self._config.min_free_buffers:
                for reader in self._readers:
                    self._scan_board(reader)
                if all(reader.idle for reader in self._readers):
                    delay_floor = IDLE_SCAN_DELAY_S
            delay = scan_delay(len(self._pool.q_free), self._pool.size, self._config.max_latency_s)
            self._wake.wait(min(max(delay, delay_floor), self._fill_guard_s()))

    def _fill_guard_s(self) -> float:
        """The longest wait after a pass that keeps every FIFO far from full."""
        times = [reader.fill_time_s() for reader in self._readers]
        if None in times:
            return FILL_SAMPLE_S
        return max(SCAN_DELAY_MIN_S, FILL_SHARE * min(times, default=math.inf))

    def _scan_board(self, reader: _BoardRun) -> None:
        """One poll of one board, in the decision order of spec 02 §2."""
        reader.idle = False
        if not self._flush_pending(reader, None):
            return
        board = reader.board
        polled_at = time.monotonic()
        since_last_poll = polled_at - reader.last_poll_at if reader.last_poll_at else 0.0
        if since_last_poll > self._scan_gap_max_s:
            self._scan_gap_max_s = since_last_poll
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
                reader.empty_flag = False
                self._intend_type_f(reader, packets.CH_EMPTY, packets.EVENT_TYPE_NONE)
                self._flush_pending(reader, None)
            return
        if status.almost_full and reader.almost_full_flag:
            reader.almost_full_flag = False
            self._fault_log(reader, "FIFO almost full")
            self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW)
            if not self._flush_pending(reader, None):
                self._count_poll()
                return
        threshold, latency = self._read_rule()
        due = (
            (status.depth_words + reader.carry_words) * 4 >= threshold
            or polled_at - reader.clean_at >= latency
            or status.almost_full
        )
        if not due:
            self._count_poll()
            return
        buf = self._pool.take_free()
        if buf is None:
            self._count_poll()
            return
        if self._read_into(reader, buf, status.depth_words, polled_at):
            self._count_poll()

    def _read_rule(self) -> tuple[int, float]:
        """Read threshold (bytes) and latency (s): larger, rarer reads while the pool is low.

        With a quarter of the pool or less free, nobody is taking data promptly, so
        latency does not matter but buffers do: a board is then read about once per
        outLoop batch, which frees (or packs) what it queued.
        """
        if len(self._pool.q_free) > self._pool.size // 4:
            return self._config.read_threshold_bytes, self._config.max_latency_s
        return (
            max(self._config.read_threshold_bytes, PRESSURE_READ_BYTES),
            max(self._config.max_latency_s, PRESSURE_LATENCY_S),
        )

    def _count_poll(self) -> None:
        with self._cond:
            self._polls += 1

    # ------------------------------------------------------------- reading

    def _read_into(
        self, reader: _BoardRun, buf: Buffer, depth_words: int, polled_at: float
    ) -> bool:
        """Read the board's unread data into ``buf`` and queue it; False on a read error."""
        try:
            if reader.is_trigger:
                fifo_words, kept_words = self._read_trigger(reader, buf, depth_words)
            else:
                fifo_words, kept_words = self._read_digitizer(reader, buf, depth_words)
        except ReadError as error:
            self._pool.release(buf)
            with self._cond:
                self._last_transfer = TRANSFER_READ_ERROR
                self._read_errors += 1
            self._fault_log(reader, "read error", f" ({error}), FIFO reset")
            self._reset(reader, reenable=self._state is InLoopState.SCAN)
            return False
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
                self._bytes_read += fifo_words * 4
                self._last_transfer = fifo_words * 4
        return True

    def _read_trigger(self, reader: _BoardRun, buf: Buffer, depth_words: int) -> tuple[int, int]:
        """Whole 16-word packets, at most 256 KiB, in 64 KiB chunks into one buffer."""
        limit = min(depth_words, TRIGGER_MAX_WORDS, len(buf.words))
        nwords = limit - limit % packets.TRIGGER_WORDS
        position = 0
        while position < nwords:
            chunk = min(TRIGGER_CHUNK_WORDS, nwords - position)
            _read_exact(reader, buf.words[position : position + chunk], chunk)
            position += chunk
        return nwords, nwords

    def _read_digitizer(self, reader: _BoardRun, buf: Buffer, depth_words: int) -> tuple[int, int]:
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

    def _overflow(self, reader: _BoardRun, reenable: bool) -> None:
        self._fault_log(reader, "FIFO full", " (overflow), FIFO reset")
        with self._cond:
            self._last_transfer = TRANSFER_OVERFLOW
        self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW)
        self._flush_pending(reader, None)
        self._reset(reader, reenable)

    def _underflow(self, reader: _BoardRun, reenable: bool) -> None:
        self._fault_log(reader, "FIFO underflow", ", FIFO reset")
        with self._cond:
            self._last_transfer = TRANSFER_UNDERFLOW
        self._intend_type_f(reader, packets.CH_ERROR, packets.EVENT_TYPE_UNDERFLOW)
        self._flush_pending(reader, None)
        self._reset(reader, reenable)

    def _fault_log(self, reader: _BoardRun, kind: str, detail: str = "") -> None:
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

    def _reset(self, reader: _BoardRun, reenable: bool) -> None:
        reader.board.reset_fifo(reader.fifo)
        reader.carry_words = 0
        reader.after_reset = True
        reader.clean_at = time.monotonic()
        reader.restart_fill(reader.clean_at)
        if reenable:
            reader.board.set_master_logic(True)

    # ------------------------------------------------------------- type F

    def _intend_type_f(self, reader: _BoardRun, channel: int, event_type: int) -> None:
        """Decide a type-F header now (timestamp latched now); built when a buffer is free."""
        timestamp = reader.board.latch_timestamp()
        reader.pending.append((channel, event_type, timestamp))

    def _flush_pending(self, reader: _BoardRun, until: Callable[[], float] | None) -> bool:
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
                self._type_f_built += 1
        return True

    def _queue(self, reader: _BoardRun, buf: Buffer, is_type_f: bool) -> None:
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
            buf = self._pool.q_free.get(Owner.INLOOP, timeout=min(remaining, _BUFFER_WAIT_SLICE_S))
            if buf is not None:
                buf.clear()
                return buf

    # ------------------------------------------------------------ stopping

    def _drain_limit(self) -> float:
        """The drain deadline, or the shutdown's if that is sooner (it may arrive mid-drain)."""
        with self._cond:
            if self._shutdown_deadline is None:
                return self._drain_deadline
            return min(self._drain_deadline, self._shutdown_deadline)

    def _stop_run(self) -> None:
        """Master logic off, drain each board and queue its 0xD, bounded by the deadline."""
        with self._cond:
            self._drain_deadline = time.monotonic() + self._config.drain_timeout_s
        for board in self._crate.boards:
            board.set_master_logic(False)
        remaining = collections.deque(self._readers)
        drained = 0
        try:
            for reader in self._readers:
                self._drain_board(reader)
                drained += 1
            # Every board's last data go before any end-of-run header: a classic
            # receiver ends once each board it has seen sent its 0xD, so a board
            # whose 0xD came before another board's first data would end it early.
            while remaining:
                if not self._queue_end_of_run(remaining[0], self._drain_limit):
                    raise _DrainTimeout
                remaining.popleft()
        except _DrainTimeout:
            self._finish_after_timeout(list(remaining), self._readers[drained:])
        self._log.info(
            "inLoop: %s drained: %d bytes, %d type-F headers, %d read errors",
            self._run_name(),
            self._bytes_read,
            self._type_f_built,
            self._read_errors,
        )

    def _drain_board(self, reader: _BoardRun) -> None:
        """Read the board's FIFO empty, ignoring flow control; raise _DrainTimeout if late."""
        if not self._flush_pending(reader, self._drain_limit):
            raise _DrainTimeout
        while True:
            if time.monotonic() >= self._drain_limit():
                raise _DrainTimeout
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
                if not self._flush_pending(reader, self._drain_limit):
                    raise _DrainTimeout
            buf = self._take_free_until(self._drain_limit)
            if buf is None:
                raise _DrainTimeout
            if not self._read_into(reader, buf, status.depth_words, polled_at):
                return

    def _queue_end_of_run(self, reader: _BoardRun, until: Callable[[], float]) -> bool:
        self._intend_type_f(reader, packets.CH_END_OF_RUN, packets.EVENT_TYPE_NONE)
        if self._flush_pending(reader, until):
            return True
        reader.pending.pop()
        return False

    def _finish_after_timeout(
        self, remaining: list[_BoardRun], undrained: list[_BoardRun]
    ) -> None:
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
            if not self._queue_end_of_run(reader, grace_until):
                self._log.error(
                    "inLoop: card %d: end-of-run header lost (no free buffer)", reader.card
                )

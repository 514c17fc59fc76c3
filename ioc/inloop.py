"""inLoop: the reader thread that moves FIFO data into buffers (spec 02 §2).

One thread runs the state machine Idle -> Start -> (NoBoards | Scan) -> Stopping
-> Idle. In Scan it polls every enabled board once per pass in card order
(`ioc.board_reader` reads each one), then waits the flow-control scan delay
(`ioc.scan_timing`). Stopping drains every enabled board and then queues exactly
one end-of-run (0xD) type-F header per board, after every board's last data.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ioc.board_reader import (
    MARKER_GRACE_S,
    PRESCALE_PERIOD_S,
    BoardReader,
    BoardRun,
    DrainTimeout,
    ReadSettings,
)
from ioc.hardware import Board, Crate
from ioc.pool import BufferPool
from ioc.realtime import (
    RealtimeState,
    enter_realtime,
    frozen_heap,
    name_os_thread,
    raise_other_threads,
    switch_interval,
)
from ioc.scan_timing import IDLE_SCAN_DELAY_S, fill_guard_s, scan_delay

#: BoardType PVs exist for slots 1..7.
BOARD_SLOTS = 7


class InLoopSettings(ReadSettings, Protocol):
    """The part of the configuration inLoop reads (ioc.config.InLoopConfig)."""

    drain_timeout_s: float
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


class _Command(enum.Enum):
    START = "start"
    STOP = "stop"


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
        self._board_reader = BoardReader(pool, config, self._cond, self._log)
        self._board_types = self._read_board_types()
        self._enabled: frozenset[int] = frozenset()
        self._readers: list[BoardRun] = []
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
        counters = self._board_reader
        with self._cond:
            return InLoopStats(
                running=self._running,
                state=self._state,
                mib_read=counters.bytes_read // (1 << 20),
                type_f_built=counters.type_f_built,
                polls=counters.polls,
                last_transfer=counters.last_transfer,
                read_errors=counters.read_errors,
                bytes_read=counters.bytes_read,
                run_serial=self._run_serial,
                scan_gap_max_ms=counters.scan_gap_max_s * 1000.0,
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
        with self._cond:
            self._realtime = realtime
        self._enter_idle()
        while self._wait_for_start():
            if realtime is RealtimeState.ON:  # every thread started by now, servers included
                raise_other_threads(self._log)
            try:
                with frozen_heap(), switch_interval(self._config.run_switch_interval_s):
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
                        self._board_reader.zero_counters()
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
        self._crate.before_run()
        setups = self._sample_setup()
        now = time.monotonic()
        readers: list[BoardRun] = []
        for board in sorted(self._crate.boards, key=lambda b: b.identity.card):
            setup = setups.get(board.identity.card)
            if setup is None:
                continue
            board.set_package_data(setup.package_data)
            fifo = setup.fifo_num if board.identity.kind.is_trigger else 0
            board.select_fifo(fifo)
            if setup.enabled:
                board.reset_fifo(fifo)
                reader = BoardRun(board, fifo, setup.package_data, clean_at=now, left_at=now)
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
        readers = self._readers
        scan_board = self._board_reader.scan_board
        next_prescale = time.monotonic() + PRESCALE_PERIOD_S
        while True:
            self._wake.clear()
            if self._stop_requested():
                return
            now = time.monotonic()
            if now >= next_prescale:
                next_prescale = now + PRESCALE_PERIOD_S
                for reader in readers:
                    reader.empty_flag = True
                    reader.almost_full_flag = True
            delay_floor = 0.0
            if len(self._pool.q_free) >= self._config.min_free_buffers:
                for reader in readers:
                    scan_board(reader)
                if all(reader.idle for reader in readers):
                    delay_floor = IDLE_SCAN_DELAY_S
            delay = scan_delay(len(self._pool.q_free), self._pool.size, self._config.max_latency_s)
            fill_guard = fill_guard_s([reader.fill_time_s() for reader in readers])
            self._wake.wait(min(max(delay, delay_floor), fill_guard))

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
        board_reader = self._board_reader
        remaining = collections.deque(self._readers)
        drained = 0
        try:
            for reader in self._readers:
                board_reader.drain_board(reader, self._drain_limit)
                drained += 1
            # Every board's last data go before any end-of-run header: a classic
            # receiver ends once each board it has seen sent its 0xD, so a board
            # whose 0xD came before another board's first data would end it early.
            while remaining:
                if not board_reader.queue_end_of_run(remaining[0], self._drain_limit):
                    raise DrainTimeout
                remaining.popleft()
        except DrainTimeout:
            board_reader.finish_after_timeout(list(remaining), self._readers[drained:])
        self._log.info(
            "inLoop: %s drained: %d bytes, %d type-F headers, %d read errors",
            self._run_name(),
            board_reader.bytes_read,
            board_reader.type_f_built,
            board_reader.read_errors,
        )

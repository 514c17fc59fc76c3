"""Run control: follows the global run-control PVs and sequences the stages.

The crate follows `Online_CS_StartStop` and `Online_CS_SaveData` through CA
monitors whether this IOC serves them (standalone) or another one does
(multi-crate), so both cases take the same path. Monitor callbacks only post
events; one worker thread carries them out in order, so a CA callback never
blocks and a Start that arrives while draining waits for the drain (spec 02
§2, §5).

Which SaveData a run uses: the value at Start, changed by a put while the run
is Running (spec 02: Save mid-run opens the listener, No Save recycles checked
data), and frozen from Stop until the drain is complete, so the run's tail and
every board's end-of-run header go where the run's data went. A change that
arrives while draining applies from the end of the drain.

While the globals are away the crate keeps what it follows. When they come back,
each value is compared with what the crate followed before: the same value
changes nothing (a Start it is running is not a new run); a different StartStop
is followed (a Stop ends the run, drained with the run's SaveData); a different
SaveData is not applied to a run in progress (it was not put by anyone during
the run: the globals IOC lost its saved state) and applies from the next Start.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ioc.delivery import RunIdentity
from ioc.inloop import InLoop, InLoopState
from ioc.losses import LossLedger
from ioc.outloop import OutLoop

log = logging.getLogger("dgs.runcontrol")

#: How long Start waits for inLoop to enable the boards before it shows Running anyway.
READING_WAIT_S = 5.0


class CrateState(enum.IntEnum):
    """`_CV_State`: the crate's run state as scripts and screens see it."""

    STOPPED = 0
    RUNNING = 1
    DRAINING = 2
    NO_BOARDS = 3


class SenderControl(Protocol):
    def run_started(self, save: bool, run: RunIdentity | None = None) -> None: ...
    def save_changed(self, save: bool) -> None: ...
    def run_stopped(self) -> None: ...
    def drain_complete(self) -> None: ...
    def bind_check(self) -> None: ...


class _Event(enum.Enum):
    START_STOP = "start_stop"
    SAVE = "save"
    RUN_NUMBER = "run_number"
    INLOOP_STATE = "inloop_state"
    FLUSHED = "flushed"
    CONNECTION = "connection"
    SHUTDOWN = "shutdown"
    QUIT = "quit"


class RunControl:
    """Turns run-control PV changes and stage reports into stage commands."""

    def __init__(
        self,
        *,
        inloop: InLoop,
        outloop: OutLoop,
        sender: SenderControl,
        reset_accounting: Callable[[], None],
        sample_setup: Callable[[], None] = lambda: None,
        on_state: Callable[[CrateState], None],
        on_connection: Callable[[bool], None],
        losses: LossLedger | None = None,
        run_boards: Callable[[], tuple[int, ...]] = tuple,
        read_run_number: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.inloop = inloop
        self.outloop = outloop
        self.sender = sender
        self._reset_accounting = reset_accounting
        self._sample_setup = sample_setup
        self._on_state = on_state
        self._on_connection = on_connection
        self._losses = losses or LossLedger()
        self._run_boards = run_boards
        self._read_run_number = read_run_number
        #: `Online_CS_RunNumber` as followed; sampled at Start to name the run's data.
        self.run_number = -1
        self._events: queue.SimpleQueue[tuple[_Event, object]] = queue.SimpleQueue()
        self.want_start = False
        #: The last StartStop / SaveData the globals said (what the crate follows).
        self.followed_start = False
        self.save = False
        #: The SaveData the current run uses (module docstring).
        self.run_save = False
        self.state = CrateState.STOPPED
        self._stopped = threading.Event()
        self._stopped.set()
        self._thread = threading.Thread(target=self._run, name="runControl", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # Event sources (any thread).

    def start_stop_changed(self, value: int, restored: bool = False) -> None:
        """``restored``: the value the globals came back with after a disconnection."""
        self._events.put((_Event.START_STOP, (bool(value), restored)))

    def save_changed(self, value: int, restored: bool = False) -> None:
        """``restored``: the value the globals came back with after a disconnection."""
        self._events.put((_Event.SAVE, (bool(value), restored)))

    def run_number_changed(self, value: int, restored: bool = False) -> None:
        """The run number names the data of the next Start (a restored one too)."""
        self._events.put((_Event.RUN_NUMBER, int(value)))

    def connection_changed(self, connected: bool) -> None:
        self._events.put((_Event.CONNECTION, connected))

    def inloop_state_changed(self, state: InLoopState) -> None:
        self._events.put((_Event.INLOOP_STATE, state))

    def outloop_flushed(self) -> None:
        self._events.put((_Event.FLUSHED, None))

    def begin_shutdown(self) -> None:
        """SIGTERM: no new run; a running one ends (the caller drains inLoop itself)."""
        self._events.put((_Event.SHUTDOWN, None))

    def wait_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    def quit(self) -> None:
        self._events.put((_Event.QUIT, None))
        self._thread.join(timeout=2.0)

    # The worker.

    def _run(self) -> None:
        while True:
            event, value = self._events.get()
            if event is _Event.QUIT:
                return
            try:
                self._handle(event, value)
            except Exception:
                log.exception("run control failed handling %s", event.value)

    def _handle(self, event: _Event, value: object) -> None:
        if event is _Event.START_STOP:
            self._start_stop(*value)  # type: ignore[misc]
        elif event is _Event.SAVE:
            self._save_data(*value)  # type: ignore[misc]
        elif event is _Event.RUN_NUMBER:
            self.run_number = int(value)  # type: ignore[call-overload]
        elif event is _Event.SHUTDOWN:
            self.want_start = False
            if self.state in (CrateState.RUNNING, CrateState.NO_BOARDS):
                self._set_state(CrateState.DRAINING)
                self.sender.run_stopped()
        elif event is _Event.CONNECTION:
            self._on_connection(bool(value))
        elif event is _Event.INLOOP_STATE:
            self._inloop_state(value)  # type: ignore[arg-type]
        elif event is _Event.FLUSHED:
            self.sender.drain_complete()
            self._set_state(CrateState.STOPPED)
            if self.save != self.run_save:
                self._use_save(self.save)
            if self.want_start:
                self._begin_run()

    def _start_stop(self, start: bool, restored: bool) -> None:
        if restored:
            if start == self.followed_start:
                log.info("globals back: StartStop = %s, as followed", _start_text(start))
                return
            log.warning(
                "globals back with StartStop = %s (followed %s): following it",
                _start_text(start),
                _start_text(self.followed_start),
            )
        self.followed_start = self.want_start = start
        if start and self.state is CrateState.STOPPED:
            self._begin_run()
        elif not start and self.state in (CrateState.RUNNING, CrateState.NO_BOARDS):
            self._end_run()

    def _save_data(self, save: bool, restored: bool) -> None:
        if restored and save == self.save:
            log.info("globals back: SaveData = %s, as followed", _save_text(save))
            return
        self.save = save
        if self.state is CrateState.STOPPED:
            self._use_save(save)
        elif save == self.run_save:
            return
        elif self.state is CrateState.DRAINING:
            log.info(
                "SaveData = %s applies after the drain; this run ends with %s",
                _save_text(save),
                _save_text(self.run_save),
            )
        elif restored:
            log.warning(
                "globals back with SaveData = %s; this run keeps %s, the next one uses %s",
                _save_text(save),
                _save_text(self.run_save),
                _save_text(save),
            )
        else:
            self._use_save(save)

    def _use_save(self, save: bool) -> None:
        """The SaveData the run (or the next one) uses, told to outLoop and the sender."""
        self.run_save = save
        self.outloop.save = save
        self.sender.save_changed(save)

    def _inloop_state(self, state: InLoopState) -> None:
        if state is InLoopState.NO_BOARDS and self.state is CrateState.RUNNING:
            self._set_state(CrateState.NO_BOARDS)
        elif state is InLoopState.IDLE and self.state is CrateState.DRAINING:
            self.outloop.request_flush()
        elif state is InLoopState.IDLE and self.state is not CrateState.STOPPED:
            log.error("inLoop ended the run on its own; Stop and Start to begin a new one")
            self.want_start = False
            self._set_state(CrateState.DRAINING)
            self.sender.run_stopped()
            self.outloop.request_flush()

    def _begin_run(self) -> None:
        try:
            self.sender.bind_check()
        except OSError as err:
            log.error("run refused: data port cannot be bound: %s", err)
            return
        self._reset_accounting()
        self._sample_setup()
        self._losses.reset_run()
        self.run_save = self.save
        # Read, not only followed: the monitors of two PVs keep no order between them, so a
        # run number put just before Start may still be on its way.
        number = self._read_run_number()
        if number is not None:
            self.run_number = number
        run = RunIdentity(self.run_number, time.time_ns(), self._run_boards())
        self.sender.run_started(self.run_save, run)
        self.outloop.save = self.run_save
        self.outloop.reset_run()
        self.inloop.request_start(self.run_number)
        if not self.inloop.wait_reading(READING_WAIT_S):
            log.warning("inLoop has not enabled the boards within %.0f s", READING_WAIT_S)
        log.info("run started (%s), run number %d", _save_text(self.run_save), self.run_number)
        self._set_state(CrateState.RUNNING)

    def _end_run(self) -> None:
        self._set_state(CrateState.DRAINING)
        self.inloop.request_stop()
        self.sender.run_stopped()
        log.info("run stopping: draining")

    def _set_state(self, state: CrateState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is CrateState.STOPPED:
            self._stopped.set()
        else:
            self._stopped.clear()
        self._on_state(state)


def _start_text(start: bool) -> str:
    return "Start" if start else "Stop"


def _save_text(save: bool) -> str:
    return "Save" if save else "No Save"

"""The IOC's side of a simulated crate process: backend ``"sim"``.

`status` and `read` use only the mapped window (`sim.window`): positions and flags
are loads from shared memory and a read is one copy from the ring, as a DMA would
do. Every other call goes through the command socket (`sim.commands`).

When the crate process stops answering (no heartbeat for `STALE_S`, the channel
broken, or a command slower than `COMMAND_TIMEOUT_S`) the crate is *lost*: this is
logged once, `status` then shows a little data and `read` raises `ReadError`, so
inLoop counts read errors instead of waiting; set-up calls do nothing and register
reads show the last values. Every `RETRY_S` a call tries to attach again; once a
crate process serves the window again the settings the IOC made (registers,
package data, FIFO selection, SIM_* controls, master logic) are applied to it and
data flow again. A crate process the IOC started itself (``sim_process = "spawn"``)
is started again by the IOC when it ended.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import numpy as np

from ioc.hardware import TRIGGER_FIFOS, Board, BoardIdentity, Crate, FifoStatus, ReadError
from ioc.packets import TIMESTAMP_MASK, TRIGGER_WORDS
from sim.board import SimBoardSpec
from sim.clock import TICK_NS
from sim.commands import CommandLink, PeerLost
from sim.launch import CrateProcess
from sim.window import (
    C_READ_ERROR,
    C_UNDERFLOW,
    F_FULL,
    F_HEAD,
    F_TAIL,
    H_CLOSED,
    H_HEARTBEAT_NS,
    H_ORIGIN_NS,
    BoardLayout,
    Window,
)

#: A heartbeat older than this means the crate process is gone or stuck.
STALE_S = 0.5
COMMAND_TIMEOUT_S = 0.5
#: How often a lost crate is looked for again.
RETRY_S = 0.25
#: Least time between two starts of a crate process this IOC spawned.
RESTART_S = 2.0
#: How long an attaching IOC waits for the window at start-up.
ATTACH_WAIT_S = 3.0
#: What `status` shows while the crate is lost: one trigger packet, so that inLoop
#: tries a read (of a digitizer or a trigger) and meets the ReadError.
LOST_STATUS = FifoStatus(full=False, almost_full=False, empty=False, depth_words=TRIGGER_WORDS)

log = logging.getLogger("dgs.ioc")


class ProcessCrate(Crate):
    """A crate served by a `dgs-sim` process through window ``name``."""

    def __init__(
        self, specs: list[SimBoardSpec], name: str, spawned: CrateProcess | None = None
    ) -> None:
        self.name = name
        self._spawned = spawned
        self._layout = [
            BoardLayout(s.name, TRIGGER_FIFOS if s.kind.is_trigger else 1, s.fifo_words)
            for s in sorted(specs, key=lambda s: s.card)
        ]
        self._lock = threading.RLock()
        self._lost: str | None = None
        self._next_try = 0.0
        #: One command connection per calling thread: inLoop never queues behind the
        #: publisher's or the register thread's calls.
        self._links: dict[int, CommandLink] = {}
        self.boards: list[ProcessBoard] = [
            ProcessBoard(self, index, BoardIdentity(s.name, s.kind, s.slot, s.card), s)
            for index, s in enumerate(sorted(specs, key=lambda s: s.card))
        ]
        self._window: Window | None = None
        if spawned is None:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Map the window once its crate process serves it (RuntimeError saying why not).

        A spawned crate process starts while the IOC builds its records; the IOC waits
        here before its servers start, and every call waits here if it comes first.
        """
        with self._lock:
            if self._window is not None:
                return
            if self._spawned is not None:
                self._spawned.wait_ready()
            window, link = self._connect(wait_s=0.0 if self._spawned else ATTACH_WAIT_S)
            self._links[threading.get_ident()] = link
            for board in self.boards:
                board.learn_registers(link)
            self._window = window

    def _connect(self, wait_s: float) -> tuple[Window, CommandLink]:
        """Map the window and open its channel (RuntimeError saying why not)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                window = Window.attach(self.name)
                break
            except (OSError, ValueError) as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"no crate process serves window {self.name} ({err}); "
                        "start it with dgs-sim --config FILE"
                    ) from err
                time.sleep(0.05)
        if window.layout != self._layout:
            served = [board.name for board in window.layout]
            window.close()
            raise RuntimeError(
                f"window {self.name} serves boards {served}, not the configured "
                f"{[board.name for board in self._layout]} (FIFOs and sizes included)"
            )
        try:
            return window, CommandLink(self.name, COMMAND_TIMEOUT_S)
        except PeerLost as err:
            window.close()
            raise RuntimeError(str(err)) from err

    def clock_origin_ns(self) -> int:
        return int(self.window.header[H_ORIGIN_NS])

    def reset_accounting(self) -> None:
        """Run start: the crate process's event counts start afresh (if it answers)."""
        with contextlib.suppress(PeerLost):
            self.call(-1, "reset_accounting")

    def close(self) -> None:
        """IOC exit: drop the channel and the mapping; end the crate process if ours."""
        with self._lock:
            self._close_links()
            if self._window is not None:
                self._window.close()
            if self._spawned is not None:
                self._spawned.stop()

    # Liveness.

    def live_window(self) -> Window | None:
        """The window while its crate process is alive, else None (crate lost)."""
        if self._window is None:
            self.wait_ready()
        if self._lost is not None and not self._reattach():
            return None
        window = self._window
        header = window.header
        age_s = (time.monotonic_ns() - int(header[H_HEARTBEAT_NS])) / 1e9
        if header[H_CLOSED]:
            self._lose("the crate process closed its window")
        elif age_s > STALE_S:
            self._lose(f"no heartbeat for {age_s:.1f} s")
        else:
            return window
        return None

    @property
    def window(self) -> Window:
        """The window mapped now (the crate process may be lost: see `live_window`)."""
        if self._window is None:
            self.wait_ready()
        return self._window

    @property
    def lost(self) -> str | None:
        """Why the crate process is lost, None while it serves."""
        return self._lost

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._lost is not None:
                return
            if self._spawned is not None and self._spawned.exit_code is not None:
                reason += f"; it exited with code {self._spawned.exit_code}"
            self._lost = reason
            self._next_try = time.monotonic() + RETRY_S
            self._close_links()
        log.error("crate process of window %s lost (%s): reads fail until it is back",
                  self.name, reason)

    def _reattach(self) -> bool:
        """Try (at most every RETRY_S) to attach to a crate process serving the window."""
        with self._lock:
            if self._lost is None:
                return True
            if time.monotonic() < self._next_try:
                return False
            self._next_try = time.monotonic() + RETRY_S
            if self._restart_if_ended():
                return False
            try:
                window, link = self._connect(wait_s=0.0)
            except RuntimeError:
                return False
            age_s = (time.monotonic_ns() - int(window.header[H_HEARTBEAT_NS])) / 1e9
            if age_s > STALE_S:
                link.close()
                window.close()
                return False
            same = window.instance == self._window.instance
            old, self._window = self._window, window
            old.close()
            self._close_links()
            self._links[threading.get_ident()] = link
            try:
                if not same:
                    for board in self.boards:
                        board.learn_registers(link)
                        board.restore(link)
            except (PeerLost, KeyError, ValueError, RuntimeError) as err:
                link.close()
                log.warning("crate process of window %s: restoring settings failed: %s",
                            self.name, err)
                return False
            self._lost = None
        log.info("crate process of window %s %s", self.name,
                 "answers again" if same else "is back (a new process): settings restored")
        return True

    def _restart_if_ended(self) -> bool:
        """A crate process this IOC started and that ended: start another (at most every
        RESTART_S, so one that fails at start does not loop); True if it is not serving."""
        spawned = self._spawned
        if spawned is None or spawned.exit_code is None:
            return False
        if time.monotonic() - spawned.started_at >= RESTART_S:
            log.warning("crate process of window %s ended with code %s: starting a new one",
                        self.name, spawned.exit_code)
            spawned.restart()
        return True

    def call(self, board: int, op: str, *args: Any) -> Any:
        """A command's result; PeerLost (the crate is then lost) if there is no answer."""
        if self._window is None:
            self.wait_ready()
        if self._lost is not None and not self._reattach():
            raise PeerLost(self._lost)
        try:
            link = self._links.get(threading.get_ident())
            if link is None:
                link = CommandLink(self.name, COMMAND_TIMEOUT_S)
                self._links[threading.get_ident()] = link
            return link.call(board, op, *args)
        except PeerLost as err:
            self._lose(str(err))
            raise

    def _close_links(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._links.clear()


class ProcessBoard(Board):
    """One board of a crate process: window reads, commands for the rest."""

    def __init__(
        self, crate: ProcessCrate, index: int, identity: BoardIdentity, spec: SimBoardSpec
    ) -> None:
        self.identity = identity
        self._crate = crate
        self._index = index
        self._fifos = TRIGGER_FIFOS if identity.kind.is_trigger else 1
        self._capacity = spec.fifo_words
        self._almost_full = -(-spec.fifo_words * 7 // 8)
        self._package_data = spec.package_data
        #: Settings made through this IOC, re-applied to a restarted crate process.
        self._settings: dict[tuple[str, ...], tuple[str, tuple[Any, ...]]] = {}
        self._register_slots: dict[str, int] = {}
        #: Master logic as last set through this IOC, None when something else may have set it.
        self._logic_known: bool | None = None
        self._counts = {
            key: np.zeros(1, dtype=np.int64) for key in ("generated", "dropped", "cleared")
        }

    def _fifo(self, fifo: int) -> int:
        if self._fifos == 1:
            return 0
        if not 0 <= fifo < self._fifos:
            raise ValueError(f"FIFO {fifo} is not 0..{self._fifos - 1}")
        return fifo

    # Window calls (no system call).

    def status(self, fifo: int = 0) -> FifoStatus:
        window = self._crate.live_window()
        if window is None:
            return LOST_STATUS
        control = window.fifo_control(self._index, self._fifo(fifo))
        depth = int(control[F_TAIL] - control[F_HEAD])
        empty = depth == 0
        flags = window.control(self._index)
        if depth and flags[C_UNDERFLOW]:
            flags[C_UNDERFLOW] = 0
            empty = True
        return FifoStatus(bool(control[F_FULL]), depth >= self._almost_full, empty, depth)

    def read(self, out: np.ndarray, nwords: int, fifo: int = 0) -> int:
        window = self._crate.live_window()
        if window is None:
            raise ReadError(f"{self.identity.name}: crate process lost ({self._crate.lost})")
        index = self._fifo(fifo)
        control = window.fifo_control(self._index, index)
        head = int(control[F_HEAD])
        depth = int(control[F_TAIL]) - head
        if not 0 <= nwords <= depth:
            raise ValueError(f"read of {nwords} words, FIFO depth {depth}")
        flags = window.control(self._index)
        if flags[C_READ_ERROR]:
            flags[C_READ_ERROR] = 0
            raise ReadError(f"{self.identity.name}: simulated transfer failure")
        ring = window.ring(self._index, index)
        start = head % self._capacity
        first = min(nwords, self._capacity - start)
        np.copyto(out[:first], ring[start : start + first])
        if nwords > first:
            np.copyto(out[first:nwords], ring[: nwords - first])
        control[F_HEAD] = head + nwords
        return nwords

    @property
    def fifo_words(self) -> int:
        return self._capacity

    # Commands.

    def _call(self, op: str, *args: Any) -> Any:
        return self._crate.call(self._index, op, *args)

    def _setting(self, key: tuple[str, ...], op: str, *args: Any) -> None:
        """A setting: applied now if the crate answers, and again to a restarted one."""
        with contextlib.suppress(PeerLost):
            self._call(op, *args)
        self._settings.pop(key, None)
        self._settings[key] = (op, args)

    def restore(self, link: CommandLink) -> None:
        """Apply this IOC's settings to a new crate process (in the order they were made)."""
        self._logic_known = None
        for op, args in self._settings.values():
            link.call(self._index, op, *args)

    @property
    def package_data(self) -> int:
        with contextlib.suppress(PeerLost):
            self._package_data = self._call("package_data")
        return self._package_data

    def set_package_data(self, value: int) -> None:
        if not 0 <= value <= 0xFFF:
            raise ValueError(f"package data is 12 bits (0..4095), not {value}")
        self._package_data = value
        self._setting(("package_data",), "set_package_data", value)

    def select_fifo(self, fifo: int) -> None:
        if self._fifos > 1:
            self._setting(("select_fifo",), "select_fifo", self._fifo(fifo))

    def reset_fifo(self, fifo: int = 0) -> None:
        with contextlib.suppress(PeerLost):
            self._call("reset_fifo", self._fifo(fifo))

    def set_master_logic(self, on: bool) -> None:
        """Idempotent, so a repeat (inLoop re-enables after every FIFO reset) costs no
        round trip while the board's logic is known to be in that state already."""
        on = bool(on)
        if self._logic_known is on:
            return
        self._logic_known = None
        self._setting(("master_logic",), "set_master_logic", on)
        if self._crate.lost is None:
            self._logic_known = on

    def reinit_pipeline(self) -> None:
        """Nothing to do: the simulated pipeline keeps no state between events."""

    def latch_timestamp(self) -> int:
        """The crate clock read here, as the board would latch it: it counts 10 ns ticks of
        the host's monotonic clock from the origin in the window, so no round trip (inLoop
        latches one for every type-F header). The board's latched-timestamp registers are
        not updated by it."""
        origin_ns = self._crate.clock_origin_ns()  # first: it may wait for the crate
        ticks = (time.monotonic_ns() - origin_ns) // TICK_NS
        return ticks & TIMESTAMP_MASK

    def learn_registers(self, link: CommandLink) -> None:
        """Where each register is in the window's register image (asked once per process)."""
        names = link.call(self._index, "registers")
        self._register_slots = {name: slot for slot, name in enumerate(names)}

    def write_register(self, register: str, value: int) -> None:
        self._crate.wait_ready()  # the register names come with the window
        if register not in self._register_slots:
            raise KeyError(register)
        self._logic_known = None  # the register may hold the master logic enable
        self._setting(("register", register), "write_register", register, int(value))

    def read_register(self, register: str) -> int:
        """From the register image: no system call (while the crate is lost, the last values)."""
        image = self._crate.window.registers(self._index)
        return int(image[self._register_slots[register]])

    # Simulation controls (SIM_* records).

    def set_event_rate(self, hz: float) -> None:
        self._setting(("event_rate",), "set_event_rate", float(hz))

    def set_trace_length(self, samples: int) -> None:
        self._setting(("trace_length",), "set_trace_length", int(samples))

    def set_header_type(self, value: int) -> None:
        self._setting(("header_type",), "set_header_type", int(value))

    def inject(self, fault: int) -> None:
        self._call("inject", int(fault))

    def _accounting(self, key: str) -> np.ndarray:
        """The crate process's counts, or the last ones seen while it is lost."""
        try:
            counts = self._call("accounting")
        except PeerLost:
            return self._counts[key]
        self._counts = {name: np.array(values, dtype=np.int64) for name, values in counts.items()}
        return self._counts[key]

    @property
    def generated(self) -> int:
        return int(self._accounting("generated").sum())

    @property
    def dropped(self) -> int:
        return int(self._accounting("dropped").sum())

    @property
    def cleared(self) -> int:
        return int(self._accounting("cleared").sum())

    @property
    def generated_by_channel(self) -> np.ndarray:
        return self._accounting("generated").copy()

    @property
    def dropped_by_channel(self) -> np.ndarray:
        return self._accounting("dropped").copy()

    @property
    def cleared_by_channel(self) -> np.ndarray:
        return self._accounting("cleared").copy()

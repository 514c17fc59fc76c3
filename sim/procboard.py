"""One board of a simulated crate process, as the IOC sees it (`sim.attach`).

`status` and `read` use only the mapped window: positions and flags are loads
from shared memory and a read is one copy from the ring, as a DMA would do;
`read_register` reads the window's register image. Every other call goes
through the command socket. While the crate process is lost, `status` shows a
little data and `read` and `read_register` raise `ReadError`, so inLoop counts
read errors instead of waiting and the register readbacks go INVALID; settings
are kept and applied to the next crate process.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ioc.hardware import TRIGGER_FIFOS, Board, BoardIdentity, FifoStatus, ReadError
from ioc.packets import TIMESTAMP_MASK, TRIGGER_WORDS
from sim.board import SimBoardSpec
from sim.clock import TICK_NS
from sim.commands import CommandLink, PeerLost
from sim.window import C_READ_ERROR, C_UNDERFLOW, F_FULL, F_HEAD, F_TAIL

if TYPE_CHECKING:
    from sim.attach import ProcessCrate

#: What `status` shows while the crate is lost: one trigger packet, so that inLoop
#: tries a read (of a digitizer or a trigger) and meets the ReadError.
LOST_STATUS = FifoStatus(full=False, almost_full=False, empty=False, depth_words=TRIGGER_WORDS)


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
        """At Start: the simulated board starts its run afresh (see `SimDigitizer`)."""
        with contextlib.suppress(PeerLost):
            self._call("reinit_pipeline")

    def latch_timestamp(self) -> int:
        """The crate clock read here, as the board would latch it: it counts 10 ns ticks of
        the host's monotonic clock from the origin in the window (up to the time the crate
        process has built its events), so no round trip (inLoop
        latches one for every type-F header). The board's latched-timestamp registers are
        not updated by it."""
        origin_ns = self._crate.clock_origin_ns()  # first: it may wait for the crate
        # Not past what the crate process has built: its pump writes events a few ms
        # after they happen, and a header latched later than an event that follows it
        # in the FIFO would break the board's time order (the online merge relies on it).
        now_ns = min(time.monotonic_ns(), self._crate.built_until_ns())
        ticks = max(0, now_ns - origin_ns) // TICK_NS
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
        """From the register image: no system call. While the crate is lost the image holds
        the last values, not the board's: ReadError, as a bus error on a real crate."""
        window = self._crate.live_window()
        if window is None:
            raise ReadError(f"{self.identity.name}: crate process lost ({self._crate.lost})")
        return int(window.registers(self._index)[self._register_slots[register]])

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

"""A minimal third-party-style backend: every board replays one fixed event.

It uses nothing of `sim/`, only `ioc.hardware` and the packet layout, as a
laboratory's own driver would; the IOC loads it with
``backend = "fixed_words_backend:FixedWordsCrate"`` (this directory on PYTHONPATH).
Events enter a board's FIFO at ``RATE_HZ`` while its master logic is on.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ioc.config import CrateConfig
from ioc.hardware import (
    TRIGGER_FIFOS,
    Board,
    BoardIdentity,
    Crate,
    FifoStatus,
    ReadError,
)
from ioc.packets import (
    DIGITIZER_HEADER_LENGTH,
    HEADER_TYPE_LED,
    HEADER_WORDS,
    MARKER,
    TIMESTAMP_MASK,
    TRIGGER_MARKER,
    TRIGGER_WORDS,
    word1,
    word3,
)

RATE_HZ = 200.0
CAPACITY_EVENTS = 4096
TICKS_PER_S = 100_000_000
#: Control registers this backend keeps (its whole register file).
REGISTERS = ("reg_led_threshold0", "reg_TRIG_MASK")


class FixedWordsBoard(Board):
    """One board whose FIFOs fill with copies of one event, timestamped as they enter."""

    def __init__(self, identity: BoardIdentity, package_data: int, origin_ns: int) -> None:
        self.identity = identity
        self._package_data = package_data
        self._origin_ns = origin_ns
        self._lock = threading.Lock()
        self._fifo_count = TRIGGER_FIFOS if identity.kind.is_trigger else 1
        self._depth = [0] * self._fifo_count
        self._selected = 0
        self._on_since: float | None = None
        self._admitted = 0
        self._registers = dict.fromkeys(REGISTERS, 0)
        self._event_words = TRIGGER_WORDS if identity.kind.is_trigger else HEADER_WORDS

    @property
    def package_data(self) -> int:
        return self._package_data

    def _ticks(self) -> int:
        return ((time.monotonic_ns() - self._origin_ns) // 10) & TIMESTAMP_MASK

    def _index(self, fifo: int) -> int:
        return fifo if self.identity.kind.is_trigger else 0

    def _arrive(self) -> None:
        if self._on_since is None:
            return
        due = int((time.monotonic() - self._on_since) * RATE_HZ)
        fifo = self._selected
        self._depth[fifo] = min(CAPACITY_EVENTS, self._depth[fifo] + due - self._admitted)
        self._admitted = due

    def status(self, fifo: int = 0) -> FifoStatus:
        with self._lock:
            self._arrive()
            events = self._depth[self._index(fifo)]
        return FifoStatus(
            full=events == CAPACITY_EVENTS,
            almost_full=events >= CAPACITY_EVENTS * 3 // 4,
            empty=events == 0,
            depth_words=events * self._event_words,
        )

    def read(self, out: np.ndarray, nwords: int, fifo: int = 0) -> int:
        events, rest = divmod(nwords, self._event_words)
        with self._lock:
            index = self._index(fifo)
            if rest or events > self._depth[index]:
                raise ReadError(f"{self.identity.name}: read of {nwords} words is not whole events")
            self._depth[index] -= events
            ticks = self._ticks()
        block = out[:nwords].reshape(events, self._event_words)
        block[:] = 0
        if self.identity.kind.is_trigger:
            block[:, 0] = TRIGGER_MARKER
            block[:, 2:5] = [(ticks >> shift) & 0xFFFF for shift in (32, 16, 0)]
        else:
            block[:, 0] = MARKER
            block[:, 1] = word1(self.identity.slot, HEADER_WORDS - 1, self._package_data, 0)
            block[:, 2] = ticks & 0xFFFFFFFF
            block[:, 3] = word3(DIGITIZER_HEADER_LENGTH, 0, HEADER_TYPE_LED, ticks)
        return nwords

    def reset_fifo(self, fifo: int = 0) -> None:
        with self._lock:
            self._arrive()
            self._depth[self._index(fifo)] = 0

    def set_master_logic(self, on: bool) -> None:
        with self._lock:
            self._arrive()
            if on and self._on_since is None:
                self._on_since, self._admitted = time.monotonic(), 0
            elif not on:
                self._on_since = None

    def reinit_pipeline(self) -> None:
        """Nothing to re-initialise: the event never changes."""

    def latch_timestamp(self) -> int:
        return self._ticks()

    def set_package_data(self, value: int) -> None:
        with self._lock:
            self._package_data = value

    def select_fifo(self, fifo: int) -> None:
        if self.identity.kind.is_trigger:
            with self._lock:
                self._arrive()
                self._selected = fifo

    def write_register(self, register: str, value: int) -> None:
        with self._lock:
            if register not in self._registers:
                raise KeyError(register)
            self._registers[register] = value & 0xFFFFFFFF

    def read_register(self, register: str) -> int:
        with self._lock:
            return self._registers[register]


class FixedWordsCrate(Crate):
    """The configured boards, in card order, each replaying its fixed event."""

    def __init__(self, config: CrateConfig) -> None:
        self._origin_ns = time.monotonic_ns()
        self.boards = [
            FixedWordsBoard(
                BoardIdentity(b.name, b.kind, b.slot, b.card), b.package_data, self._origin_ns
            )
            for b in sorted(config.boards, key=lambda b: b.card)
        ]

    def clock_origin_ns(self) -> int:
        return self._origin_ns


def unreachable_crate(config: CrateConfig) -> Crate:
    """A driver whose hardware does not answer: start-up must stop with its message."""
    raise OSError(f"no VME bridge for crate {config.crate}")

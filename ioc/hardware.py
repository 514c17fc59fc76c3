"""The hardware interface between inLoop and a crate's boards.

inLoop never touches hardware directly: it talks to one `Board` per VME board
through the few operations the original IOC performed with VME registers.
`sim/` implements this interface; a real VME or network digitizer driver
implements exactly this and nothing else in the IOC changes (`ioc.backends` says
how a backend is named in the configuration). `tests/backend_conformance.py`
checks a backend against the contract written here.

All FIFO data are 32-bit words stored big-endian (numpy dtype ``>u4``), which
is also the byte order on the wire, so read words go to the socket unchanged.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

import numpy as np

#: Word dtype of every buffer, FIFO and wire payload.
WORD = np.dtype(">u4")
#: Cards (VME slots) a crate IOC serves: the per-card PVs and counters (spec 03) have this many.
CARDS = 7

#: Number of FIFOs a DGS master trigger exposes (indexed 0..15, see FifoNum).
TRIGGER_FIFOS = 16

#: FifoNum index of the master trigger's main data FIFO (the boot default).
MAIN_DATA_FIFO = 6


class BoardKind(enum.Enum):
    """What a board is, as named in the configuration."""

    DIGITIZER_MASTER = "digitizer_master"
    DIGITIZER_SLAVE = "digitizer_slave"
    TRIGGER_MASTER = "trigger_master"

    @property
    def board_type(self) -> int:
        """The BoardType code (03-pvs.md): 12 AMD, 13 ASD, 4 DMT."""
        return _BOARD_TYPE_CODES[self]

    @property
    def is_trigger(self) -> bool:
        return self is BoardKind.TRIGGER_MASTER


_BOARD_TYPE_CODES = {
    BoardKind.DIGITIZER_MASTER: 12,
    BoardKind.DIGITIZER_SLAVE: 13,
    BoardKind.TRIGGER_MASTER: 4,
}


@dataclass(frozen=True)
class BoardIdentity:
    """Who a board is: fixed for the life of the IOC."""

    name: str
    kind: BoardKind
    slot: int
    card: int

    @property
    def board_type(self) -> int:
        return self.kind.board_type


@dataclass(frozen=True)
class FifoStatus:
    """One status poll of a FIFO.

    ``depth_words`` is event-bounded: it counts complete events only, so a read
    of exactly that many words never splits an event.
    """

    full: bool
    almost_full: bool
    empty: bool
    depth_words: int


class ReadError(Exception):
    """A FIFO transfer (the "DMA") failed; the board needs a FIFO reset."""


class Board(abc.ABC):
    """One board of a crate, as inLoop sees it: the contract every backend keeps.

    Trigger boards have several FIFOs; the ``fifo`` argument selects one of
    them and is ignored by digitizers (which have one).

    Threads: the inLoop thread makes every FIFO, logic and timestamp call, one at a
    time; the register thread (`ioc.register_io`) calls `read_register` and
    `write_register` at the same time, so a board serialises its own state (a lock).
    Time: inLoop calls `status` and `read` on every board in its scan loop and must
    come back to each board well within a FIFO's fill time, so neither may block for
    more than a few milliseconds (a read of up to 1 MiB included); the set-up calls
    are made at Start, Stop and after a fault and may take tens of milliseconds.
    Errors: only `read` and `read_register` may fail in normal operation (`ReadError`);
    any other exception is a backend fault that inLoop or the register thread logs.
    """

    identity: BoardIdentity

    @property
    @abc.abstractmethod
    def package_data(self) -> int:
        """The user package data (board id) last programmed (or configured at start)."""

    @abc.abstractmethod
    def status(self, fifo: int = 0) -> FifoStatus:
        """Poll the FIFO flags and event-bounded depth (a few ms at most; never raises).

        The depth counts whole events only and never decreases except by `read`
        and `reset_fifo`; while master logic is off it no longer grows.
        """

    @abc.abstractmethod
    def read(self, out: np.ndarray, nwords: int, fifo: int = 0) -> int:
        """Copy ``nwords`` words from the FIFO into ``out`` (a ``>u4`` view).

        ``nwords`` is at most the depth the last `status` reported, so a read never
        splits an event; the words leave the FIFO. Returns the number of words copied
        (inLoop treats fewer than ``nwords`` as a failed transfer). Raises `ReadError`
        when the transfer fails; the words it would have copied and the FIFO position
        are then undefined, and inLoop resets the FIFO. A few ms at most.
        """

    @abc.abstractmethod
    def reset_fifo(self, fifo: int = 0) -> None:
        """Empty the FIFO and clear its full/almost-full flags: `status` then reports
        empty with depth 0 until new events enter."""

    @abc.abstractmethod
    def set_master_logic(self, on: bool) -> None:
        """Enable or disable data taking: nothing enters any FIFO while off; events
        already in a FIFO stay readable. Idempotent."""

    @abc.abstractmethod
    def reinit_pipeline(self) -> None:
        """Re-initialise the acquisition pipeline (digitizers, at run start)."""

    @abc.abstractmethod
    def latch_timestamp(self) -> int:
        """Latch and return the board's 48-bit timestamp (10 ns ticks since
        `Crate.clock_origin_ns`), non-decreasing between calls and never older than an
        event `read` has already returned (the time order of the board's headers and
        events depends on it); a few ms at most."""

    @abc.abstractmethod
    def set_package_data(self, value: int) -> None:
        """Program the 12-bit user package data (board id) put in every packet;
        `package_data` returns it from then on."""

    @property
    def fifo_words(self) -> int | None:
        """The capacity of each of the board's FIFOs in words, None if the backend cannot tell.

        Only statistics use it (FifoPeak = depth / capacity); it must not touch the
        hardware, as it is read once per run. With None, FifoPeak stays 0.
        """
        return None

    def select_fifo(self, fifo: int) -> None:  # noqa: B027 - digitizers have one FIFO
        """Route a trigger board's packets to FIFO ``fifo`` (0..15, set at Start);
        digitizers ignore it."""

    @abc.abstractmethod
    def write_register(self, register: str, value: int) -> None:
        """Write the whole 32-bit ``register``, named as in the original's register map
        (``reg_led_threshold0``); raises KeyError for a register the board does not have.

        Bit fields are the caller's business (read, modify, write): the IOC's register
        records do that, as the original's asynMask device support did. A status register
        the board only reports (the original's ``regin_*``) raises ValueError.
        """

    @abc.abstractmethod
    def read_register(self, register: str) -> int:
        """The 32-bit value of ``register`` as the board reports it now (KeyError if unknown);
        a written control register reads back what was written. A few ms at most.

        Raises `ReadError` when the board cannot be read now (a bus error, a lost link):
        the IOC then shows the board's readbacks INVALID, holds the register writes made
        meanwhile and applies them, and refreshes every readback, once a read succeeds."""


class Crate(abc.ABC):
    """A crate: its boards and the clock their timestamps count from.

    ``boards`` is fixed once built: one `Board` per configured board, in card order,
    with the configured identities (unique names, cards and slots). Building a crate
    (the backend factory, called before the EPICS servers start) may take seconds and
    raises with a message for the user when the hardware cannot be reached.
    """

    boards: list[Board]

    @abc.abstractmethod
    def clock_origin_ns(self) -> int:
        """``time.monotonic_ns()`` at timestamp 0, to map timestamps to wall time."""

    def wait_ready(self) -> None:  # noqa: B027 - most backends are ready once built
        """Block until a crate whose start goes on in the background (a process its factory
        started) can be used; raises with a message for the user as the factory would.
        Called once, after the IOC built its records and before its servers start."""

    def before_run(self) -> None:  # noqa: B027 - most backends have no link to look for
        """Every Start, before inLoop sets the boards up: a backend whose link to the crate
        is lost and looked for only now and then (reads come every few ms) looks for it
        now, so a run started as soon as the crate is back reads from its first poll.
        Returns within a second and raises nothing: a crate still lost shows as read
        errors, as during a run."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """IOC exit, after the last run ended: release what the backend holds (a process it
        started, mappings, connections). Called once; no other call follows."""

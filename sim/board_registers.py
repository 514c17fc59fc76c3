"""A simulated board's register file: power-on values, reads, writes, live registers.

The map itself (names, fields, power-on values) is `sim.registers`; this is the
part of `sim.board.SimBoard` that holds one board's values and serves them. It is
a mixin, not a separate object, because the register file and the FIFOs share
the board's lock and a write must first bring the FIFO up to the clock, so that
a setting applies to the events arriving after it. What a written setting does
to event generation is the board's business (`_apply_settings`).
"""

from __future__ import annotations

import abc
import threading
from typing import TYPE_CHECKING

from ioc.hardware import BoardIdentity
from ioc.packets import TIMESTAMP_MASK
from sim import registers
from sim.clock import CrateClock

if TYPE_CHECKING:
    from sim.board import SimBoardSpec


def check_package_data(value: int) -> int:
    if not 0 <= value <= 0xFFF:
        raise ValueError(f"package data is 12 bits (0..4095), not {value}")
    return value


class BoardRegisters(abc.ABC):
    """The register half of a simulated board; the board sets ``_registers`` and
    ``_package_data`` up and provides the lock, the clock and `_catch_up`."""

    #: The register whose low 12 bits are the package data (board id) in packets.
    PACKAGE_DATA_REGISTER: str

    identity: BoardIdentity
    _lock: threading.Lock
    _clock: CrateClock
    _registers: dict[str, int]
    _package_data: int

    @abc.abstractmethod
    def _catch_up(self) -> None:
        """Bring the FIFO contents up to the clock (lock held)."""

    @abc.abstractmethod
    def _apply_settings(self, register: str, value: int) -> None:
        """Make event generation follow a register just written (lock held)."""

    def _power_on(self, spec: SimBoardSpec, package_data: int) -> dict[str, int]:
        """The register file as configured, before any write."""
        return registers.power_on(spec.kind, package_data)

    def _decode_registers(self) -> None:
        """Derive the generation settings from the register file (lock held, caught up).

        Subclasses that filter events set ``_channel_shares``, the fraction of each
        channel's events that are produced; the arrival rate follows their sum, so a
        filtered channel's rate falls instead of its events being made and thrown away.
        """
        self._package_data = registers.PACKAGE_DATA.get(self._registers[self.PACKAGE_DATA_REGISTER])

    def _live_register(self, register: str, caught_up: bool = False) -> int | None:
        """The value of a register that reports live board state, else None (lock held;
        ``caught_up``: the FIFO is already up to the clock)."""
        return None

    def _latched(self, timestamp: int) -> None:  # noqa: B027 - optional hook
        """Put a latched timestamp where the board's registers show it (lock held)."""

    @property
    def package_data(self) -> int:
        with self._lock:
            return self._package_data

    def set_package_data(self, value: int) -> None:
        """The package data (board id) of packets from now on: the low 12 bits of
        the package-data register, the other bits kept."""
        check_package_data(value)
        with self._lock:
            self._catch_up()
            register = self._registers[self.PACKAGE_DATA_REGISTER]
            self._store(self.PACKAGE_DATA_REGISTER, registers.PACKAGE_DATA.put(register, value))

    def latch_timestamp(self) -> int:
        with self._lock:
            timestamp = self._clock.now_ticks() & TIMESTAMP_MASK
            self._latched(timestamp)
            return timestamp

    def write_register(self, register: str, value: int) -> None:
        """Store ``value`` (cut to 32 bits); settings it changes apply to events arriving after.

        ValueError for a read-only (``regin_*``) register.
        """
        with self._lock:
            if register not in self._registers:
                raise KeyError(register)
            if registers.is_read_only(register):
                raise ValueError(f"{self.identity.name}: {register} is read-only")
            self._catch_up()
            self._store(register, int(value) & registers.REGISTER_MASK)

    def _store(self, register: str, value: int) -> None:
        """Write a register and apply it (lock held, events so far built)."""
        self._registers[register] = value
        self._apply_settings(register, value)

    def read_register(self, register: str) -> int:
        with self._lock:
            value = self._registers[register]
            live = self._live_register(register)
            return value if live is None else live

    # The crate process's register image (`sim.process`).

    def register_names(self) -> list[str]:
        """Every register the board has, in a fixed order (the window's register image)."""
        with self._lock:
            return sorted(self._registers)

    def live_register_names(self) -> list[str]:
        """The registers whose value follows the board's state (timestamp, event counts)."""
        with self._lock:
            names = sorted(self._registers)
            return [name for name in names if self._live_register(name) is not None]

    def register_values(self, names: list[str]) -> list[int]:
        """What `read_register` would return for each of ``names``, read at one instant
        (the FIFO brought up to the clock once, not once per event counter)."""
        with self._lock:
            self._catch_up()
            values = []
            for name in names:
                live = self._live_register(name, caught_up=True)
                values.append(self._registers[name] if live is None else live)
            return values

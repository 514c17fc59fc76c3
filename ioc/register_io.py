"""Register records <-> boards: client writes reach the board, readbacks show the board.

After a client writes a record whose value reaches register outputs (the output
itself, or a user-level ``ao`` whose link set its ``...LONGOUT``, or a fan-out),
`ioc.access` reports the record name here. One worker thread then, for each
output, reads the record's new value, merges its bit field into the 32-bit
register (read, modify, write through `ioc.hardware.Board`) and refreshes every
record showing that register. At start, and then every second as the original
scanned them, it reads every register a readback shows and updates the
readbacks whose register changed.

Bit fields follow the original's device support (asyn's asynUInt32Digital with
the crate driver's width/shift fields): ``bo`` sets the whole mask when 1;
``mbbo`` puts the state's value shifted into the mask; ``longout`` puts its
value shifted into the mask. Readbacks invert that: ``bi`` is 1 when any mask bit
is set, ``mbbi`` selects the state whose value is in the field, ``longin`` shows
the field shifted down (a whole register as a signed 32-bit number, as asyn does).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Mapping

from softioc import fields
from softioc.imports import db_get_field, db_put_field_process

from ioc.hardware import Board
from ioc.register_db import Bound, RegisterPlan

REGISTER_BITS = 0xFFFFFFFF
#: Seconds between two reads of every register shown by a readback.
POLL_S = 1.0
#: Registers the records write change only by those writes (followed at once) and by
#: the IOC's own run control (package data, master logic at Start): read every few
#: polls, so polling costs the idle crate little.
SETTINGS_EVERY = 5
_STOP = object()

log = logging.getLogger("dgs.registers")


def field_bits(record: Bound, value: int) -> int:
    """The register bits an output record's value stands for (within its mask)."""
    binding = record.binding
    if record.rtype == "bo":
        return binding.mask if value else 0
    if record.rtype == "mbbo":
        states = record.states
        value = states[value] if 0 <= value < len(states) else 0
    return (value << binding.shift) & binding.mask


def merged(register: int, record: Bound, value: int) -> int:
    """``register`` with the record's bit field replaced, the other bits kept."""
    return (register & ~record.binding.mask & REGISTER_BITS) | field_bits(record, value)


def shown(record: Bound, register: int) -> int | None:
    """The value a readback record shows for ``register`` (None: no state matches)."""
    bits = (register & record.binding.mask) >> record.binding.shift
    if record.rtype == "bi":
        return int(bits != 0)
    if record.rtype == "mbbi":
        return record.states.index(bits) if bits in record.states else None
    return ctypes.c_int32(bits).value


def _get_long(name: str) -> int:
    value = ctypes.c_int32()
    db_get_field(name, fields.DBF_LONG, ctypes.addressof(value), 1)
    return value.value


def _put_long(name: str, value: int) -> None:
    data = ctypes.c_int32(value)
    db_put_field_process(name, fields.DBF_LONG, ctypes.addressof(data), 1, True)


class RegisterIO:
    """Moves register values between the records and the boards, on one worker thread."""

    def __init__(
        self, boards: Mapping[str, Board], plan: RegisterPlan, poll_s: float = POLL_S
    ) -> None:
        self._boards = boards
        self._plan = plan
        self._poll_s = poll_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._missing: set[tuple[str, str]] = set()
        self._shown: dict[tuple[str, str], int] = {}  # register value the readbacks show
        written = {(out.board, out.binding.register)
                   for outputs in plan.outputs.values() for out in outputs}
        #: Readback registers no record writes (status, counters, clocks): read every poll.
        self._status = [key for key in plan.readbacks if key not in written]
        self._polls = 0
        self._thread = threading.Thread(target=self._run, name="registers", daemon=True)

    def start(self) -> None:
        """Refresh every readback from the boards, then follow client writes and poll."""
        self._thread.start()

    def written(self, name: str) -> None:
        """A client wrote record ``name`` (called from the CA/PVA server threads)."""
        if name in self._plan.outputs:
            self._queue.put(name)

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        self._poll()
        self._log_missing()
        next_poll = time.monotonic() + self._poll_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if item is None:
                    next_poll = time.monotonic() + self._poll_s
                    self._poll()
                else:
                    for output in self._plan.outputs[item]:
                        self._write(output)
            except Exception:
                log.exception("register update (%s) failed", item or "poll")

    def _poll(self) -> None:
        """Show what the boards hold now (the original scanned its readbacks each second;
        settings are read every `SETTINGS_EVERY` polls, status registers every poll)."""
        keys = self._status if self._polls % SETTINGS_EVERY else self._plan.readbacks
        self._polls += 1
        for board, register in keys:
            if (board, register) not in self._missing:
                self._refresh(board, register)

    def _log_missing(self) -> None:
        for board in self._boards:
            missing = sorted(register for name, register in self._missing if name == board)
            if missing:
                log.warning(
                    "%s: %d registers of the map are not on the board (%s, ...): "
                    "their records stay as they are", board, len(missing), ", ".join(missing[:3]),
                )

    def _read(self, board: str, register: str, *, quiet: bool = True) -> int | None:
        """The register's value, or None (logged once) when the board does not have it."""
        try:
            return self._boards[board].read_register(register)
        except KeyError:
            if not quiet and (board, register) not in self._missing:
                log.warning("%s has no register %s: the write is not applied", board, register)
            self._missing.add((board, register))
            return None

    def _write(self, output: Bound) -> None:
        register = output.binding.register
        current = self._read(output.board, register, quiet=False)
        if current is None:
            return
        value = merged(current, output, _get_long(output.name))
        self._boards[output.board].write_register(register, value)
        log.debug("%s: %s = 0x%08x", output.board, register, value)
        self._refresh(output.board, register)

    def _refresh(self, board: str, register: str) -> None:
        """Put the register's value into its readbacks if it differs from what they show."""
        records = self._plan.readbacks.get((board, register), ())
        value = self._read(board, register) if records else None
        if value is None or self._shown.get((board, register)) == value:
            return
        self._shown[(board, register)] = value
        for record in records:
            shown_value = shown(record, value)
            if shown_value is not None:
                _put_long(record.name, shown_value)
            for reader in self._plan.readers.get(record.name, ()):
                _put_long(f"{reader}.PROC", 1)

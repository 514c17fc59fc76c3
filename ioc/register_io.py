"""Register records <-> boards: client writes reach the board, readbacks show the board.

After a client writes a record whose value reaches register outputs (the output
itself, or a user-level ``ao`` whose link set its ``...LONGOUT``, or a fan-out),
`ioc.access` reports the record name here. One worker thread then, for each
output, reads the record's new value, merges its bit field into the 32-bit
register (read, modify, write through `ioc.hardware.Board`) and refreshes every
record showing that register. At start, and then every second as the original
scanned them, it reads every register a readback shows and updates the
readbacks whose register changed.

A board whose registers cannot be read (`ioc.hardware.ReadError`: its crate
process is gone, say) has its readbacks shown INVALID (alarm status DISABLE,
through each record's DISA/DISS fields: they are plain soft records) until a
read succeeds again; then every readback is refreshed, and the writes made
meanwhile are applied, so an operator's setting is not lost with the link.

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

from ioc.hardware import Board, ReadError
from ioc.register_db import Bound, RegisterPlan

REGISTER_BITS = 0xFFFFFFFF
#: Seconds between two reads of every register shown by a readback.
POLL_S = 1.0
#: Registers the records write change only by those writes (followed at once) and by
#: the IOC's own run control (package data, master logic at Start): read every few
#: polls, so polling costs the idle crate little.
SETTINGS_EVERY = 5
#: menuAlarmSevr INVALID: what a readback of a board that cannot be read shows.
INVALID_SEVERITY = 3
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


def _put_long(name: str, value: int, *, process: bool = True) -> None:
    data = ctypes.c_int32(value)
    db_put_field_process(name, fields.DBF_LONG, ctypes.addressof(data), 1, process)


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
        #: Boards whose registers could not be read at the last try (readbacks INVALID).
        self._unreachable: set[str] = set()
        #: Board -> writes made while it could not be read, applied once it answers.
        self._pending: dict[str, dict[tuple[str, str], Bound]] = {}
        self._board_keys: dict[str, list[tuple[str, str]]] = {}
        for key in plan.readbacks:
            self._board_keys.setdefault(key[0], []).append(key)
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
        for board in sorted(self._unreachable):
            self._probe(board)
        for board, register in keys:
            if (board, register) not in self._missing and board not in self._unreachable:
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
        """The register's value, or None when the board does not have it (logged once)
        or cannot be read now (its readbacks then go INVALID until it answers)."""
        try:
            return self._boards[board].read_register(register)
        except KeyError:
            if not quiet and (board, register) not in self._missing:
                log.warning("%s has no register %s: the write is not applied", board, register)
            self._missing.add((board, register))
        except ReadError as err:
            self._lose(board, err)
        return None

    def _lose(self, board: str, err: ReadError) -> None:
        """Show every readback of ``board`` INVALID: its values are no longer the board's."""
        if board in self._unreachable:
            return
        self._unreachable.add(board)
        log.warning("%s: registers cannot be read (%s): its readbacks show INVALID "
                    "until it answers", board, err)
        for key in self._board_keys.get(board, ()):
            self._shown.pop(key, None)
            for record in self._plan.readbacks[key]:
                _put_long(f"{record.name}.DISS", INVALID_SEVERITY, process=False)
                _put_long(f"{record.name}.DISA", 1, process=False)
                _put_long(f"{record.name}.PROC", 1)
                for reader in self._plan.readers.get(record.name, ()):
                    _put_long(f"{reader}.PROC", 1)

    def _probe(self, board: str) -> None:
        """Try an unreachable board again; once it answers, show it and apply what waited."""
        board_keys = self._board_keys[board]
        try:
            self._boards[board].read_register(board_keys[0][1])
        except ReadError:
            return
        except KeyError:
            pass  # it answered, without that register (logged at start)
        self._unreachable.discard(board)
        pending = self._pending.pop(board, {})
        log.info("%s: registers answer again: readbacks refreshed, %d waiting write(s) applied",
                 board, len(pending))
        for key in board_keys:
            for record in self._plan.readbacks[key]:
                _put_long(f"{record.name}.DISA", 0, process=False)
        for output in pending.values():
            self._write(output)
        for key in board_keys:
            if key not in self._missing:
                self._refresh(*key, every_record=True)

    def _write(self, output: Bound) -> None:
        register = output.binding.register
        current = None
        if output.board not in self._unreachable:
            current = self._read(output.board, register, quiet=False)
        if current is None:
            if output.board in self._unreachable:
                log.info("%s: applied when %s answers again", output.name, output.board)
                self._pending.setdefault(output.board, {})[(output.name, register)] = output
            return
        value = merged(current, output, _get_long(output.name))
        self._boards[output.board].write_register(register, value)
        log.debug("%s: %s = 0x%08x", output.board, register, value)
        self._refresh(output.board, register)

    def _refresh(self, board: str, register: str, *, every_record: bool = False) -> None:
        """Put the register's value into its readbacks if it differs from what they show
        (``every_record``: also process those whose value has no state, clearing an alarm)."""
        records = self._plan.readbacks.get((board, register), ())
        value = self._read(board, register) if records else None
        if value is None or self._shown.get((board, register)) == value:
            return
        self._shown[(board, register)] = value
        for record in records:
            shown_value = shown(record, value)
            if shown_value is not None:
                _put_long(record.name, shown_value)
            elif every_record:
                _put_long(f"{record.name}.PROC", 1)
            for reader in self._plan.readers.get(record.name, ()):
                _put_long(f"{reader}.PROC", 1)

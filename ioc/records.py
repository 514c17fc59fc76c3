"""Builds the pythonSoftIOC records of `ioc.pvs.PV_TABLE` and publishes to them.

Writable records check every client put against the table (range, enum
index, integral, evenness) plus any run-time rule the IOC adds (unique package
data, faults only while running), inside EPICS's ``dbPut`` (ioc.putcheck): a
refused put leaves the value unchanged, raises no alarm, and every Channel
Access client, plain or put-callback, is told the write failed; PV Access puts
are refused when the record processes (ioc.putcheck says why). Publication goes
through `Records.publish`, which skips values that did not change, because
every record update costs CPU. Every record carries the access-security group
of its table row in ASG (rules: db/dgs.acf, loaded by ioc/access.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from softioc import alarm, builder

from ioc.putcheck import PutCheck
from ioc.pvs import PV, Alarm, Instance, Severity
from ioc.recfields import array_severity, derived_fields

#: A run-time rule: returns None to accept a put, or the reason to refuse it.
Rule = Callable[[Instance, Any], str | None]
#: Called (on the dispatcher thread) after an accepted put.
Handler = Callable[[Instance, Any], None]

_DESC_MAX = 40
#: Writable record types whose value is a whole number.
INTEGRAL = frozenset({"longout", "bo", "mbbo"})
#: (severity, status) an array record shows for a table severity (HIGH/HIHI thresholds).
_ARRAY_ALARM = {
    Severity.NO_ALARM: (alarm.NO_ALARM, alarm.NO_ALARM),
    Severity.MINOR: (alarm.MINOR_ALARM, alarm.HIGH_ALARM),
    Severity.MAJOR: (alarm.MAJOR_ALARM, alarm.HIHI_ALARM),
}

log = logging.getLogger("dgs.records")


def table_check(pv: PV, value: Any) -> str | None:
    """The PV table's own rule for a put: None if accepted, else why not."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    if pv.record in INTEGRAL and not float(value).is_integer():
        return f"{value} is not an integer"
    if pv.enums and not (0 <= value < len(pv.enums)):
        return f"enum index {value} out of range 0..{len(pv.enums) - 1}"
    if pv.low is not None and value < pv.low:
        return f"{value} below {pv.low:g}"
    if pv.high is not None and value > pv.high:
        return f"{value} above {pv.high:g}"
    if pv.record == "ao" and pv.high == 1 and value not in (0, 1):
        return f"{value} is not 0 or 1"
    if pv.even and int(value) % 2:
        return f"{value} is not even"
    return None


def _reprocess_later(record) -> None:
    """Process a record again with its kept value, from another thread.

    A refused NaN/inf still leaves an ao record in UDF/INVALID alarm for the
    processing that refused it; one more processing with the unchanged value
    clears it, so a refused put leaves no trace on a screen.
    """
    threading.Thread(target=lambda: record.set(record.get()), daemon=True).start()


class Records:
    """The records of one IOC, keyed by (table key, card/slot index or board name)."""

    def __init__(
        self,
        instances: Iterable[Instance],
        *,
        initial: Callable[[Instance], Any] | None = None,
        rules: dict[str, Rule] | None = None,
        handlers: dict[str, Handler] | None = None,
        lengths: dict[str, int] | None = None,
    ) -> None:
        self.instances = list(instances)
        #: Waveform lengths the configuration sets instead of the table's, by key.
        self._lengths = lengths or {}
        self._rules = rules or {}
        self._handlers = handlers or {}
        self._records: dict[tuple[str, Any], Any] = {}
        self._by_name: dict[str, Instance] = {}
        self.put_check = PutCheck(self.check, self.raw_check)
        self._writable: set[tuple[str, Any]] = set()
        self._published: dict[tuple[str, Any], Any] = {}
        #: Arrays whose severity the IOC sets (waveforms have no alarm fields).
        self._array_alarms: dict[tuple[str, Any], Alarm] = {}
        self._lock = threading.Lock()
        for inst in self.instances:
            value = initial(inst) if initial else None
            if value is None:
                value = inst.pv.initial
            k = self._key(inst.pv.key, inst.index, inst.board)
            self._records[k] = self._build(inst, value)
            if inst.pv.writable:
                self._writable.add(k)
                self._by_name[inst.name] = inst
            if inst.pv.record == "waveform" and inst.pv.alarm is not None:
                self._array_alarms[k] = inst.pv.alarm

    @staticmethod
    def _key(key: str, index: int | None, board: str | None) -> tuple[str, Any]:
        """Per-channel records have both a board and a channel index."""
        if board is not None and index is not None:
            return (key, (board, index))
        return (key, board if board is not None else index)

    def names(self) -> list[str]:
        return [inst.name for inst in self.instances]

    def has(self, key: str, index: int | None = None, board: str | None = None) -> bool:
        return self._key(key, index, board) in self._records

    def get(self, key: str, index: int | None = None, board: str | None = None) -> Any:
        return self._records[self._key(key, index, board)].get()

    def publish(self, key: str, value: Any, index: int | None = None, board: str | None = None):
        """Set an input record (or reset an output one) only if the value changed."""
        k = self._key(key, index, board)
        record = self._records.get(k)
        if record is None:
            return
        with self._lock:
            last = self._published.get(k)
            if isinstance(value, np.ndarray):
                if last is not None and np.array_equal(last, value):
                    return
                self._published[k] = value.copy()
            else:
                if last is not None and last == value:
                    return
                self._published[k] = value
        if k in self._writable:
            with self.put_check.internal():
                record.set(value, process=False)
        elif k in self._array_alarms:
            severity, status = _ARRAY_ALARM[array_severity(self._array_alarms[k], value)]
            record.set(value, severity=severity, alarm=status)
        else:
            record.set(value)

    def return_to(self, key: str, value: Any, board: str | None = None) -> None:
        """Set a command record back to its idle ``value`` after a client's put.

        Unlike `publish` this always writes: `publish` remembers only what the IOC
        wrote, not the client's put in between.
        """
        k = self._key(key, None, board)
        with self._lock:
            self._published[k] = value
        with self.put_check.internal():
            self._records[k].set(value, process=False)

    def _build(self, inst: Instance, value: Any):
        pv = inst.pv
        fields: dict[str, Any] = {"DESC": pv.desc[:_DESC_MAX], "ASG": pv.asg.value}
        if pv.egu:
            fields["EGU"] = pv.egu
        if pv.prec is not None:
            fields["PREC"] = pv.prec
        fields.update(derived_fields(pv))
        if pv.writable:
            fields["validate"] = self._validator(inst)
            handler = self._handlers.get(pv.key)
            if handler is not None:
                fields["on_update"] = lambda v, inst=inst, handler=handler: self._call(
                    handler, inst, v
                )
        name = inst.name
        match pv.record:
            case "ai":
                return builder.aIn(name, initial_value=value, **fields)
            case "ao":
                return builder.aOut(name, initial_value=value, **fields)
            case "longin":
                return builder.longIn(name, initial_value=value, **fields)
            case "longout":
                return builder.longOut(name, initial_value=value, **fields)
            case "bi":
                return builder.boolIn(
                    name, pv.enums[0], pv.enums[1], initial_value=value, **fields
                )
            case "bo":
                return builder.boolOut(
                    name, pv.enums[0], pv.enums[1], initial_value=value, **fields
                )
            case "mbbi":
                return builder.mbbIn(name, *pv.enums, initial_value=value, **fields)
            case "mbbo":
                return builder.mbbOut(name, *pv.enums, initial_value=value, **fields)
            case "stringin":
                return builder.stringIn(name, initial_value=value, **fields)
            case "waveform":
                length = self._lengths.get(pv.key, pv.length)
                return builder.WaveformIn(
                    name, initial_value=np.zeros(length, dtype=pv.dtype), **fields
                )
        raise ValueError(f"{name}: unknown record type {pv.record}")

    def check(self, name: str, value: float | int) -> str | None:
        """Why a client's put of ``value`` to record ``name`` is refused; None accepts it."""
        inst = self._by_name.get(name)
        if inst is None:
            return None
        reason = table_check(inst.pv, value)
        rule = self._rules.get(inst.pv.key)
        if reason is None and rule is not None:
            reason = rule(inst, value)
        return reason

    def raw_check(self, name: str, value: float) -> str | None:
        """The table's check of a client's number before EPICS converts it (no run-time
        rules: those may save the value and run once, on what the record will hold)."""
        inst = self._by_name.get(name)
        return None if inst is None else table_check(inst.pv, value)

    def _validator(self, inst: Instance):
        """The check of a PV Access put, when the record processes (see ioc.putcheck);
        every other put was checked in ``dbPut`` and is not checked twice."""

        def validate(record, value) -> bool:
            if not self.put_check.left_to_processing():
                return True  # checked in dbPut already: the rules (autosave) run once
            reason = self.check(inst.name, value)
            if reason is None:
                return True
            log.warning("refused put %s = %r: %s", inst.name, value, reason)
            if isinstance(value, float) and not math.isfinite(value):
                _reprocess_later(record)
            return False

        return validate

    def install_put_check(self) -> None:
        """Check client puts inside ``dbPut``; after LoadDatabase, before iocInit."""
        samples = {inst.pv.record: inst.name for inst in self._by_name.values()}
        self.put_check.install(samples)

    @staticmethod
    def _call(handler: Handler, inst: Instance, value: Any) -> None:
        """A handler that raises must not leave the record stuck: log and go on."""
        try:
            handler(inst, value)
        except Exception:
            log.exception("handler for %s failed", inst.name)

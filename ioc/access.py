"""Access security and put logging of an IOC, set up before iocInit.

The rules are the text of ``db/dgs.acf`` (`ioc.dbfiles.acf_text`), written to a
private file and handed to EPICS with ``asSetFilename`` so ``iocInit`` enforces
them for Channel Access and PV Access alike: statistics refuse writes always,
and with ``run_protect = true`` the crate set-up refuses them during a run.
Every write a rule lets through with TRAPWRITE is logged as who (user@host),
which PV, old value -> new value, so a changed set-up can be traced to a person.
After the write, the record's name is passed to every listener added with
`on_write` (the register records reach the boards this way, `ioc.register_io`).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from epicscorelibs.ioc import dbCore

from ioc.dbfiles import acf_text
from ioc.putcheck import PutCheck

#: ``DBR_STRING`` of db_access.h and the size of one EPICS string.
DBR_STRING = 0
MAX_STRING = 40

log = logging.getLogger("dgs.access")
put_log = logging.getLogger("dgs.puts")


class _TrapWriteMessage(ctypes.Structure):
    """``asTrapWriteMessage`` of asTrapWrite.h."""

    _fields_ = (
        ("userid", ctypes.c_char_p),
        ("hostid", ctypes.c_char_p),
        ("channel", ctypes.c_void_p),  # serverSpecific: the dbChannel for RSRV and QSRV
        ("user_pvt", ctypes.c_void_p),
        ("dbr_type", ctypes.c_int),
        ("no_elements", ctypes.c_int),
        ("data", ctypes.c_void_p),
    )


_Listener = ctypes.CFUNCTYPE(None, ctypes.POINTER(_TrapWriteMessage), ctypes.c_int)

_set_filename = dbCore.asSetFilename
_set_filename.argtypes = (ctypes.c_char_p,)
_set_filename.restype = ctypes.c_int
_register_listener = dbCore.asTrapWriteRegisterListener
_register_listener.argtypes = (_Listener,)
_register_listener.restype = ctypes.c_void_p
_channel_get = dbCore.dbChannelGetField
_channel_get.argtypes = (
    ctypes.c_void_p,
    ctypes.c_short,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_long),
    ctypes.c_void_p,
)
_channel_get.restype = ctypes.c_long


def _channel_name(channel: int | None) -> str:
    """The name the client asked for (``dbChannel.name``, the struct's first member)."""
    if not channel:
        return "?"
    name = ctypes.cast(channel, ctypes.POINTER(ctypes.c_char_p))[0]
    return name.decode(errors="replace") if name else "?"


def _channel_value(channel: int | None) -> str:
    """The field's value as EPICS formats it (enum strings, PREC); first element of arrays."""
    if not channel:
        return "?"
    buffer = ctypes.create_string_buffer(MAX_STRING)
    count = ctypes.c_long(1)
    if _channel_get(channel, DBR_STRING, buffer, None, ctypes.byref(count), None) != 0:
        return "?"
    return buffer.value.decode(errors="replace")


#: CA DBR type codes of a client's put (db_access.h) and their C types.
_CA_VALUE_TYPES = {1: ctypes.c_int16, 2: ctypes.c_float, 3: ctypes.c_uint16,
                   4: ctypes.c_uint8, 5: ctypes.c_int32, 6: ctypes.c_double}
#: Called before a client's put with the record name and the client's unconverted value.
RawCheck = Callable[[str, object], None]


def _raw_value(message: _TrapWriteMessage) -> object:
    """The first element of what the client sent, before EPICS converts it."""
    if not message.data or message.no_elements < 1:
        return None
    if message.dbr_type == 0:
        return ctypes.string_at(message.data).decode(errors="replace")
    ctype = _CA_VALUE_TYPES.get(message.dbr_type)
    return ctype.from_address(message.data).value if ctype else None


def _value_record(channel: str) -> str | None:
    """The record of a channel that writes its value (``REC`` or ``REC.VAL``), else None."""
    record, _, field = channel.partition(".")
    return record if field in ("", "VAL") else None


class PutLogger:
    """Logs every trapped write: before it, remember the old value; after it, log the change
    and tell the listeners which record was written.

    Before the write it also hands the client's raw value to ``raw_check`` (the put
    check's veto, which EPICS's own conversion would otherwise hide)."""

    def __init__(self, logger: logging.Logger = put_log, raw_check: RawCheck | None = None,
                 after_check: Callable[[str], None] | None = None) -> None:
        self._log = logger
        self._raw_check = raw_check
        self._after_check = after_check
        self.listeners: list[Callable[[str], None]] = []
        self._pending: dict[int, tuple[str, str]] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._callback = _Listener(self._on_write)  # kept alive as long as EPICS holds it

    def register(self) -> None:
        _register_listener(self._callback)

    def _on_write(self, message_p, after: int) -> None:
        try:
            message = message_p.contents
            if not after:
                token = next(self._tokens)
                name = _channel_name(message.channel)
                with self._lock:
                    self._pending[token] = (name, _channel_value(message.channel))
                message.user_pvt = token
                record = _value_record(name)
                if self._raw_check is not None and record is not None:
                    self._raw_check(record, _raw_value(message))
                return
            with self._lock:
                name, old = self._pending.pop(message.user_pvt or 0, ("?", "?"))
            record = _value_record(name)
            if self._after_check is not None and record is not None:
                self._after_check(record)
            new = _channel_value(message.channel)
            who = f"{_text(message.userid)}@{_text(message.hostid)}"
            if new == old:
                self._log.info("put %s by %s: %s (unchanged)", name, who, old)
            else:
                self._log.info("put %s by %s: %s -> %s", name, who, old, new)
            written = name.partition(".")[0]
            for listener in self.listeners:
                listener(written)
        except Exception:
            log.exception("put log failed")


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else "?"


_put_logger: PutLogger | None = None


def write_rules(text: str) -> Path:
    """Write the rules to a private file EPICS can read at iocInit; removed at exit."""
    fd, name = tempfile.mkstemp(prefix="dgs-", suffix=".acf")
    with os.fdopen(fd, "w") as file:
        file.write(text)
    path = Path(name)
    atexit.register(path.unlink, missing_ok=True)
    return path


def on_write(listener: Callable[[str], None]) -> None:
    """Call ``listener(record name)`` after every client write to a trapped record;
    it runs on the server's thread, so it must only hand the work on."""
    if _put_logger is None:
        raise RuntimeError("access.install() first")
    _put_logger.listeners.append(listener)


def install(run_protect: bool, put_check: PutCheck | None = None) -> Path:
    """Load the access-security rules (db/dgs.acf, or db/dgs-run-protect.acf with
    ``run_protect``) and log puts; call before iocInit.

    With ``put_check``, a client's raw value is checked before each trapped write."""
    global _put_logger
    path = write_rules(acf_text(run_protect))
    if _set_filename(str(path).encode()) != 0:
        raise RuntimeError(f"asSetFilename({path}) failed")
    if _put_logger is None:
        if put_check is None:
            _put_logger = PutLogger()
        else:
            _put_logger = PutLogger(raw_check=put_check.veto_raw,
                                    after_check=put_check.clear_veto)
        _put_logger.register()
    log.info(
        "access security: %s, writes logged by dgs.puts",
        "run_protect = true: crate set-up writable only while Online_CS_StartStop = Stop"
        if run_protect
        else "crate set-up writable at any time, applied at the next Start",
    )
    return path

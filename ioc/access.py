"""Access security and put logging of an IOC, set up before iocInit.

The rules are the text of ``db/dgs.acf`` (`ioc.dbfiles.acf_text`), written to a
private file and handed to EPICS with ``asSetFilename`` so ``iocInit`` enforces
them for Channel Access and PV Access alike: crate set-up refuses writes during
a run, statistics refuse them always. Every write a rule lets through with
TRAPWRITE is logged as who (user@host), which PV, old value -> new value, so a
changed set-up can be traced to a person. After the write, the record's name is
passed to every listener added with `on_write` (the register records reach the
boards this way, `ioc.register_io`).
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


class PutLogger:
    """Logs every trapped write: before it, remember the old value; after it, log the change
    and tell the listeners which record was written."""

    def __init__(self, logger: logging.Logger = put_log) -> None:
        self._log = logger
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
                with self._lock:
                    self._pending[token] = (
                        _channel_name(message.channel),
                        _channel_value(message.channel),
                    )
                message.user_pvt = token
                return
            with self._lock:
                name, old = self._pending.pop(message.user_pvt or 0, ("?", "?"))
            new = _channel_value(message.channel)
            who = f"{_text(message.userid)}@{_text(message.hostid)}"
            if new == old:
                self._log.info("put %s by %s: %s (unchanged)", name, who, old)
            else:
                self._log.info("put %s by %s: %s -> %s", name, who, old, new)
            record = name.partition(".")[0]
            for listener in self.listeners:
                listener(record)
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


def install() -> Path:
    """Load the access-security rules of db/dgs.acf and log puts; call before iocInit."""
    global _put_logger
    path = write_rules(acf_text())
    if _set_filename(str(path).encode()) != 0:
        raise RuntimeError(f"asSetFilename({path}) failed")
    if _put_logger is None:
        _put_logger = PutLogger()
        _put_logger.register()
    log.info(
        "access security: rules of db/dgs.acf (RUNPROTECT follows Online_CS_StartStop), "
        "writes logged by dgs.puts"
    )
    return path

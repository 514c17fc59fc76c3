"""Refuse a bad put inside EPICS's own ``dbPut``, so every client is told.

pythonSoftIOC checks a put when the record processes, after ``dbPut`` has
succeeded; a put-callback client (``caput -c``, pyepics ``wait=True``, p4p)
hears only the ``dbPut`` status and so saw a refused value as a success. The
one place whose failure every server reports (RSRV plain and callback puts,
QSRV) is ``dbPut`` itself: its "after" special processing may return an
error. So, before iocInit, the VAL field of the output record types gets
special processing (SPC_MOD) and their record support's ``special`` routine is
wrapped: before the put it keeps the old value, after it asks `check`; a
refused value is put back and ``dbPut`` fails, so the record never processes
(no alarm, no monitor update).

PV Access puts are let through ``dbPut``: the IOC's PV Access server (pvxs
1.5.3) dereferences a moved-from pointer when ``dbPut`` fails inside a
blocking put (``record[block=true]``, p4p ``put(wait=True)``) and the whole IOC
dies with a segmentation fault. They are refused one step later, when the
record processes (pythonSoftIOC's validate in ioc.records): a plain PVA put
(``pvput``, p4p ``put``) then reports the error; a blocking one reports
success while the value stays unchanged.

Channel Access converts the client's value to the field type before
``dbPut`` (1.5 becomes 1, "nan" state 0), so the access-security trap-write
hook (ioc.access), which sees the client's raw value, calls `veto_raw`
first; the veto is then applied by the same ``dbPut``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from epicscorelibs.ioc import Com, dbCore

#: special.h: record support's special() is called around puts to the field.
SPC_MOD = 100
#: Negative, so RSRV answers a plain put with ECA_PUTFAIL too (it tests ``status < 0``).
REFUSED = -1
#: Record types built with writable values, and each one's VAL field type.
VALUE_TYPES = {"ao": ctypes.c_double, "longout": ctypes.c_int32,
               "bo": ctypes.c_uint16, "mbbo": ctypes.c_uint16}
#: dbFldTypes.h codes of those VAL fields, checked before anything is patched.
DBF_CODES = {"ao": 10, "longout": 5, "bo": 11, "mbbo": 11}
#: The special each VAL field may have before it is replaced. mbbo's SPC_DBADDR (2) only
#: makes a record without any state strings serve VAL as a plain number; every mbbo
#: here has its states, so SPC_MOD takes its place.
ALLOWED_SPECIALS = {"ao": (0,), "longout": (0,), "bo": (0,), "mbbo": (0, 2)}

#: A check: the record name and its new value; None accepts, else the reason. The raw
#: check sees the client's unconverted number and must have no side effects (the full
#: check may save the value: it runs once, on the value the record will hold).
Check = Callable[[str, float | int], str | None]

log = logging.getLogger("dgs.puts")


class _DbAddr(ctypes.Structure):
    """``dbAddr`` of dbAddr.h."""

    _fields_ = (
        ("precord", ctypes.c_void_p),
        ("pfield", ctypes.c_void_p),
        ("pfldDes", ctypes.c_void_p),
        ("no_elements", ctypes.c_long),
        ("field_type", ctypes.c_short),
        ("field_size", ctypes.c_short),
        ("special", ctypes.c_short),
        ("dbr_field_type", ctypes.c_short),
    )


class _FldDes(ctypes.Structure):
    """The leading members of ``dbFldDes`` (dbBase.h), up to the ones patched."""

    _fields_ = (
        ("prompt", ctypes.c_char_p),
        ("name", ctypes.c_char_p),
        ("extra", ctypes.c_char_p),
        ("pdbRecordType", ctypes.c_void_p),
        ("indRecordType", ctypes.c_short),
        ("special", ctypes.c_short),
        ("field_type", ctypes.c_int),
    )


_Special = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.POINTER(_DbAddr), ctypes.c_int)
#: Index of ``special`` in ``struct typed_rset`` (after number, report, init, init_record, process).
_RSET_SPECIAL = 5

_InitHook = ctypes.CFUNCTYPE(None, ctypes.c_int)
#: initHooks.h: record support is initialised (rsets attached), records are not yet.
INIT_HOOK_AFTER_INIT_REC_SUP = 5
_init_hook_register = Com.initHookRegister
_init_hook_register.argtypes = (_InitHook,)
_init_hook_register.restype = ctypes.c_int
_thread_name = Com.epicsThreadGetNameSelf
_thread_name.argtypes = ()
_thread_name.restype = ctypes.c_char_p
#: Thread names of the PV Access server (pvxs): "PVXTCP", "PVXCTL", ...
PVA_THREAD_PREFIX = b"PVX"
_name_to_addr = dbCore.dbNameToAddr
_name_to_addr.argtypes = (ctypes.c_char_p, ctypes.POINTER(_DbAddr))
_name_to_addr.restype = ctypes.c_long
_get_rset = dbCore.dbGetRset
_get_rset.argtypes = (ctypes.POINTER(_DbAddr),)
_get_rset.restype = ctypes.c_void_p


class PutCheck:
    """The wrapped ``special`` routines and what they need between before and after."""

    def __init__(self, check: Check, raw_check: Check) -> None:
        self._check = check
        self._raw_check = raw_check
        self._old: dict[int, bytes] = {}
        self._vetoes: dict[str, str] = {}
        self._internal = threading.local()
        self._lock = threading.Lock()
        self._value_fields: dict[int, type[ctypes._SimpleCData]] = {}
        self._wrappers: list[_Special] = []  # kept alive as long as EPICS holds them
        self._hook: _InitHook | None = None
        self._failure: Exception | None = None

    def install(self, samples: dict[str, str]) -> None:
        """Patch each record type through one record of it (``samples``: type -> name)
        during iocInit, once record support is initialised and before any client connects;
        call before iocInit, and `confirm` after it."""

        def hook(state: int) -> None:
            if state != INIT_HOOK_AFTER_INIT_REC_SUP:
                return
            try:
                self._patch(samples)
            except Exception as err:  # raised again by confirm(): a ctypes hook cannot
                self._failure = err

        self._hook = _InitHook(hook)
        if _init_hook_register(self._hook) != 0:
            raise RuntimeError("put check: initHookRegister failed")

    def confirm(self) -> None:
        """After iocInit: every record type was patched, or start-up stops here."""
        if self._failure is not None:
            raise RuntimeError(f"put check not installed: {self._failure}")
        if not self._wrappers:
            raise RuntimeError("put check not installed: iocInit never reached record support")

    def _patch(self, samples: dict[str, str]) -> None:
        for rtype, name in samples.items():
            addr = _DbAddr()
            if _name_to_addr(f"{name}.VAL".encode(), ctypes.byref(addr)) != 0:
                raise RuntimeError(f"put check: no record {name}")
            flddes = _FldDes.from_address(addr.pfldDes)
            if flddes.name != b"VAL" or flddes.field_type != DBF_CODES[rtype]:
                raise RuntimeError(f"put check: unexpected {rtype} VAL field layout")
            if flddes.special not in ALLOWED_SPECIALS[rtype]:
                raise RuntimeError(f"put check: {rtype} VAL already has special {flddes.special}")
            rset = ctypes.cast(_get_rset(ctypes.byref(addr)), ctypes.POINTER(ctypes.c_void_p))
            original = rset[_RSET_SPECIAL]
            wrapper = _Special(self._special_for(_Special(original) if original else None))
            self._wrappers.append(wrapper)
            self._value_fields[addr.pfldDes] = VALUE_TYPES[rtype]
            rset[_RSET_SPECIAL] = ctypes.cast(wrapper, ctypes.c_void_p).value
            flddes.special = SPC_MOD

    @contextmanager
    def internal(self) -> Iterator[None]:
        """The IOC's own writes (publishing a value) are not client puts: not checked."""
        self._internal.active = True
        try:
            yield
        finally:
            self._internal.active = False

    def veto_raw(self, record: str, value: object) -> None:
        """Before a client's put: refuse values EPICS's conversion would hide (1.5 or
        1e10 into an integer, NaN into a state); the same ``dbPut`` then fails."""
        number = _number(value)
        if number is None:
            return
        reason = self._raw_check(record, number)
        if reason is not None:
            with self._lock:
                self._vetoes[record] = f"{value}: {reason}"

    @staticmethod
    def left_to_processing() -> bool:
        """Whether the put being made on this thread is let through ``dbPut`` unchecked:
        a PV Access put, checked when the record processes (see the module text)."""
        return _in_pva_server()

    def clear_veto(self, record: str) -> None:
        with self._lock:
            self._vetoes.pop(record, None)

    def _special_for(self, original: _Special | None):
        def special(paddr, after: int) -> int:
            addr = paddr.contents
            field = self._value_fields.get(addr.pfldDes)
            if field is None:
                return original(paddr, after) if original else 0
            try:
                return self._value_special(addr, field, after)
            except Exception:
                log.exception("put check failed")
                return REFUSED

        return special

    def _value_special(self, addr: _DbAddr, field, after: int) -> int:
        size = ctypes.sizeof(field)
        if not after:
            with self._lock:
                self._old[addr.precord] = ctypes.string_at(addr.pfield, size)
            return 0
        with self._lock:
            old = self._old.pop(addr.precord, None)
        if getattr(self._internal, "active", False) or self.left_to_processing():
            return 0
        name = ctypes.string_at(addr.precord).decode()
        with self._lock:
            refusal = self._vetoes.pop(name, None)
        if refusal is None:
            value = field.from_address(addr.pfield).value
            reason = self._check(name, value)
            if reason is None:
                return 0
            refusal = f"{value!r}: {reason}"
        if old is not None:
            ctypes.memmove(addr.pfield, old, size)
        log.warning("refused put %s = %s", name, refusal)
        return REFUSED


def _number(value: object) -> float | None:
    """The client's value as a number, or None for text that is no number (a state name)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, int | float):
        return float(value)
    return None


def _in_pva_server() -> bool:
    """Whether this put comes from the PV Access server's threads."""
    name = _thread_name()
    return bool(name) and name.startswith(PVA_THREAD_PREFIX)

"""Where an IOC serves PV Access, and one IOC's PVs read and written over it (p4p).

One client context per IOC, pinned to that IOC's ``host:pva_port`` as a TCP name
server, so several IOCs on one host never shadow each other and no UDP search is
needed. A crate whose configuration names no ``pva_port`` is looked for where a
PVA client would: ``EPICS_PVA_SERVER_PORT``, else 5075. The globals IOC's PVA
endpoint is ``[system] globals_pva`` of the configuration, by default the
standard port 5075 on the ``globals_ca`` host (where ``dgs-ioc --globals-only``
and ``dgs-system`` serve it); an explicit ``globals_pva`` overrides it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import p4p
from p4p.client.thread import Context
from p4p.nt.enum import ntenum

from ioc.config import DEFAULT_PVA_PORT, CrateConfig, SystemConfig

PUT_TIMEOUT_S = 5.0


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def crate_endpoint(crate: CrateConfig) -> Endpoint:
    """Where the crate serves PVA: its ``pva_port``, else where a PVA client looks by
    default (``EPICS_PVA_SERVER_PORT``, else 5075), as the IOC itself falls back."""
    if crate.pva_port:
        return Endpoint(crate.host, crate.pva_port)
    try:
        port = int(os.environ.get("EPICS_PVA_SERVER_PORT", DEFAULT_PVA_PORT))
    except ValueError:
        port = DEFAULT_PVA_PORT
    return Endpoint(crate.host, port)


def globals_endpoint(system: SystemConfig, globals_pva: str | None = None) -> Endpoint:
    """Where the global records are served over PVA.

    A standalone crate serves them itself; remote globals are at ``globals_pva``
    when given, else where the configuration says (`SystemConfig.globals_pva_endpoint`).
    """
    if globals_pva:
        host, _, port = globals_pva.rpartition(":")
        return Endpoint(host, int(port))
    if system.globals == "local":
        return crate_endpoint(system.crates[0])
    return Endpoint(*system.globals_pva_endpoint)


def quiet_pvxs() -> None:
    """Run control reports unreachable IOCs itself; pvxs would print every retry."""
    p4p._logger_level_set("pvxs.tcp.io", p4p.logLevelFatal)


def _plain(value: Any) -> int | float | str | tuple[float, ...]:
    """A p4p value as plain Python: enums as their index (monitor updates after the
    first one carry no choices), numbers and strings as themselves (p4p's wrappers
    print a time stamp with ``str()``)."""
    if isinstance(value, ntenum | bool | int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, np.ndarray):
        return tuple(float(v) for v in value)
    return repr(value)


class IocLink:
    """One IOC's PVs over PV Access, with a cache kept current by monitors."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._context = Context(
            "pva",
            conf={
                "EPICS_PVA_NAME_SERVERS": str(endpoint),
                "EPICS_PVA_ADDR_LIST": "",
                "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            },
            useenv=False,
        )
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._subscriptions: dict[str, Any] = {}

    def watch(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._subscriptions:
                self._subscriptions[name] = self._context.monitor(
                    name, partial(self._update, name), notify_disconnect=True
                )

    def _update(self, name: str, value: Any) -> None:
        with self._lock:
            if isinstance(value, Exception):
                self._values.pop(name, None)
            else:
                self._values[name] = _plain(value)

    def value(self, name: str) -> Any | None:
        """The last value seen, or None while disconnected."""
        with self._lock:
            return self._values.get(name)

    def snapshot(self, names: Iterable[str]) -> dict[str, Any]:
        with self._lock:
            return {name: self._values[name] for name in names if name in self._values}

    def has_all(self, names: Iterable[str]) -> bool:
        with self._lock:
            return all(name in self._values for name in names)

    def get_many(self, names: Sequence[str], timeout: float = PUT_TIMEOUT_S) -> dict[str, Any]:
        """Current values read now (not the monitors' last), of the names that answered
        within ``timeout``; all of them are asked at once."""
        values = self._context.get(list(names), timeout=timeout, throw=False)
        return {
            name: _plain(value)
            for name, value in zip(names, values, strict=True)
            if not isinstance(value, Exception)
        }

    def put(self, name: str, value: int, timeout: float = PUT_TIMEOUT_S) -> None:
        self._context.put(name, value, timeout=timeout)

    def close(self) -> None:
        for subscription in self._subscriptions.values():
            subscription.close()
        self._subscriptions.clear()
        self._context.close()

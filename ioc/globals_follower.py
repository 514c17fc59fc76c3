"""A crate follows the system's global run-control PVs over Channel Access.

`Online_CS_StartStop`, `Online_CS_SaveData` and `Online_CS_RunNumber` live in
whichever IOC serves the globals (this one, or a globals-only IOC of a
multi-crate system). The crate monitors them and tells run control each
change. After a disconnection the first value to come back is marked as
*restored*: run control compares it with what it already follows instead of
taking it for an operator's put (a globals IOC restarting must not start or
stop a run by itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import epics

GLOBAL_NAMES = ("Online_CS_StartStop", "Online_CS_SaveData", "Online_CS_RunNumber")


class Follower(Protocol):
    """What the followed values are told to (`ioc.runcontrol.RunControl`)."""

    def start_stop_changed(self, value: int, restored: bool = False) -> None: ...
    def save_changed(self, value: int, restored: bool = False) -> None: ...
    def run_number_changed(self, value: int, restored: bool = False) -> None: ...
    def connection_changed(self, connected: bool) -> None: ...


class GlobalsFollower:
    """The monitors of the three globals, their connection state and reconnections."""

    def __init__(self) -> None:
        self._pvs: dict[str, epics.PV] = {}
        self._connected = dict.fromkeys(GLOBAL_NAMES, False)
        self._ever_connected: set[str] = set()
        self._reconnected: set[str] = set()

    def follow(self, follower: Follower) -> None:
        """Monitor the globals from now on; ``follower`` hears every value and connection."""
        handlers = (
            follower.start_stop_changed,
            follower.save_changed,
            follower.run_number_changed,
        )

        def connection(pvname: str | None = None, conn: bool = False, **_: Any) -> None:
            self._connected[pvname] = conn
            if conn and pvname in self._ever_connected:
                self._reconnected.add(pvname)
            elif conn:
                self._ever_connected.add(pvname)
            follower.connection_changed(all(self._connected.values()))

        for name, handler in zip(GLOBAL_NAMES, handlers, strict=True):
            self._pvs[name] = epics.PV(
                name, callback=self._changed(handler), connection_callback=connection,
                auto_monitor=True,
            )

    def _changed(self, handler: Callable[[int, bool], None]) -> Callable[..., None]:
        def changed(pvname: str, value: Any = None, **_: Any) -> None:
            restored = pvname in self._reconnected
            self._reconnected.discard(pvname)
            handler(int(value), restored)

        return changed

    def read_run_number(self, timeout: float) -> int | None:
        """`Online_CS_RunNumber` as the globals hold it now (None if they do not answer)."""
        pv = self._pvs.get(GLOBAL_NAMES[2])
        if pv is None:
            return None
        value = pv.get(use_monitor=False, timeout=timeout)
        return None if value is None else int(value)

    def stop(self) -> None:
        """No callback from now on (the IOC is shutting down)."""
        for pv in self._pvs.values():
            pv.clear_callbacks()

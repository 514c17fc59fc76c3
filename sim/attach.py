"""The IOC's side of a simulated crate process: backend ``"sim"``.

The boards (`sim.procboard`) read FIFOs and registers from the mapped window
(`sim.window`) and make every other call through the command socket
(`sim.commands`); the crate here keeps the window and the sockets, watches that
the crate process is alive and attaches again when it was not.

When the crate process stops answering (no heartbeat for `STALE_S`, the channel
broken, or a command slower than `COMMAND_TIMEOUT_S`) the crate is *lost*: this is
logged once, `status` then shows a little data and `read` raises `ReadError`, so
inLoop counts read errors instead of waiting; set-up calls do nothing and register
reads show the last values. Every `RETRY_S` a call tries to attach again; once a
crate process serves the window again the settings the IOC made (registers,
package data, FIFO selection, SIM_* controls, master logic) are applied to it and
data flow again. A crate process the IOC started itself (``sim_process = "spawn"``)
is started again by the IOC when it ended.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from typing import Any

from ioc.hardware import TRIGGER_FIFOS, BoardIdentity, Crate
from sim.board import SimBoardSpec
from sim.commands import CommandLink, PeerLost
from sim.launch import CrateProcess
from sim.procboard import ProcessBoard
from sim.window import (
    H_BUILDING,
    H_CLOSED,
    H_HEARTBEAT_NS,
    H_ORIGIN_NS,
    BoardLayout,
    Window,
)

#: A heartbeat older than this means the crate process is gone or stuck.
STALE_S = 0.5
COMMAND_TIMEOUT_S = 0.5
#: How long a latch waits for a build of the crate process to end, and how it looks.
BUILD_WAIT_S = 0.010
BUILD_POLL_S = 0.0001
#: How often reads and commands look for a lost crate again (reads come every 20 ms);
#: a Start looks at once (`before_run`).
RETRY_S = 0.25
#: Least time between two starts of a crate process this IOC spawned.
RESTART_S = 2.0
#: How long an attaching IOC waits for the window at start-up.
ATTACH_WAIT_S = 3.0

log = logging.getLogger("dgs.ioc")


def claim_window(name: str) -> socket.socket:
    """Hold window ``name`` for this IOC (RuntimeError if another IOC holds it).

    Two readers of one crate's FIFOs would each get part of its data. The claim is
    a listening Unix socket in the abstract namespace, so the kernel frees it when
    the IOC ends, however it ends, and no file is left behind; another IOC asking
    learns the holder's PID from the connection's credentials.
    """
    address = f"\0dgs-crate-window-claim-{name}"
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(address)
    except OSError:
        claim.close()
        raise RuntimeError(
            f"window {name} is already read by another IOC{_claim_holder(address)}; "
            "one crate has one reader"
        ) from None
    claim.listen(1)
    return claim


def _claim_holder(address: str) -> str:
    """The PID of the process holding the claim at ``address`` as " (pid N)", if it
    answers, else ""."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
            pid, _, _ = struct.unpack("3i", probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return ""
    return f" (pid {pid})"


class ProcessCrate(Crate):
    """A crate served by a `dgs-sim` process through window ``name``."""

    def __init__(
        self, specs: list[SimBoardSpec], name: str, spawned: CrateProcess | None = None
    ) -> None:
        self.name = name
        self._spawned = spawned
        self._layout = [
            BoardLayout(s.name, TRIGGER_FIFOS if s.kind.is_trigger else 1, s.fifo_words)
            for s in sorted(specs, key=lambda s: s.card)
        ]
        self._lock = threading.RLock()
        self._lost: str | None = None
        self._next_try = 0.0
        #: One command connection per calling thread: inLoop never queues behind the
        #: publisher's or the register thread's calls.
        self._links: dict[int, CommandLink] = {}
        self.boards: list[ProcessBoard] = [
            ProcessBoard(self, index, BoardIdentity(s.name, s.kind, s.slot, s.card), s)
            for index, s in enumerate(sorted(specs, key=lambda s: s.card))
        ]
        self._window: Window | None = None
        self._claim = claim_window(name)
        if spawned is None:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Map the window once its crate process serves it (RuntimeError saying why not).

        A spawned crate process starts while the IOC builds its records; the IOC waits
        here before its servers start, and every call waits here if it comes first.
        """
        with self._lock:
            if self._window is not None:
                return
            if self._spawned is not None:
                self._spawned.wait_ready()
            window, link = self._connect(wait_s=0.0 if self._spawned else ATTACH_WAIT_S)
            self._links[threading.get_ident()] = link
            for board in self.boards:
                board.learn_registers(link)
            self._window = window

    def _connect(self, wait_s: float) -> tuple[Window, CommandLink]:
        """Map the window and open its channel (RuntimeError saying why not)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                window = Window.attach(self.name)
                break
            except (OSError, ValueError) as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"no crate process serves window {self.name} ({err}); "
                        "start it with dgs-sim --config FILE"
                    ) from err
                time.sleep(0.05)
        if window.layout != self._layout:
            served = [board.name for board in window.layout]
            window.close()
            raise RuntimeError(
                f"window {self.name} serves boards {served}, not the configured "
                f"{[board.name for board in self._layout]} (FIFOs and sizes included)"
            )
        try:
            return window, CommandLink(self.name, COMMAND_TIMEOUT_S)
        except PeerLost as err:
            window.close()
            raise RuntimeError(str(err)) from err

    def clock_origin_ns(self) -> int:
        return int(self.window.header[H_ORIGIN_NS])

    def built_until_ns(self) -> int:
        """The monotonic time up to which the crate process has put every event in its FIFOs,
        and past which none is visible yet.

        While the crate process builds, events newer than the heartbeat are already in
        the FIFOs and older ones not yet: no timestamp is right for both, so this waits
        for the build to end (well under a millisecond; at most `BUILD_WAIT_S`, for a
        crate process that stalls mid-build).
        """
        header = self.window.header
        if header[H_BUILDING]:
            deadline = time.monotonic() + BUILD_WAIT_S
            while header[H_BUILDING] and time.monotonic() < deadline:
                time.sleep(BUILD_POLL_S)
        return int(header[H_HEARTBEAT_NS])

    def reset_accounting(self) -> None:
        """Run start: the crate process's event counts start afresh (if it answers)."""
        with contextlib.suppress(PeerLost):
            self.call(-1, "reset_accounting")

    def close(self) -> None:
        """IOC exit: drop the channel and the mapping; end the crate process if ours."""
        with self._lock:
            self._close_links()
            if self._window is not None:
                self._window.close()
            if self._spawned is not None:
                self._spawned.stop()
            self._claim.close()

    # Liveness.

    def live_window(self) -> Window | None:
        """The window while its crate process is alive, else None (crate lost)."""
        if self._window is None:
            self.wait_ready()
        if self._lost is not None and not self._reattach():
            return None
        window = self._window
        header = window.header
        age_s = (time.monotonic_ns() - int(header[H_HEARTBEAT_NS])) / 1e9
        if header[H_CLOSED]:
            self._lose("the crate process closed its window")
        elif age_s > STALE_S:
            self._lose(f"no heartbeat for {age_s:.1f} s")
        else:
            return window
        return None

    @property
    def window(self) -> Window:
        """The window mapped now (the crate process may be lost: see `live_window`)."""
        if self._window is None:
            self.wait_ready()
        return self._window

    @property
    def lost(self) -> str | None:
        """Why the crate process is lost, None while it serves."""
        return self._lost

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._lost is not None:
                return
            if self._spawned is not None and self._spawned.exit_code is not None:
                reason += f"; it exited with code {self._spawned.exit_code}"
            self._lost = reason
            self._next_try = time.monotonic() + RETRY_S
            self._close_links()
        log.error("crate process of window %s lost (%s): reads fail until it is back",
                  self.name, reason)

    def before_run(self) -> None:
        """A Start: a lost crate process is looked for now, not at the next retry, so a
        run started as soon as it is back does not begin with read errors."""
        if self._window is not None and self._lost is not None:
            self._reattach(throttled=False)

    def _reattach(self, throttled: bool = True) -> bool:
        """Try to attach to a crate process serving the window (``throttled``: at most
        every RETRY_S)."""
        with self._lock:
            if self._lost is None:
                return True
            if throttled and time.monotonic() < self._next_try:
                return False
            self._next_try = time.monotonic() + RETRY_S
            if self._restart_if_ended():
                return False
            try:
                window, link = self._connect(wait_s=0.0)
            except RuntimeError:
                return False
            age_s = (time.monotonic_ns() - int(window.header[H_HEARTBEAT_NS])) / 1e9
            if age_s > STALE_S:
                link.close()
                window.close()
                return False
            same = window.instance == self._window.instance
            old, self._window = self._window, window
            old.close()
            self._close_links()
            self._links[threading.get_ident()] = link
            try:
                if not same:
                    for board in self.boards:
                        board.learn_registers(link)
                        board.restore(link)
            except (PeerLost, KeyError, ValueError, RuntimeError) as err:
                link.close()
                log.warning("crate process of window %s: restoring settings failed: %s",
                            self.name, err)
                return False
            self._lost = None
        log.info("crate process of window %s %s", self.name,
                 "answers again" if same else "is back (a new process): settings restored")
        return True

    def _restart_if_ended(self) -> bool:
        """A crate process this IOC started and that ended: start another (at most every
        RESTART_S, so one that fails at start does not loop); True if it is not serving."""
        spawned = self._spawned
        if spawned is None or spawned.exit_code is None:
            return False
        if time.monotonic() - spawned.started_at >= RESTART_S:
            log.warning("crate process of window %s ended with code %s: starting a new one",
                        self.name, spawned.exit_code)
            spawned.restart()
        return True

    def call(self, board: int, op: str, *args: Any) -> Any:
        """A command's result; PeerLost (the crate is then lost) if there is no answer."""
        if self._window is None:
            self.wait_ready()
        if self._lost is not None and not self._reattach():
            raise PeerLost(self._lost)
        try:
            link = self._links.get(threading.get_ident())
            if link is None:
                link = CommandLink(self.name, COMMAND_TIMEOUT_S)
                self._links[threading.get_ident()] = link
            return link.call(board, op, *args)
        except PeerLost as err:
            self._lose(str(err))
            raise

    def _close_links(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._links.clear()

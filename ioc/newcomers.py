"""Newcomers on the data port: accepted connections waiting for their turn.

A newcomer's first word tells its protocol (`ioc.connection`); one that
breaks the protocol is closed at once (`SenderRejected`). While the receiver
being served is active, a newcomer is told to come back later (classic:
SENDER_OFF, which makes a classic receiver reconnect; v2: a BUSY refusal). A
receiver with no complete request outstanding for ``YIELD_S`` gives way to a
newcomer, which takes over with nothing lost or duplicated. The receiver
being served is closed once it has asked for nothing for ``idle_timeout_s``
while data or newcomers wait; a newcomer silent that long is closed anyway.
"""

from __future__ import annotations

import logging
import socket

from ioc.connection import READ_CHUNK, Connection, Violation
from ioc.serving import Serving

#: A receiver with no complete request outstanding this long gives way to a newcomer.
YIELD_S = 0.5
#: Accepted connections kept waiting for their turn; more wait in the kernel backlog.
MAX_WAITING = 64


class Newcomers:
    """Connections waiting for their turn, and the hand-over from one receiver to the next."""

    def __init__(self, serving: Serving, idle_timeout_s: float, log: logging.Logger) -> None:
        self.serving = serving
        self.idle_timeout_s = idle_timeout_s
        self.log = log
        #: Owned by the sender thread, in the order they came.
        self.waiting: list[Connection] = []
        self._scratch = bytearray(READ_CHUNK)

    @property
    def room(self) -> int:
        """How many more may wait here (the others wait in the kernel's backlog)."""
        return MAX_WAITING - len(self.waiting)

    def take_turns(self, now: float) -> None:
        """Close an idle receiver when data or others wait; settle newcomers; serve the next."""
        serving = self.serving
        serving.end_if_idle(now, others_waiting=bool(self.waiting))
        self.waiting = [newcomer for newcomer in self.waiting if self._settle(newcomer, now)]
        if serving.current is None and self.waiting:
            serving.begin(self.waiting.pop(0), now)

    def close_all(self) -> None:
        for conn in self.waiting:
            conn.close(self._scratch)
        self.waiting = []

    def _settle(self, conn: Connection, now: float) -> bool:
        """Read what a waiting client sent; refuse or reject it if it cannot be served
        now, or make it current when the receiver being served gives way. True: keep
        it waiting."""
        if not self._read_nowait(conn):
            return False
        if conn.pending == 0 and now - conn.connected_at >= self.idle_timeout_s:
            conn.log_once("idle", "no request for %.1f s, closed", now - conn.connected_at)
            conn.close(self._scratch)
            return False
        if not conn.identified:
            return True
        serving = self.serving
        current = serving.current
        if current is not None and current.peer_gone():
            serving.end()  # it left; the newcomer need not wait for us to notice
            current = None
        if current is None:
            return True
        if current.pending == 0 and now - current.idle_since >= YIELD_S:
            current.log_once("yield", "no request outstanding for %.1f s: gave way to %s",
                             now - current.idle_since, conn.peer)
            serving.end()
            serving.begin(conn, now)
            return False
        serving.refuse_busy(conn)
        return False

    def _read_nowait(self, conn: Connection) -> bool:
        """Take whatever a waiting client sent; False if it left or broke the protocol."""
        try:
            while count := conn.sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT):
                conn.feed(memoryview(self._scratch)[:count])
            conn.note_partial_request()
            self.log.info("receiver %s left before being served", conn.peer)
            conn.close(self._scratch)
            return False
        except (BlockingIOError, InterruptedError):
            return True
        except Violation as violation:
            self.serving.reject(conn, violation)
            return False
        except OSError as err:
            conn.log_once("reset", "connection lost before being served: %s", err)
            conn.close(self._scratch)
            return False

"""Serving the receiver whose turn it is: its requests in, one reply each out (spec 02 §4, 05).

The sender thread hands one connection at a time to `Serving`, which answers
each of its requests with exactly one reply, in order: the next slice of the
buffer being cut (whole events, at most ``max_reply_bytes``, one board), or
"no data" after waiting ``idle_wait_s``. Replies are gather writes of a header
and a zero-copy view of the buffer. Blocking reads and sends return within
the socket timeouts, so serving hands the thread back as soon as its
housekeeping is due (`Timers`).

A v2 client is greeted once its whole hello is in, or refused (a run the
crate does not hold, a version not served; `ioc.v2messages` words both); its
acknowledgements go to `ioc.delivery`. When a connection ends, whatever it
did not take for good goes back to qSender: a v2 client's last
acknowledgements, still unread in its socket, are applied first; what a
classic client never took from its socket is counted as lost in flight. How a
socket is closed without a reset is `ioc.connection`'s.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ioc import protocol
from ioc.connection import READ_CHUNK, Connection, Kind, Violation
from ioc.delivery import Delivery
from ioc.listener import RateLimitedLog
from ioc.v2messages import V2Messages

_CLASSIC_PACK = protocol.CLASSIC_HEADER.pack


class ServingSettings(Protocol):
    """What serving reads of `ioc.config.SenderConfig`."""

    max_reply_bytes: int
    idle_wait_s: float
    idle_timeout_s: float


class Timers:
    """When serving hands the sender thread back: once housekeeping is due (a control
    call brings that forward to interrupt serving between requests), and when a
    shutdown's deadline passes. Set by the sender, read by serving between replies."""

    __slots__ = ("housekeeping_at", "shutdown_deadline", "stopping")

    def __init__(self) -> None:
        self.housekeeping_at = 0.0
        #: Set (under the sender's lock) when the sender shuts down.
        self.stopping = False
        self.shutdown_deadline = 0.0


class _ConnectionLost(Exception):
    """The receiver went away (or stopped reading) during a reply."""


class Serving:
    """The receiver being served, for the sender thread: its replies and its end."""

    def __init__(
        self,
        delivery: Delivery,
        config: ServingSettings,
        *,
        crate: int,
        lock: threading.Lock,
        timers: Timers,
        run_status: Callable[[], tuple[int, bool]],
        finished: Callable[[float], bool],
        refusals: RateLimitedLog,
        on_rejected: Callable[[], None],
        log: logging.Logger,
    ) -> None:
        self.delivery = delivery
        self.config = config
        self.log = log
        self._lock = lock
        self._timers = timers
        self._v2 = V2Messages(delivery, config, crate=crate, run_status=run_status)
        #: Shutting down and nothing left to do (the sender's judgement).
        self._finished = finished
        self._refusals = refusals
        self._on_rejected = on_rejected
        #: Owned by the sender thread.
        self.current: Connection | None = None
        self._scratch = bytearray(READ_CHUNK)
        # This run's statistics, under ``lock``.
        self.client = ""
        self.replies = 0
        self.bytes_sent = 0
        self.requeued = 0
        self.idle_replies = 0

    def zero_counters(self) -> None:
        """A new run: its statistics start at zero (the caller holds the lock)."""
        self.replies = self.bytes_sent = self.requeued = self.idle_replies = 0

    def begin(self, conn: Connection, now: float) -> None:
        """Make ``conn`` the receiver being served."""
        conn.idle_since = now
        self.current = conn
        with self._lock:
            self.client = conn.peer
        self.log.debug("serving receiver %s", conn.peer)

    # --------------------------------------------------------------- serving

    def serve(self, conn: Connection) -> None:
        """Answer what is asked, then read more requests (each blocking read returns within
        the socket's receive timeout). Returns when housekeeping is due, the receiver is
        quiet for a while, or it left."""
        sock, scratch, timers = conn.sock, self._scratch, self._timers
        while True:
            try:
                if not self._answer(conn):
                    return
            except Violation as violation:
                self.reject(conn, violation)
                return
            except _ConnectionLost:
                conn.note_partial_request()
                self.end()
                return
            if time.monotonic() >= timers.housekeeping_at:
                return
            try:
                count = sock.recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                return  # SO_RCVTIMEO: no request for a while; time for housekeeping
            except OSError as err:
                conn.log_once("reset", "connection lost: %s", err)
                self.end()
                return
            if count == 0:
                conn.note_partial_request()
                self.end()
                return
            try:
                conn.feed(memoryview(scratch)[:count])
            except Violation as violation:
                self.reject(conn, violation)
                return

    def _answer(self, conn: Connection) -> bool:
        """Everything the receiver asked for so far, in order; False if it was let go."""
        if conn.kind is Kind.V2 and not self._v2_bookkeeping(conn):
            return False
        if not conn.pending:
            return True
        timers = self._timers
        while conn.pending > 0:
            if timers.stopping and self._finished(time.monotonic()):
                return False
            self._reply(conn)
        self.delivery.prefetch()
        conn.idle_since = time.monotonic()
        return True

    def _v2_bookkeeping(self, conn: Connection) -> bool:
        """Greet a new v2 client, apply its acknowledgement; False if it was let go."""
        if not conn.greeted:
            if conn.hello is None:
                return True
            refusal = self._v2.refusal_for(conn.hello)
            if refusal is not None:
                reason, text = refusal
                self._refusals.warning(conn.peer.rpartition(":")[0], f"hello {reason.name}",
                                       "receiver %s refused: %s", conn.peer, text)
                self._send_refusal(conn, reason, text)
                self.end()
                return False
            conn.greeted = True
            conn.generation = self.delivery.generation
            conn.acked = self.delivery.acked
            previous, self.delivery.last_client = self.delivery.last_client, conn.hello.description
            conn.send_quietly(self._v2.greeting(previous))
            self.log.info("receiver %s: v2, run %d, resuming at byte %d", conn.peer,
                          self.delivery.run.number, self.delivery.sent)
        if conn.ack_changed and conn.generation == self.delivery.held_generation:
            conn.ack_changed = False
            try:
                self.delivery.acknowledge(conn.acked)
            except ValueError as err:
                raise Violation(str(err)) from None
        return True

    def _reply(self, conn: Connection) -> None:
        """Send one reply: the next slice of the head buffer, or no data.

        A receiver that has closed (done, or killed with requests queued) gets
        nothing more: a reply sent now would be lost, so its buffer stays queued.
        """
        v2 = conn.kind is Kind.V2
        if v2 and conn.generation != self.delivery.generation:
            text = f"run {self.delivery.run.number} started; this connection's run is over"
            self._send_refusal(conn, protocol.Refusal.WRONG_RUN, text)
            raise _ConnectionLost
        delivery = self.delivery
        buf = delivery.next_buffer(self.config.idle_wait_s)
        if conn.peer_gone():
            raise _ConnectionLost
        if buf is None:
            header = self._v2.no_data() if v2 else protocol.INSUFF_DATA_HEADER
            self._send(conn, header, None)
            if not v2:
                self.delivery.no_data_sent()
            conn.pending -= 1
            conn.answered += 1
            with self._lock:
                self.idle_replies += 1
            return
        start, end = buf.sent_bytes, delivery.next_end
        length = end - start
        if v2:
            header = protocol.V2_HEADER.pack(protocol.SERVER_SUMMARY, length, 0,
                                             delivery.run.number, delivery.sent, delivery.acked)
        else:
            header = _CLASSIC_PACK(protocol.SERVER_SUMMARY, length, 0, 1)
        try:
            self._send(conn, header, memoryview(buf.data)[start:end])
        except _ConnectionLost:
            with self._lock:
                self.requeued += 1
            raise
        delivery.reply_sent(buf, end, acknowledged=v2)
        conn.pending -= 1
        conn.answered += 1
        with self._lock:
            self.replies += 1
            self.bytes_sent += length

    def _send(self, conn: Connection, header: bytes, payload: memoryview | None) -> None:
        """One gather write of header + payload, finishing partial sends.

        Raises `_ConnectionLost` when the receiver is gone, takes nothing for
        ``idle_timeout_s``, or the shutdown deadline passes.
        """
        parts: list[bytes | memoryview] = [header] if payload is None else [header, payload]
        total = len(header) + (0 if payload is None else len(payload))
        done = 0
        last_progress = 0.0  # the clock is read only when a send comes back short
        try:
            while True:
                before = done
                try:
                    done += conn.sock.sendmsg(parts, (), socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    pass  # SO_SNDTIMEO elapsed with nothing taken
                except OSError as err:
                    conn.log_once("reset", "connection lost during a reply: %s", err)
                    raise _ConnectionLost from err
                if done >= total:
                    return
                now = time.monotonic()
                if done > before or not last_progress:
                    last_progress = now
                elif now - last_progress >= self.config.idle_timeout_s:
                    conn.log_once("stalled", "took nothing for %.1f s during a reply, closed",
                                  now - last_progress)
                    raise _ConnectionLost
                if self._timers.stopping and now >= self._timers.shutdown_deadline:
                    raise _ConnectionLost
                parts = _remaining(header, payload, done)
        except _ConnectionLost:
            conn.unfinished_reply = done  # in the socket, but the reply goes out again whole
            raise

    def _send_refusal(self, conn: Connection, reason: protocol.Refusal, text: str) -> None:
        conn.send_quietly(self._v2.refusal(reason, text))

    def refuse_busy(self, conn: Connection) -> None:
        """Another receiver is being served: tell the newcomer ``conn`` to come back later."""
        current = self.current
        assert current is not None
        host = conn.peer.rpartition(":")[0]
        self._refusals.warning(host, "busy", "receiver %s told to retry later: %s is being served",
                               conn.peer, current.peer)
        if conn.kind is Kind.CLASSIC:
            conn.send_quietly(protocol.SENDER_OFF_HEADER)
        else:
            self._send_refusal(conn, protocol.Refusal.BUSY,
                               f"{current.peer} is being served; try again")
        conn.close(self._scratch)

    # --------------------------------------------------------------- endings

    def reject(self, conn: Connection, violation: Violation) -> None:
        """A client broke the protocol: close it at once, keep the data it held."""
        conn.log_once("violation", "%s: closed", violation)
        self._on_rejected()
        if conn is self.current:
            self.end()
        else:
            conn.close(self._scratch)

    def end_if_idle(self, now: float, others_waiting: bool) -> None:
        """Close the receiver being served if it asked for nothing for ``idle_timeout_s``
        while data or other receivers wait."""
        conn = self.current
        if conn is None or conn.pending:
            return
        idle = now - conn.idle_since
        if idle >= self.config.idle_timeout_s and (self.delivery.data_waiting() or others_waiting):
            conn.log_once("idle", "no request for %.1f s, closed", idle)
            self.end()

    def end(self, linger_s: float = 0.0) -> None:
        """Close the receiver being served; what it did not take for good goes back.

        ``linger_s``: first give it that long to take what was sent (`Connection.linger`).
        """
        conn, self.current = self.current, None
        if conn is None:
            return
        if linger_s > 0:
            conn.linger(linger_s, self._scratch)
        if conn.kind is Kind.V2:
            self._last_acknowledgements(conn)
        else:
            self.delivery.lost_in_flight(conn.unsent_bytes() - conn.unfinished_reply)
        self.delivery.requeue()
        conn.close(self._scratch)
        with self._lock:
            self.client = ""
        self._timers.housekeeping_at = 0.0  # serve whoever waits at once
        self.log.info("receiver %s left after %d replies", conn.peer, conn.answered)

    def settle_acknowledgements(self) -> None:
        """Before the sender catches up with a Start: apply what the v2 client being served
        acknowledged of the previous run meanwhile."""
        conn = self.current
        if conn is not None and conn.kind is Kind.V2:
            self._last_acknowledgements(conn)

    def _last_acknowledgements(self, conn: Connection) -> None:
        """A v2 client's acknowledgements may still wait in the socket, unread while we
        were busy sending: apply them before what is unacknowledged goes back, or the
        next receiver would get again what this one stored."""
        with contextlib.suppress(OSError, Violation):
            while count := conn.sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT):
                conn.feed(memoryview(self._scratch)[:count])
        if conn.ack_changed and conn.greeted and conn.generation == self.delivery.held_generation:
            conn.ack_changed = False
            with contextlib.suppress(ValueError):
                self.delivery.acknowledge(conn.acked)


def _remaining(header: bytes, payload: memoryview | None, sent: int) -> list[bytes | memoryview]:
    """What is left of a reply after ``sent`` bytes went out."""
    if sent < len(header):
        rest: list[bytes | memoryview] = [header[sent:]]
        if payload is not None:
            rest.append(payload)
        return rest
    assert payload is not None
    return [payload[sent - len(header) :]]

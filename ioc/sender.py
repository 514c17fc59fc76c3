"""The sender: serves the crate's data on the data port, classic and v2 (spec 02 §4, 05).

One thread owns every socket. It serves one receiver at a time and answers
each of its requests with exactly one reply, in order: the next slice of the
buffer being cut (whole events, at most ``max_reply_bytes``, one board), or
"no data" after waiting ``idle_wait_s``. Replies are gather writes of a header
and a zero-copy view of the buffer. Buffer bookkeeping (what is cut, what a v2
client has not acknowledged yet, what goes back after a failure, what is
lost and why) lives in `ioc.delivery`; this module is about connections.

Connections: a newcomer's first word tells its protocol (`ioc.connection`);
one that breaks the protocol is closed at once (`SenderRejected`). While the
receiver being served is active, a newcomer is told to come back later
(classic: SENDER_OFF, which makes a classic receiver reconnect; v2: a BUSY
refusal). A receiver with no complete request outstanding for ``YIELD_S`` gives
way to a newcomer, which takes over with nothing lost or duplicated. Only
addresses in ``allowed_receivers`` are served.

The listener follows the run: it opens at Start + Save (whichever comes last)
and closes once the run's data are delivered (v2: acknowledged), or
``delivery_timeout_s`` after Stop when that is set. Connections are never
closed at the end of a run: receivers learn about it from the in-band 0xD
headers (and v2 clients from the "complete" status).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ioc import protocol
from ioc.connection import Connection, Kind, Violation
from ioc.delivery import Delivery, RunIdentity
from ioc.listener import DataListener, RateLimitedLog
from ioc.losses import LossLedger
from ioc.pool import BufferPool
from ioc.realtime import name_os_thread

#: How long one blocked send may wait before the sender looks at the clock.
SEND_SLICE_S = 0.25
#: Timers (listener, idle receivers, newcomers) are looked at least this often.
HOUSEKEEPING_S = 0.1
#: qSender is flushed this often while nobody can receive it.
FLUSH_PERIOD_S = 1.0
#: A receiver with no complete request outstanding this long gives way to a newcomer.
YIELD_S = 0.5
#: Accepted connections kept waiting for their turn; more wait in the kernel backlog.
MAX_WAITING = 64
_CLASSIC_PACK = protocol.CLASSIC_HEADER.pack
#: `_CV_State` values a v2 hello reports.
STATE_STOPPED, STATE_RUNNING, STATE_DRAINING = 0, 1, 2

LOG = logging.getLogger("dgs.sender")


class SenderSettings(Protocol):
    """What the sender reads from `ioc.config.SenderConfig`."""

    max_reply_bytes: int
    idle_wait_s: float
    accept_delay_s: float
    max_segment: int
    idle_timeout_s: float
    delivery_timeout_s: float


@dataclass(frozen=True)
class SenderStats:
    """A snapshot of the sender for the statistics PVs.

    ``replies`` and ``bytes_sent`` count data replies and their payload bytes
    this run; ``idle_replies`` counts no-data replies; ``rejected`` counts
    connections ended for breaking the protocol or refused by the allow-list.
    """

    listening: bool
    serving: bool
    client: str
    replies: int
    bytes_sent: int
    requeued: int
    idle_replies: int
    rejected: int


class _ConnectionLost(Exception):
    """The receiver went away (or stopped reading) during a reply."""


class Sender:
    """The data server of one crate."""

    def __init__(
        self,
        pool: BufferPool,
        config: SenderSettings,
        bind: str,
        port: int,
        log: logging.Logger | None = None,
        *,
        losses: LossLedger | None = None,
        crate: int = 0,
        allowed: Sequence[str] = (),
        crate_state: Callable[[], int] | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.log = log or LOG
        self.losses = losses or LossLedger()
        self.delivery = Delivery(pool, self.losses, config.max_reply_bytes)
        self.crate = crate
        self._crate_state = crate_state
        self._refusals = RateLimitedLog(self.log)
        #: A blocked read of the served receiver returns this often (idle timeouts need it).
        self._read_slice = max(0.01, min(HOUSEKEEPING_S, config.idle_timeout_s / 4))
        self._listener = DataListener(
            bind, port, max_segment=config.max_segment, allowed=allowed,
            send_slice_s=SEND_SLICE_S, read_slice_s=self._read_slice, log=self.log,
            refusals=self._refusals, on_refused=self._count_rejected,
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Run state, written by the control calls under _lock.
        self._run_active = False
        self._save = False
        self._listen_at = 0.0
        self._stopped_at: float | None = None
        self._drained = False
        self._stopping = False
        self._shutdown_deadline = 0.0
        # Owned by the sender thread.
        self._current: Connection | None = None
        self._waiting: list[Connection] = []
        self._next_flush = 0.0
        self._next_housekeeping = 0.0
        self._listener_fd = -1
        self._polled: dict[int, int] = {}
        self._poller = select.poll()
        self._scratch = bytearray(65536)
        # Statistics, under _lock.
        self._client = ""
        self._replies = 0
        self._bytes_sent = 0
        self._requeued = 0
        self._idle_replies = 0
        self._rejected = 0

    # ----------------------------------------------------------- control API

    @property
    def port(self) -> int:
        """The bound port (an ephemeral port, once chosen, is kept for later runs)."""
        return self._listener.port

    def start(self) -> None:
        """Start the sender thread; the listener opens with a run."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
            self._thread.start()

    def bind_check(self) -> None:
        """Raise OSError now if ``bind:port`` cannot be bound (fine while we hold it)."""
        with self._lock:
            if self._listener.is_open or self._listener.port == 0:
                return
            self._listener.make_socket().close()

    def run_started(self, save: bool, run: RunIdentity | None = None) -> None:
        """Start: drop the last run's leftovers (counted), zero the counters, listen if Save."""
        dropped = self.delivery.run_started(run or RunIdentity())
        if dropped:
            self.log.warning(
                "dropped %.3f MiB left over from the previous run (counted as superseded)",
                dropped / (1 << 20),
            )
        with self._lock:
            self._run_active = True
            self._save = save
            self._stopped_at = None
            self._drained = False
            self._listen_at = time.monotonic() + self.config.accept_delay_s
            self._replies = self._bytes_sent = self._requeued = self._idle_replies = 0
            self._rejected = 0
            self._listener.new_run()
            if save and self.config.accept_delay_s <= 0:
                self._open_listener()
        self._wake()

    def save_changed(self, save: bool) -> None:
        """SaveData changed: during a run, Save opens the listener."""
        with self._lock:
            self._save = save
            if save and self._run_active and time.monotonic() >= self._listen_at:
                self._open_listener()
        self._wake()

    def run_stopped(self) -> None:
        """Stop: keep serving; with a delivery timeout the listener closes that long after."""
        with self._lock:
            self._run_active = False
            self._stopped_at = time.monotonic()
        self._wake()

    def drain_complete(self) -> None:
        """inLoop drained and outLoop flushed: close the listener once the data are delivered."""
        with self._lock:
            self._drained = True
        self._wake()

    def stats(self) -> SenderStats:
        with self._lock:
            return SenderStats(
                listening=self._listener.is_open,
                serving=self._current is not None,
                client=self._client,
                replies=self._replies,
                bytes_sent=self._bytes_sent,
                requeued=self._requeued,
                idle_replies=self._idle_replies,
                rejected=self._rejected,
            )

    def shutdown(self, deliver_timeout: float = 1.0) -> None:
        """Let the current receiver take what is queued (bounded), then close everything."""
        with self._lock:
            self._stopping = True
            self._shutdown_deadline = time.monotonic() + deliver_timeout
        self._wake()
        if self._thread is not None:
            self._thread.join(deliver_timeout + 2 * SEND_SLICE_S + HOUSEKEEPING_S + 1.0)
            if self._thread.is_alive():
                self.log.error("sender thread did not stop")
                return
        else:
            self._close_all()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------- listener

    def _open_listener(self) -> None:
        """Open the listener (caller holds _lock); a failure is logged once per run."""
        if not self._stopping:
            self._listener.open()

    def _close_listener(self, why: str) -> None:
        """Accept whoever is in the backlog first, so closing resets nobody."""
        self._accept_all(limit=False)
        fd = self._listener.fileno()
        with self._lock:
            self._listener.close(why)
        self._unpoll(fd)
        self._listener_fd = -1

    def _accept_all(self, limit: bool = True) -> None:
        """Accept every pending connection into the waiting list (up to MAX_WAITING)."""
        room = MAX_WAITING - len(self._waiting) if limit else 1 << 30
        if room <= 0:
            return
        accepted = self._listener.accept(room)  # only this thread closes the listener
        if accepted:
            self._waiting.extend(accepted)
            self._next_housekeeping = 0.0  # serve it at once if nobody is being served

    def _count_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    # ---------------------------------------------------------------- thread

    def _wake(self) -> None:
        self._next_housekeeping = 0.0  # a receiver being served is interrupted between requests
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        """The sender thread: survives its own bugs (logged) rather than stop serving."""
        name_os_thread("sender")
        self._poll_set(self._wake_r.fileno(), select.POLLIN)
        try:
            while True:
                try:
                    if self._step():
                        return
                except Exception:
                    self.log.exception("sender error: ending the connection being served")
                    self._end_connection()
                    time.sleep(HOUSEKEEPING_S)
        finally:
            self._close_all()

    def _step(self) -> bool:
        """Housekeeping when due, then serve the current receiver or wait; True when finished.

        The receiver being served is read with blocking reads (as lean as a bare
        server); the listener and the wake-up pipe are polled only while nobody is.
        """
        now = time.monotonic()
        if now >= self._next_housekeeping:
            if self._finished(now):
                return True
            self._housekeeping(now)
            self._next_housekeeping = now + self._timer_interval(now)
        conn = self._current
        if conn is not None:
            self._serve(conn)
            return False
        timeout_ms = max(0, int((self._next_housekeeping - now) * 1000) + 1)
        for fd, _ in self._poller.poll(timeout_ms):
            if fd == self._listener_fd:
                self._accept_all()
            else:
                self._drain_wake_pipe()
        return False

    def _housekeeping(self, now: float) -> None:
        self._drain_wake_pipe()
        conn = self._current
        if not self.delivery.current and conn is not None and conn.kind is Kind.V2:
            self._last_acknowledgements(conn)
        self.delivery.catch_up()
        self._accept_all()
        self._manage_listener(now)
        self._manage_connections(now)
        self._flush_if_unreachable(now)
        self._sync_poll()

    def _finished(self, now: float) -> bool:
        """Shutting down and either everything is delivered, nobody can take it, or time is up.

        After a Stop, "everything" includes what the drain has still to queue (the
        end-of-run headers last): an empty qSender before `drain_complete` means
        outLoop has not handed it over yet, not that it was delivered.
        """
        with self._lock:
            if not self._stopping:
                return False
            deadline = self._shutdown_deadline
            draining = self._stopped_at is not None and not self._drained
        if now >= deadline or not (draining or self.delivery.outstanding()):
            return True
        return self._current is None and not self._waiting

    def _timer_interval(self, now: float) -> float:
        """Time until the next timer that housekeeping must see."""
        deadlines = [now + HOUSEKEEPING_S]
        with self._lock:
            if self._stopping:
                deadlines.append(self._shutdown_deadline)
            if self._run_active and self._save and not self._listener.is_open:
                deadlines.append(self._listen_at)
            timeout = self.config.delivery_timeout_s
            if self._listener.is_open and self._stopped_at is not None and timeout > 0:
                deadlines.append(self._stopped_at + timeout)
        conn = self._current
        if conn is not None and conn.pending == 0:
            deadlines.append(conn.idle_since + self.config.idle_timeout_s)
            if self._waiting:
                deadlines.append(conn.idle_since + YIELD_S)
        return max(0.001, min(d for d in deadlines if d > now) - now)

    def _poll_set(self, fd: int, mask: int) -> None:
        if self._polled.get(fd) != mask:
            if fd in self._polled:
                self._poller.modify(fd, mask)
            else:
                self._poller.register(fd, mask)
            self._polled[fd] = mask

    def _unpoll(self, fd: int) -> None:
        if self._polled.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _sync_poll(self) -> None:
        """Poll the listener while there is room to accept (the served receiver blocks instead)."""
        with self._lock:
            fd = self._listener.fileno()
        if fd >= 0:
            self._listener_fd = fd
            if len(self._waiting) < MAX_WAITING:
                self._poll_set(self._listener_fd, select.POLLIN)
            else:
                self._unpoll(self._listener_fd)

    def _drain_wake_pipe(self) -> None:
        """Control calls write here to cut a poll short; housekeeping then runs at once."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._next_housekeeping = 0.0

    def _manage_listener(self, now: float) -> None:
        with self._lock:
            due = self._run_active and self._save and now >= self._listen_at
            if not self._listener.is_open and due:
                self._open_listener()
            listening, run_active, stopping = (
                self._listener.is_open, self._run_active, self._stopping
            )
            stopped_at, drained = self._stopped_at, self._drained
        if not listening or run_active or stopping:
            return  # shutdown closes it at the very end
        timeout = self.config.delivery_timeout_s
        if drained and not self.delivery.outstanding():
            self._close_listener("the run's data are delivered")
        elif stopped_at is not None and timeout > 0 and now >= stopped_at + timeout:
            self._close_listener(f"{timeout:g} s after Stop")

    # ------------------------------------------------------------ newcomers

    def _manage_connections(self, now: float) -> None:
        """Close an idle receiver when data or others wait; settle newcomers; serve the next."""
        conn = self._current
        if conn is not None and conn.pending == 0:
            idle = now - conn.idle_since
            if idle >= self.config.idle_timeout_s and (
                self.delivery.data_waiting() or self._waiting
            ):
                conn.log_once("idle", "no request for %.1f s, closed", idle)
                self._end_connection()
        waiting: list[Connection] = []
        for newcomer in self._waiting:
            if self._settle_newcomer(newcomer, now):
                waiting.append(newcomer)
        self._waiting = waiting
        if self._current is None and self._waiting:
            self._make_current(self._waiting.pop(0), now)

    def _settle_newcomer(self, conn: Connection, now: float) -> bool:
        """Read what a waiting client sent; refuse or reject it if it cannot be served
        now, or make it current when the receiver being served gives way. True: keep
        it waiting."""
        if not self._read_nowait(conn):
            return False
        if conn.pending == 0 and now - conn.connected_at >= self.config.idle_timeout_s:
            conn.log_once("idle", "no request for %.1f s, closed", now - conn.connected_at)
            self._close(conn)
            return False
        if not conn.identified:
            return True
        current = self._current
        if current is not None and current.peer_gone():
            self._end_connection()  # it left; the newcomer need not wait for us to notice
            current = None
        if current is None:
            return True
        if current.pending == 0 and now - current.idle_since >= YIELD_S:
            current.log_once("yield", "no request outstanding for %.1f s: gave way to %s",
                             now - current.idle_since, conn.peer)
            self._end_connection()
            self._make_current(conn, now)
            return False
        self._refuse_busy(conn, current)
        return False

    def _read_nowait(self, conn: Connection) -> bool:
        """Take whatever a waiting client sent; False if it left or broke the protocol."""
        try:
            while count := conn.sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT):
                conn.feed(memoryview(self._scratch)[:count])
            conn.note_partial_request()
            self.log.info("receiver %s left before being served", conn.peer)
            self._close(conn)
            return False
        except (BlockingIOError, InterruptedError):
            return True
        except Violation as violation:
            self._reject(conn, violation)
            return False
        except OSError as err:
            conn.log_once("reset", "connection lost before being served: %s", err)
            self._close(conn)
            return False

    def _refuse_busy(self, conn: Connection, current: Connection) -> None:
        """Another receiver is being served: tell the newcomer to come back later."""
        host = conn.peer.rpartition(":")[0]
        self._refusals.warning(host, "busy", "receiver %s told to retry later: %s is being served",
                               conn.peer, current.peer)
        if conn.kind is Kind.CLASSIC:
            self._send_quietly(conn, protocol.SENDER_OFF_HEADER)
        else:
            self._send_refusal(conn, protocol.Refusal.BUSY,
                               f"{current.peer} is being served; try again")
        self._close(conn)

    def _make_current(self, conn: Connection, now: float) -> None:
        conn.idle_since = now
        self._current = conn
        with self._lock:
            self._client = conn.peer
        self.log.debug("serving receiver %s", conn.peer)

    # --------------------------------------------------------------- serving

    def _serve(self, conn: Connection) -> None:
        """Answer what is asked, then read more requests (each blocking read returns within
        ``_read_slice``). Returns when housekeeping is due, the receiver is quiet for a
        while, or it left."""
        sock, scratch = conn.sock, self._scratch
        while True:
            try:
                if not self._answer(conn):
                    return
            except Violation as violation:
                self._reject(conn, violation)
                return
            except _ConnectionLost:
                conn.note_partial_request()
                self._end_connection()
                return
            if time.monotonic() >= self._next_housekeeping:
                return
            try:
                count = sock.recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                return  # SO_RCVTIMEO: no request for a while; time for housekeeping
            except OSError as err:
                conn.log_once("reset", "connection lost: %s", err)
                self._end_connection()
                return
            if count == 0:
                conn.note_partial_request()
                self._end_connection()
                return
            try:
                conn.feed(memoryview(scratch)[:count])
            except Violation as violation:
                self._reject(conn, violation)
                return

    def _answer(self, conn: Connection) -> bool:
        """Everything the receiver asked for so far, in order; False if it was let go."""
        if conn.kind is Kind.V2 and not self._v2_bookkeeping(conn):
            return False
        if not conn.pending:
            return True
        while conn.pending > 0:
            if self._stopping and self._finished(time.monotonic()):
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
            refusal = self._hello_refusal(conn.hello)
            if refusal is not None:
                reason, text = refusal
                self._refusals.warning(conn.peer.rpartition(":")[0], f"hello {reason.name}",
                                       "receiver %s refused: %s", conn.peer, text)
                self._send_refusal(conn, reason, text)
                self._end_connection()
                return False
            conn.greeted = True
            conn.generation = self.delivery.generation
            conn.acked = self.delivery.acked
            previous, self.delivery.last_client = self.delivery.last_client, conn.hello.description
            self._send_quietly(conn, self._v2_header(protocol.HELLO_REPLY,
                                                     self._run_info(previous)))
            self.log.info("receiver %s: v2, run %d, resuming at byte %d", conn.peer,
                          self.delivery.run.number, self.delivery.sent)
        if conn.ack_changed and conn.generation == self.delivery.held_generation:
            conn.ack_changed = False
            try:
                self.delivery.acknowledge(conn.acked)
            except ValueError as err:
                raise Violation(str(err)) from None
        return True

    def _hello_refusal(self, hello: protocol.Hello) -> tuple[protocol.Refusal, str] | None:
        if hello.version != protocol.VERSION:
            return protocol.Refusal.BAD_HELLO, f"protocol version {hello.version} not served"
        self.delivery.catch_up()
        run = self.delivery.run
        wanted = hello.run == protocol.NO_RUN or hello.run == run.number
        same_start = hello.run_start_ns in (0, run.start_ns)
        if run.number == protocol.NO_RUN or not wanted or not same_start:
            held = "no run" if run.number == protocol.NO_RUN else f"run {run.number}"
            if wanted and not same_start:
                held += " (started again since)"
            return protocol.Refusal.WRONG_RUN, f"this crate holds data of {held}"
        return None

    def _run_info(self, text: str = "") -> bytes:
        run = self.delivery.run
        info = protocol.RunInfo(
            crate=self.crate,
            run=run.number,
            run_start_ns=run.start_ns,
            state=self._state(),
            complete=self._complete(),
            max_reply=self.config.max_reply_bytes,
            boards=run.boards,
        )
        return info.pack() + text.encode()

    def _state(self) -> int:
        if self._crate_state is not None:
            return self._crate_state()
        with self._lock:
            if self._run_active:
                return STATE_RUNNING
            return STATE_STOPPED if self._drained else STATE_DRAINING

    def _complete(self) -> bool:
        """The run is over and every byte of it was delivered (v2: acknowledged)."""
        with self._lock:
            over = not self._run_active and self._drained
        return over and self.delivery.current and not self.delivery.outstanding()

    def _v2_header(self, kind: int, payload: bytes = b"", status: int = 0) -> bytes:
        header = protocol.V2Header(kind, len(payload), status, self.delivery.run.number,
                                   self.delivery.sent, self.delivery.acked)
        return header.pack() + payload

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
            if v2:
                status = self._state() | (protocol.COMPLETE if self._complete() else 0)
                header = self._v2_header(protocol.INSUFF_DATA, status=status)
            else:
                header = protocol.INSUFF_DATA_HEADER
            self._send(conn, header, None)
            if not v2:
                self.delivery.no_data_sent()
            conn.pending -= 1
            conn.answered += 1
            with self._lock:
                self._idle_replies += 1
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
                self._requeued += 1
            raise
        delivery.reply_sent(buf, end, acknowledged=v2)
        conn.pending -= 1
        conn.answered += 1
        with self._lock:
            self._replies += 1
            self._bytes_sent += length

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
                if self._stopping and now >= self._shutdown_deadline:
                    raise _ConnectionLost
                parts = _remaining(header, payload, done)
        except _ConnectionLost:
            conn.unfinished_reply = done  # in the socket, but the reply goes out again whole
            raise

    def _send_quietly(self, conn: Connection, message: bytes) -> None:
        """A short control message; a client that is gone simply does not get it."""
        with contextlib.suppress(OSError):
            conn.sock.sendall(message)

    def _send_refusal(self, conn: Connection, reason: protocol.Refusal, text: str) -> None:
        self._send_quietly(conn, self._v2_header(protocol.REFUSED, self._run_info(text),
                                                 status=int(reason)))

    # --------------------------------------------------------------- endings

    def _reject(self, conn: Connection, violation: Violation) -> None:
        """A client broke the protocol: close it at once, keep the data it held."""
        conn.log_once("violation", "%s: closed", violation)
        self._count_rejected()
        if conn is self._current:
            self._end_connection()
        else:
            self._close(conn)

    def _end_connection(self) -> None:
        """Close the receiver being served; what it did not take for good goes back."""
        conn, self._current = self._current, None
        if conn is None:
            return
        if conn.kind is Kind.V2:
            self._last_acknowledgements(conn)
        else:
            self.delivery.lost_in_flight(_unsent_bytes(conn.sock) - conn.unfinished_reply)
        self.delivery.requeue()
        self._unpoll(conn.sock.fileno())
        self._close(conn)
        with self._lock:
            self._client = ""
        self._next_housekeeping = 0.0
        self.log.info("receiver %s left after %d replies", conn.peer, conn.answered)

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

    def _close(self, conn: Connection) -> None:
        """Close after what was sent (a last control message): FIN first, then read what
        the client still sent, so the close is not a reset that could discard it."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
            while conn.sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT):
                pass
        conn.sock.close()

    def _flush_if_unreachable(self, now: float) -> None:
        """With no listener and nobody connected, drop qSender once per second (counted)."""
        with self._lock:
            reachable = (
                self._listener.is_open or (self._run_active and self._save) or self._stopping
            )
        if reachable or self._current is not None or self._waiting:
            self._next_flush = now + FLUSH_PERIOD_S
            return
        if now < self._next_flush:
            return
        self._next_flush = now + FLUSH_PERIOD_S
        dropped = self.delivery.drop_unreachable()
        if dropped:
            self.log.warning("nobody can receive: dropped %d buffers (counted as unreachable)",
                             dropped)

    def _close_all(self) -> None:
        if self._current is not None:
            self._end_connection()
        for conn in self._waiting:
            self._close(conn)
        self._waiting = []
        self.delivery.requeue()
        fd = self._listener.fileno()
        with self._lock:
            self._listener.close()
        self._unpoll(fd)


def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes still in the socket's send queue (not yet taken by the peer)."""
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:
        return 0
    return struct.unpack("i", queued)[0]


def _remaining(header: bytes, payload: memoryview | None, sent: int) -> list[bytes | memoryview]:
    """What is left of a reply after ``sent`` bytes went out."""
    if sent < len(header):
        rest: list[bytes | memoryview] = [header[sent:]]
        if payload is not None:
            rest.append(payload)
        return rest
    assert payload is not None
    return [payload[sent - len(header) :]]


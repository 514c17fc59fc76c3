"""The sender: serves the crate's data on the data port, classic and v2 (spec 02 §4, 05).

One thread owns every socket and serves one receiver at a time. This module
is that thread and its control calls: its poll loop and timers, and the
listener. Serving the receiver whose turn it is (one reply per request, v2
greetings and acknowledgements, the end of a connection) is `ioc.serving`;
the connections waiting for their turn are `ioc.newcomers`; buffer
bookkeeping (what is cut, what a v2 client has not acknowledged yet, what
goes back after a failure, what is lost and why) is `ioc.delivery`. Only
addresses in ``allowed_receivers`` are accepted (`ioc.listener`).

The listener follows the run: it opens at Start + Save (whichever comes last)
and closes once the run's data are delivered (v2: acknowledged), or
``delivery_timeout_s`` after Stop when that is set. Connections are never
closed at the end of a run: receivers learn about it from the in-band 0xD
headers (and v2 clients from the "complete" status). With no listener and
nobody connected, qSender is flushed (counted as unreachable).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ioc.delivery import Delivery, RunIdentity
from ioc.listener import DataListener, RateLimitedLog
from ioc.losses import LossLedger
from ioc.newcomers import YIELD_S, Newcomers
from ioc.pool import BufferPool
from ioc.realtime import name_os_thread
from ioc.serving import Serving, ServingSettings, Timers

#: How long one blocked send may wait before the sender looks at the clock.
SEND_SLICE_S = 0.25
#: Timers (listener, idle receivers, newcomers) are looked at least this often.
HOUSEKEEPING_S = 0.1
#: At shutdown, how long the receiver being served may take to collect the last replies
#: from its socket before the connection is closed (`Connection.linger`).
CLOSE_LINGER_S = 0.5
#: qSender is flushed this often while nobody can receive it.
FLUSH_PERIOD_S = 1.0
#: `_CV_State` values a v2 hello reports.
STATE_STOPPED, STATE_RUNNING, STATE_DRAINING = 0, 1, 2

LOG = logging.getLogger("dgs.sender")


class SenderSettings(ServingSettings, Protocol):
    """What the sender reads from `ioc.config.SenderConfig`."""

    accept_delay_s: float
    max_segment: int
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
        self._crate_state = crate_state
        self._lock = threading.Lock()
        self._timers = Timers()
        refusals = RateLimitedLog(self.log)
        #: A blocked read of the served receiver returns this often (idle timeouts need it).
        self._read_slice = max(0.01, min(HOUSEKEEPING_S, config.idle_timeout_s / 4))
        self._listener = DataListener(
            bind, port, max_segment=config.max_segment, allowed=allowed,
            send_slice_s=SEND_SLICE_S, read_slice_s=self._read_slice, log=self.log,
            refusals=refusals, on_refused=self._count_rejected,
        )
        self._serving = Serving(
            self.delivery, config, crate=crate, lock=self._lock, timers=self._timers,
            run_status=self._run_status, finished=self._finished, refusals=refusals,
            on_rejected=self._count_rejected, log=self.log,
        )
        self._newcomers = Newcomers(self._serving, config.idle_timeout_s, self.log)
        self._thread: threading.Thread | None = None
        self._polls = _PollSet()
        # Run state, written by the control calls under _lock (shutdown's in _timers).
        self._run_active = False
        self._save = False
        self._listen_at = 0.0
        self._stopped_at: float | None = None
        self._drained = False
        # Owned by the sender thread.
        self._next_flush = 0.0
        # Under _lock (the other statistics are the serving's).
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
            self._serving.zero_counters()
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
        serving = self._serving
        with self._lock:
            return SenderStats(
                listening=self._listener.is_open,
                serving=serving.current is not None,
                client=serving.client,
                replies=serving.replies,
                bytes_sent=serving.bytes_sent,
                requeued=serving.requeued,
                idle_replies=serving.idle_replies,
                rejected=self._rejected,
            )

    def shutdown(self, deliver_timeout: float = 1.0) -> None:
        """Let the current receiver take what is queued (bounded), then close everything."""
        with self._lock:
            self._timers.stopping = True
            self._timers.shutdown_deadline = time.monotonic() + deliver_timeout
        self._wake()
        if self._thread is not None:
            self._thread.join(
                deliver_timeout + 2 * SEND_SLICE_S + HOUSEKEEPING_S + CLOSE_LINGER_S + 1.0
            )
            if self._thread.is_alive():
                self.log.error("sender thread did not stop")
                return
        else:
            self._close_all()
        self._polls.close()

    def _run_status(self) -> tuple[int, bool]:
        """What v2 clients are told: the crate's `_CV_State`, and whether the run is over
        with every byte of it delivered (v2: acknowledged)."""
        state = self._crate_state() if self._crate_state is not None else None
        with self._lock:
            active, drained = self._run_active, self._drained
        if state is None:
            state = STATE_RUNNING if active else STATE_STOPPED if drained else STATE_DRAINING
        over = not active and drained
        return state, over and self.delivery.current and not self.delivery.outstanding()

    # ------------------------------------------------------------- listener

    def _open_listener(self) -> None:
        """Open the listener (caller holds _lock); a failure is logged once per run."""
        if not self._timers.stopping:
            self._listener.open()

    def _close_listener(self, why: str) -> None:
        """Accept whoever is in the backlog first, so closing resets nobody."""
        self._accept_all(limit=False)
        fd = self._listener.fileno()
        with self._lock:
            self._listener.close(why)
        self._polls.forget_listener(fd)

    def _accept_all(self, limit: bool = True) -> None:
        """Accept every pending connection into the waiting list (up to its room)."""
        room = self._newcomers.room if limit else 1 << 30
        if room <= 0:
            return
        accepted = self._listener.accept(room)  # only this thread closes the listener
        if accepted:
            self._newcomers.waiting.extend(accepted)
            self._timers.housekeeping_at = 0.0  # serve it at once if nobody is being served

    def _count_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def _manage_listener(self, now: float) -> None:
        with self._lock:
            due = self._run_active and self._save and now >= self._listen_at
            if not self._listener.is_open and due:
                self._open_listener()
            listening, run_active, stopping = (
                self._listener.is_open, self._run_active, self._timers.stopping
            )
            stopped_at, drained = self._stopped_at, self._drained
        if not listening or run_active or stopping:
            return  # shutdown closes it at the very end
        timeout = self.config.delivery_timeout_s
        if drained and not self.delivery.outstanding():
            self._close_listener("the run's data are delivered")
        elif stopped_at is not None and timeout > 0 and now >= stopped_at + timeout:
            self._close_listener(f"{timeout:g} s after Stop")

    # ---------------------------------------------------------------- thread

    def _wake(self) -> None:
        """Housekeeping at once: a poll is cut short, a receiver being served is interrupted
        between requests."""
        self._timers.housekeeping_at = 0.0
        self._polls.wake()

    def _run(self) -> None:
        """The sender thread: survives its own bugs (logged) rather than stop serving."""
        name_os_thread("sender")
        try:
            while True:
                try:
                    if self._step():
                        return
                except Exception:
                    self.log.exception("sender error: ending the connection being served")
                    self._serving.end()
                    time.sleep(HOUSEKEEPING_S)
        finally:
            self._close_all()

    def _step(self) -> bool:
        """Housekeeping when due, then serve the current receiver or wait; True when finished.

        The receiver being served is read with blocking reads (as lean as a bare
        server); the listener and the wake-up pipe are polled only while nobody is.
        """
        now = time.monotonic()
        timers = self._timers
        if now >= timers.housekeeping_at:
            if self._finished(now):
                return True
            self._housekeeping(now)
            timers.housekeeping_at = now + self._timer_interval(now)
        conn = self._serving.current
        if conn is not None:
            self._serving.serve(conn)
            return False
        timeout_ms = max(0, int((timers.housekeeping_at - now) * 1000) + 1)
        acceptable, woken = self._polls.wait(timeout_ms)
        if acceptable:
            self._accept_all()
        if woken:
            self._drain_wake_pipe()
        return False

    def _housekeeping(self, now: float) -> None:
        self._drain_wake_pipe()
        if not self.delivery.current:
            self._serving.settle_acknowledgements()
        self.delivery.catch_up()
        self._accept_all()
        self._manage_listener(now)
        self._newcomers.take_turns(now)
        self._flush_if_unreachable(now)
        self._sync_poll()

    def _finished(self, now: float) -> bool:
        """Shutting down and either everything is delivered, nobody can take it, or time is up.

        After a Stop, "everything" includes what the drain has still to queue (the
        end-of-run headers last): an empty qSender before `drain_complete` means
        outLoop has not handed it over yet, not that it was delivered.
        """
        with self._lock:
            if not self._timers.stopping:
                return False
            deadline = self._timers.shutdown_deadline
            draining = self._stopped_at is not None and not self._drained
        if now >= deadline or not (draining or self.delivery.outstanding()):
            return True
        return self._serving.current is None and not self._newcomers.waiting

    def _timer_interval(self, now: float) -> float:
        """Time until the next timer that housekeeping must see."""
        deadlines = [now + HOUSEKEEPING_S]
        with self._lock:
            if self._timers.stopping:
                deadlines.append(self._timers.shutdown_deadline)
            if self._run_active and self._save and not self._listener.is_open:
                deadlines.append(self._listen_at)
            timeout = self.config.delivery_timeout_s
            if self._listener.is_open and self._stopped_at is not None and timeout > 0:
                deadlines.append(self._stopped_at + timeout)
        conn = self._serving.current
        if conn is not None and conn.pending == 0:
            deadlines.append(conn.idle_since + self.config.idle_timeout_s)
            if self._newcomers.waiting:
                deadlines.append(conn.idle_since + YIELD_S)
        return max(0.001, min(d for d in deadlines if d > now) - now)

    def _sync_poll(self) -> None:
        """Poll the listener while there is room to accept (the served receiver blocks instead)."""
        with self._lock:
            fd = self._listener.fileno()
        if fd >= 0:
            self._polls.watch_listener(fd, room=self._newcomers.room > 0)

    def _drain_wake_pipe(self) -> None:
        """Control calls write to the wake-up pipe to cut a poll short; housekeeping then
        runs at once."""
        self._polls.drain_wakeups()
        self._timers.housekeeping_at = 0.0

    # --------------------------------------------------------------- endings

    def _flush_if_unreachable(self, now: float) -> None:
        """With no listener and nobody connected, drop qSender once per second (counted)."""
        with self._lock:
            reachable = (
                self._listener.is_open or (self._run_active and self._save)
                or self._timers.stopping
            )
        if reachable or self._serving.current is not None or self._newcomers.waiting:
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
        self._serving.end(linger_s=CLOSE_LINGER_S if self._timers.stopping else 0.0)
        self._newcomers.close_all()
        self.delivery.requeue()
        fd = self._listener.fileno()
        with self._lock:
            self._listener.close()
        self._polls.forget_listener(fd)


class _PollSet:
    """What the sender thread polls while nobody is being served: the wake-up pipe the
    control calls write to, and the listener while there is room to accept."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._wake_r.fileno(), select.POLLIN)
        self._listener_fd = -1
        self._listener_polled = False

    def wake(self) -> None:
        """Cut the sender thread's poll short (any thread)."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def watch_listener(self, fd: int, room: bool) -> None:
        """Poll the listener ``fd`` while there is ``room`` to accept."""
        if fd != self._listener_fd:
            self.forget_listener(self._listener_fd)
            self._listener_fd = fd
        if room and not self._listener_polled:
            self._poller.register(fd, select.POLLIN)
        elif not room and self._listener_polled:
            self._poller.unregister(fd)
        self._listener_polled = room

    def forget_listener(self, fd: int) -> None:
        """The listener ``fd`` was closed."""
        if fd != self._listener_fd:
            return
        if self._listener_polled:
            self._poller.unregister(fd)
        self._listener_fd, self._listener_polled = -1, False

    def wait(self, timeout_ms: int) -> tuple[bool, bool]:
        """Poll at most ``timeout_ms``: whether connections wait to be accepted, whether a
        control call woke the thread."""
        ready = {fd for fd, _ in self._poller.poll(timeout_ms)}
        return self._listener_fd in ready, self._wake_r.fileno() in ready

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

"""The sender: serves qSender over the gtReceiver data protocol (spec 02 §4, 05).

One thread owns every socket. It answers each 4-byte request of the receiver
being served with exactly one reply, in order: the next slice of the buffer at
the head of qSender (whole events, at most ``max_reply_bytes``, one board), or
INSUFF_DATA after waiting ``idle_wait_s`` for data. Replies are gather writes of
a 16-byte header and a zero-copy view of the buffer, so the hot path moves no
payload bytes in Python. A reply whose send fails goes back to the head of
qSender whole, so the next receiver gets it; nothing is duplicated or leaked.

The listener follows the run: it opens at Start + Save (whichever comes last)
and closes once the run's data are delivered or ``delivery_timeout_s`` after
Stop. Connections are never closed at the end of a run: receivers learn about
it from the in-band 0xD headers.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ioc import decoder, packets
from ioc.pool import Buffer, BufferPool, Owner

#: Reply types of the protocol (the IOC sends only these two).
SERVER_SUMMARY = 4
INSUFF_DATA = 5

REQUEST_BYTES = 4
HEADER = struct.Struct(">iiii")
INSUFF_DATA_HEADER = HEADER.pack(INSUFF_DATA, 0, 0, 0)

#: Statistics cover the 7 card indices of a crate.
CARDS = 7
#: A buffer of master-trigger data is cut at whole 16-word packets.
TRIGGER_BOARD_TYPE = 4
TRIGGER_PACKET_BYTES = packets.TRIGGER_WORDS * 4

#: Runs of equal-size packets followed before falling back to a scan of every marker.
MAX_EQUAL_RUNS = 16

#: How long one blocked send may wait before the sender looks at the clock.
SEND_SLICE_S = 0.25
#: Timers (listener, idle receivers, flushing) are looked at least this often.
HOUSEKEEPING_S = 0.1
#: qSender is flushed this often while nobody can receive it.
FLUSH_PERIOD_S = 1.0
#: Accepted connections kept waiting for their turn; more wait in the kernel backlog.
MAX_WAITING = 64
LISTEN_BACKLOG = 16

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

    ``replies`` and ``bytes_sent`` count data replies (type 4) and their
    payload bytes this run; ``idle_replies`` counts INSUFF_DATA replies;
    ``flushed_*`` count data dropped because nobody could receive them.
    """

    listening: bool
    serving: bool
    client: str
    replies: int
    bytes_sent: int
    requeued: int
    idle_replies: int
    flushed_buffers: int
    flushed_bytes_by_card: tuple[int, ...]


def _native(word: int) -> int:
    """How a big-endian word reads through a native ``uint32`` view."""
    return int.from_bytes(word.to_bytes(4, "big"), sys.byteorder)


_NATIVE_LENGTH_MASK = _native(0x7FF << 16)


def _acceptable_length(length: int) -> bool:
    """A packet length N the decoder accepts (type-F header up to the largest event)."""
    return packets.TYPE_F_HEADER_LENGTH <= length <= packets.MAX_PACKET_LENGTH


def uniform_packet_words(words: np.ndarray) -> int:
    """Size in words of every packet when the payload is one chain of equal-size packets, else 0.

    The usual digitizer buffer (one trace length per board) is checked with two
    strided comparisons of the words on the chain, without reading the traces.
    """
    nwords = words.size
    if nwords < packets.TYPE_F_WORDS:
        return 0
    native = decoder.native_view(words)
    if native[0] != decoder.NATIVE_MARKER:
        return 0
    length = int(packets.packet_length(int(words[1])))
    stride = length + 1
    if not _acceptable_length(length) or nwords % stride:
        return 0
    if not (native[::stride] == decoder.NATIVE_MARKER).all():
        return 0
    if not ((native[1::stride] & _NATIVE_LENGTH_MASK) == _native(length << 16)).all():
        return 0
    return stride


def event_boundaries(words: np.ndarray) -> np.ndarray:
    """Word offsets where a reply may be cut in a digitizer payload, ending with its size.

    Follows the chain of packet lengths from word 0. A board's events mostly
    share one size, so the chain is first followed in runs of equal-size
    packets, checking only the words on the chain (strided views, no scan of
    the trace words). Payloads with many sizes or garbage fall back to the
    decoder's walk over every marker. Where the chain breaks (garbage), the
    end of the last whole packet and the next packet start found by the walk
    are boundaries; garbage in between is cut at word boundaries by the caller.
    """
    native = decoder.native_view(words)
    chained = _chain_in_equal_runs(words, native)
    if chained is not None:
        return chained
    return _chain_over_markers(words, native)


def _chain_in_equal_runs(words: np.ndarray, native: np.ndarray) -> np.ndarray | None:
    """Packet starts (and the end) when the chain is a few runs of equal-size packets, else None."""
    nwords = words.size
    pieces: list[np.ndarray] = []
    position = 0
    for _ in range(MAX_EQUAL_RUNS):
        if position == nwords:
            pieces.append(np.array([nwords], dtype=np.int64))
            return np.concatenate(pieces)
        if position + packets.TYPE_F_WORDS > nwords or native[position] != decoder.NATIVE_MARKER:
            return None
        length = int(packets.packet_length(int(words[position + 1])))
        stride = length + 1
        count = (nwords - position) // stride
        if not _acceptable_length(length) or count == 0:
            return None
        stop = position + count * stride
        on_chain = native[position:stop:stride] == decoder.NATIVE_MARKER
        on_chain &= packets.packet_length(words[position + 1 : stop : stride]) == length
        broken = np.flatnonzero(~on_chain)
        good = count if broken.size == 0 else int(broken[0])
        pieces.append(np.arange(position, position + good * stride, stride, dtype=np.int64))
        position += good * stride
    return None


def _chain_over_markers(words: np.ndarray, native: np.ndarray) -> np.ndarray:
    """Packet starts by finding every marker and following the chain over them (any content)."""
    nwords = words.size
    positions = np.flatnonzero(native == decoder.NATIVE_MARKER)
    if positions.size == 0:
        return np.array([0, nwords], dtype=np.int64)
    lengths = packets.packet_length(decoder.gather(native, positions + 1)).astype(np.int64)
    next_positions = positions + lengths + 1
    acceptable = (positions + packets.TYPE_F_WORDS <= nwords) & (next_positions <= nwords)
    acceptable &= (lengths >= packets.TYPE_F_HEADER_LENGTH) & (lengths <= packets.MAX_PACKET_LENGTH)
    chain = decoder.follow_chain(positions, next_positions, acceptable, nwords, stop_at_bad=False)
    pieces = [np.array([0, nwords], dtype=np.int64)]
    for first, stop in chain.runs:
        if stop > first:
            pieces.append(positions[first:stop])
            pieces.append(next_positions[stop - 1 : stop])
    return np.unique(np.concatenate(pieces))


def reply_ends(buf: Buffer, limit: int) -> list[int]:
    """Byte offsets where the successive replies of ``buf`` end, from ``buf.sent_bytes``.

    Each reply holds whole packets and at most ``limit`` bytes; boundaries are
    only computed when the rest does not fit in one reply. Garbage longer than
    ``limit`` is cut at word boundaries.
    """
    start, end = buf.sent_bytes, buf.nbytes
    if end - start <= limit:
        return [end]
    word_limit = limit - limit % 4
    if buf.board_type == TRIGGER_BOARD_TYPE and not buf.is_type_f:
        step = limit - limit % TRIGGER_PACKET_BYTES or word_limit
        return [*range(start + step, end, step), end]
    words = buf.words[start // 4 : end // 4]
    stride = (buf.packet_words or uniform_packet_words(words)) * 4
    if 0 < stride <= limit:
        step = limit - limit % stride
        return [*range(start + step, end, step), end]
    bounds = event_boundaries(words) * 4 + start
    ends: list[int] = []
    cut = start
    while end - cut > limit:
        best = int(bounds[int(np.searchsorted(bounds, cut + limit, side="right")) - 1])
        cut = best if best > cut else cut + word_limit
        ends.append(cut)
    ends.append(end)
    return ends


class _Connection:
    """One accepted receiver and what the sender knows about it."""

    __slots__ = ("answered", "hangup", "idle_since", "log", "logged", "peer", "received", "sock")

    def __init__(self, sock: socket.socket, peer: str, now: float, log: logging.Logger) -> None:
        self.sock = sock
        self.peer = peer
        self.received = 0  # request bytes read so far
        self.answered = 0  # replies completed
        self.idle_since = now
        self.log = log
        self.logged: set[str] = set()
        #: Reports a peer that closed or shut down its side, even with requests still queued.
        self.hangup = select.poll()
        self.hangup.register(sock, select.POLLRDHUP)

    def peer_gone(self) -> bool:
        """True once the receiver has closed: replies to it could only be lost."""
        return bool(self.hangup.poll(0))

    @property
    def pending(self) -> int:
        return self.received // REQUEST_BYTES - self.answered

    def log_once(self, reason: str, message: str, *args: object) -> None:
        """Log each bad case of a connection once, never a flood."""
        if reason not in self.logged:
            self.logged.add(reason)
            self.log.warning("receiver %s: " + message, self.peer, *args)

    def note_partial_request(self) -> None:
        if self.received % REQUEST_BYTES:
            self.log_once("partial", "partial request (%d bytes) at close",
                          self.received % REQUEST_BYTES)


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
    ) -> None:
        self.pool = pool
        self.config = config
        self.bind = bind
        self._port = port
        self.log = log or LOG
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
        #: Bumped (under pool.lock) at each run start; a held buffer of an older run is dropped.
        self._generation = 0
        self._listener: socket.socket | None = None
        self._bind_failed_logged = False
        # Owned by the sender thread.
        self._current: _Connection | None = None
        self._waiting: list[_Connection] = []
        self._held: Buffer | None = None
        self._held_generation = 0
        self._ends: list[int] = []
        self._next_flush = 0.0
        self._next_housekeeping = 0.0
        self._listener_fd = -1
        self._polled: dict[int, int] = {}
        self._poller = select.poll()
        self._scratch = bytearray(65536)
        #: A blocked read of the served receiver returns this often (idle timeouts need it).
        self._read_slice = max(0.01, min(HOUSEKEEPING_S, config.idle_timeout_s / 4))
        # Statistics, under _lock.
        self._client = ""
        self._replies = 0
        self._bytes_sent = 0
        self._requeued = 0
        self._idle_replies = 0
        self._flushed_buffers = 0
        self._flushed_bytes = [0] * CARDS

    # ----------------------------------------------------------- control API

    @property
    def port(self) -> int:
        """The bound port (an ephemeral port, once chosen, is kept for later runs)."""
        return self._port

    def start(self) -> None:
        """Start the sender thread; the listener opens with a run."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
            self._thread.start()

    def bind_check(self) -> None:
        """Raise OSError now if ``bind:port`` cannot be bound (fine while we hold it)."""
        with self._lock:
            if self._listener is not None or self._port == 0:
                return
            self._make_listener_socket().close()

    def run_started(self, save: bool) -> None:
        """Start: drop the last run's leftovers, zero the counters, listen if Save."""
        with self.pool.lock:
            self._generation += 1
            dropped = self.pool.flush_sender()
        if dropped:
            self.log.info("dropped %d buffers left over from the previous run", len(dropped))
        with self._lock:
            self._run_active = True
            self._save = save
            self._stopped_at = None
            self._drained = False
            self._listen_at = time.monotonic() + self.config.accept_delay_s
            self._replies = self._bytes_sent = self._requeued = self._idle_replies = 0
            self._flushed_buffers = 0
            self._flushed_bytes = [0] * CARDS
            self._bind_failed_logged = False
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
        """Stop: keep serving; the listener closes ``delivery_timeout_s`` from now at the latest."""
        with self._lock:
            self._run_active = False
            self._stopped_at = time.monotonic()
        self._wake()

    def drain_complete(self) -> None:
        """inLoop drained and outLoop flushed: close the listener once qSender is delivered."""
        with self._lock:
            self._drained = True
        self._wake()

    def stats(self) -> SenderStats:
        with self._lock:
            return SenderStats(
                listening=self._listener is not None,
                serving=self._current is not None,
                client=self._client,
                replies=self._replies,
                bytes_sent=self._bytes_sent,
                requeued=self._requeued,
                idle_replies=self._idle_replies,
                flushed_buffers=self._flushed_buffers,
                flushed_bytes_by_card=tuple(self._flushed_bytes),
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

    def _make_listener_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.max_segment > 0:
                with contextlib.suppress(OSError):  # accepted sockets inherit it, where allowed
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.config.max_segment)
            sock.bind((self.bind, self._port))
        except OSError:
            sock.close()
            raise
        return sock

    def _open_listener(self) -> None:
        """Open the listener (caller holds _lock); a failure is logged once per run."""
        if self._listener is not None or self._stopping:
            return
        try:
            sock = self._make_listener_socket()
            sock.listen(LISTEN_BACKLOG)
        except OSError as err:
            if not self._bind_failed_logged:
                self._bind_failed_logged = True
                self.log.error("cannot listen on %s:%d: %s", self.bind, self._port, err)
            return
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._listener = sock
        self.log.info("listening on %s:%d", self.bind, self._port)

    def _close_listener(self, why: str) -> None:
        """Accept whoever is in the backlog first, so closing resets nobody."""
        self._accept_all(limit=False)
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            self._unpoll(listener.fileno())
            self._listener_fd = -1
            listener.close()
            self.log.info("listener closed: %s", why)

    def _accept_all(self, limit: bool = True) -> None:
        """Accept every pending connection into the waiting list (up to MAX_WAITING)."""
        with self._lock:
            listener = self._listener
        while listener is not None and not (limit and len(self._waiting) >= MAX_WAITING):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self.log.warning("accept failed: %s", err)
                break
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocked sends and reads return in time for the thread to look at its clocks.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_SLICE_S))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._read_slice))
            peer = f"{address[0]}:{address[1]}"
            self._waiting.append(_Connection(sock, peer, time.monotonic(), self.log))
            self._next_housekeeping = 0.0  # serve it at once if nobody is being served
            self.log.info("receiver %s connected", peer)

    # ---------------------------------------------------------------- thread

    def _wake(self) -> None:
        self._next_housekeeping = 0.0  # a receiver being served is interrupted between requests
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        """The sender thread: survives its own bugs (logged) rather than stop serving."""
        self._poll_set(self._wake_r.fileno(), select.POLLIN)
        try:
            while True:
                try:
                    if self._step():
                        return
                except Exception:
                    self.log.exception("sender error: dropping the buffer being served")
                    self._drop_held()
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
        if now >= deadline or not (draining or self._data_waiting()):
            return True
        return self._current is None and not self._waiting

    def _timer_interval(self, now: float) -> float:
        """Time until the next timer that housekeeping must see."""
        deadlines = [now + HOUSEKEEPING_S]
        with self._lock:
            if self._stopping:
                deadlines.append(self._shutdown_deadline)
            if self._run_active and self._save and self._listener is None:
                deadlines.append(self._listen_at)
            if self._listener is not None and self._stopped_at is not None:
                deadlines.append(self._stopped_at + self.config.delivery_timeout_s)
        conn = self._current
        if conn is not None and conn.pending == 0:
            deadlines.append(conn.idle_since + self.config.idle_timeout_s)
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
            listener = self._listener
        if listener is not None:
            self._listener_fd = listener.fileno()
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
            if self._listener is None and due:
                self._open_listener()
            listener, run_active, stopping = self._listener, self._run_active, self._stopping
            stopped_at, drained = self._stopped_at, self._drained
        if listener is None or run_active or stopping:
            return  # shutdown closes it at the very end
        if drained and not self._data_waiting():
            self._close_listener("the run's data are delivered")
        elif stopped_at is not None and now >= stopped_at + self.config.delivery_timeout_s:
            self._close_listener(f"{self.config.delivery_timeout_s:g} s after Stop")

    def _manage_connections(self, now: float) -> None:
        """Close an idle receiver when data or other receivers wait; serve the next one."""
        conn = self._current
        if conn is not None and conn.pending == 0:
            idle = now - conn.idle_since
            if idle >= self.config.idle_timeout_s and (self._data_waiting() or self._waiting):
                conn.log_once("idle", "no request for %.1f s, closed", idle)
                self._end_connection()
        if self._waiting:
            self._prune_waiting()
        if self._current is None and self._waiting:
            conn = self._waiting.pop(0)
            conn.idle_since = now
            self._current = conn
            with self._lock:
                self._client = conn.peer
            self.log.debug("serving receiver %s", conn.peer)

    def _prune_waiting(self) -> None:
        """Close waiting connections whose peer has already gone (they would hold a place)."""
        alive = []
        for conn in self._waiting:
            if conn.peer_gone():
                self._read_leftover_requests(conn)
                conn.note_partial_request()
                self.log.info("receiver %s left before being served", conn.peer)
                conn.sock.close()
            else:
                alive.append(conn)
        self._waiting = alive

    def _read_leftover_requests(self, conn: _Connection) -> None:
        """Count what a departed receiver still had queued (for the partial-request log)."""
        with contextlib.suppress(OSError):
            while count := conn.sock.recv_into(self._scratch, 0, socket.MSG_DONTWAIT):
                conn.received += count

    def _data_waiting(self) -> bool:
        return self._held is not None or len(self.pool.q_sender) > 0

    def _flush_if_unreachable(self, now: float) -> None:
        """With no listener and nobody connected, drop qSender once per second (counted)."""
        with self._lock:
            reachable = (
                self._listener is not None or (self._run_active and self._save) or self._stopping
            )
        if reachable or self._current is not None or self._waiting:
            self._next_flush = now + FLUSH_PERIOD_S
            return
        if now < self._next_flush:
            return
        self._next_flush = now + FLUSH_PERIOD_S
        self._requeue_held()
        with self.pool.lock:
            dropped = self.pool.q_sender.get_all(Owner.SENDER)
            by_card = [0] * CARDS
            for buf in dropped:
                if 0 <= buf.card < CARDS:
                    by_card[buf.card] += buf.nbytes - buf.sent_bytes
            self.pool.release_many(dropped)
        if dropped:
            with self._lock:
                self._flushed_buffers += len(dropped)
                for card, nbytes in enumerate(by_card):
                    self._flushed_bytes[card] += nbytes
            self.log.info("nobody can receive: flushed %d buffers from qSender", len(dropped))

    # --------------------------------------------------------------- serving

    def _serve(self, conn: _Connection) -> None:
        """Read requests (each blocking read returns within ``_read_slice``); answer each in order.

        Returns when housekeeping is due, the receiver is quiet for a while, or it left.
        """
        sock, scratch = conn.sock, self._scratch
        while True:
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
            conn.received += count
            try:
                while conn.pending > 0:
                    if self._stopping and self._finished(time.monotonic()):
                        return
                    self._reply(conn)
            except _ConnectionLost:
                conn.note_partial_request()
                self._end_connection()
                return
            if self._held is None:
                # Take the next buffer and plan its cuts now, while the receiver is busy
                # reading: the next request is then answered without that delay.
                self._next_buffer(wait=0.0)
            conn.idle_since = now = time.monotonic()
            if now >= self._next_housekeeping:
                return

    def _reply(self, conn: _Connection) -> None:
        """Send one reply: the next slice of the head buffer, or INSUFF_DATA.

        A receiver that has closed (done, or killed with requests queued) gets
        nothing more: a reply sent now would be lost, so its buffer stays queued.
        """
        buf = self._next_buffer(wait=self.config.idle_wait_s)
        if conn.peer_gone():
            raise _ConnectionLost
        if buf is None:
            self._send(conn, INSUFF_DATA_HEADER, None)
            conn.answered += 1
            with self._lock:
                self._idle_replies += 1
            return
        start, end = buf.sent_bytes, self._ends[0]
        header = HEADER.pack(SERVER_SUMMARY, end - start, 0, 1)
        try:
            self._send(conn, header, memoryview(buf.data)[start:end])
        except _ConnectionLost:
            self._requeue_held()
            with self._lock:
                self._requeued += 1
            raise
        conn.answered += 1
        buf.sent_bytes = end
        with self._lock:
            self._replies += 1
            self._bytes_sent += end - start
        del self._ends[0]
        if not self._ends:
            self._held = None
            self.pool.release(buf)

    def _next_buffer(self, wait: float) -> Buffer | None:
        """The buffer being served, or the head of qSender after up to ``wait`` seconds."""
        if self._held is not None and self._held_generation != self._generation:
            self._requeue_held()
        while self._held is None:
            with self.pool.lock:
                buf = self.pool.q_sender.get(Owner.SENDER, wait)
                generation = self._generation
            if buf is None:
                return None
            if buf.sent_bytes >= buf.nbytes:
                self.pool.release(buf)  # nothing left: never an empty SERVER_SUMMARY
                continue
            self._held, self._held_generation = buf, generation
            self._ends = reply_ends(buf, self.config.max_reply_bytes)
        return self._held

    def _send(self, conn: _Connection, header: bytes, payload: memoryview | None) -> None:
        """One gather write of header + payload, finishing partial sends.

        Raises `_ConnectionLost` when the receiver is gone, takes nothing for
        ``idle_timeout_s``, or the shutdown deadline passes.
        """
        parts: list[bytes | memoryview] = [header] if payload is None else [header, payload]
        total = len(header) + (0 if payload is None else len(payload))
        done = 0
        last_progress = 0.0  # the clock is read only when a send comes back short
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

    def _drop_held(self) -> None:
        """Release the held buffer to qFree: a buffer that broke the sender is not retried."""
        buf, self._held = self._held, None
        self._ends = []
        if buf is not None:
            self.pool.release(buf)

    def _requeue_held(self) -> None:
        """Put the held buffer back at the head of qSender (released if from an older run)."""
        buf, self._held = self._held, None
        self._ends = []
        if buf is None:
            return
        with self.pool.lock:
            if self._held_generation == self._generation:
                self.pool.q_sender.put_front(buf)
            else:
                self.pool.release(buf)

    def _end_connection(self) -> None:
        """Close the receiver being served; its unfinished buffer goes back to qSender."""
        conn, self._current = self._current, None
        if conn is None:
            return
        self._requeue_held()
        self._unpoll(conn.sock.fileno())
        conn.sock.close()
        with self._lock:
            self._client = ""
        self._next_housekeeping = 0.0
        self.log.info("receiver %s left after %d replies", conn.peer, conn.answered)

    def _close_all(self) -> None:
        if self._current is not None:
            self._end_connection()
        for conn in self._waiting:
            conn.sock.close()
        self._waiting = []
        self._requeue_held()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            self._unpoll(listener.fileno())
            listener.close()


def _remaining(header: bytes, payload: memoryview | None, sent: int) -> list[bytes | memoryview]:
    """What is left of a reply after ``sent`` bytes went out."""
    if sent < len(header):
        rest: list[bytes | memoryview] = [header[sent:]]
        if payload is not None:
            rest.append(payload)
        return rest
    assert payload is not None
    return [payload[sent - len(header) :]]


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO / SO_RCVTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))

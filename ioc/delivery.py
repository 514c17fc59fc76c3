"""The sender's buffer bookkeeping: what is being sent, what awaits acknowledgement,
and every way data can leave the crate unsent.

The run's data form one stream in delivery order; its offsets are what v2
replies carry and v2 acknowledgements name. A buffer taken from qSender is
cut into replies (`ioc.cuts.reply_ends`). A classic reply is final once sent;
a v2 reply's bytes stay in their buffer until acknowledged, so when a v2
connection ends, everything unacknowledged goes back to the head of qSender
in order and the stream resumes at the first unacknowledged byte. A Start
(new generation) drops the previous run's leftovers, counted as superseded.

Used by the sender thread only, except `run_started` (run control's thread,
under the pool lock) and the statistics.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from ioc import cuts, protocol
from ioc.losses import LossLedger, LossReason, buffer_events
from ioc.pool import Buffer, BufferPool, Owner

#: Classic replies remembered to attribute bytes a closed connection never took.
RECENT_REPLIES = 64
#: Bytes of a reply header on the classic wire.
CLASSIC_HEADER_BYTES = 16


@dataclass(frozen=True)
class RunIdentity:
    """The run whose data the crate holds: `Online_CS_RunNumber` and wall time at Start."""

    number: int = protocol.NO_RUN
    start_ns: int = 0
    #: Package data of the boards enabled in the run.
    boards: tuple[int, ...] = ()


class _Span:
    """A buffer handed to a v2 client, from its first unacknowledged byte."""

    __slots__ = ("buf", "start", "stream_start")

    def __init__(self, buf: Buffer, start: int, stream_start: int) -> None:
        self.buf = buf
        self.start = start
        self.stream_start = stream_start

    @property
    def stream_end(self) -> int:
        return self.stream_start + self.buf.sent_bytes - self.start


class Delivery:
    """Buffers between qSender and the wire, and the run's stream offsets."""

    def __init__(self, pool: BufferPool, losses: LossLedger, max_reply_bytes: int) -> None:
        self.pool = pool
        self.losses = losses
        self.max_reply_bytes = max_reply_bytes
        #: Bumped at each Start under the pool lock; the sender thread catches up.
        self.generation = 0
        self.run = RunIdentity()
        self._caught_up = 0
        self._held: Buffer | None = None
        self._ends: list[int] = []
        self._unacked: collections.deque[_Span] = collections.deque()
        #: Stream offset of the next byte to send, and of the first unacknowledged one.
        self.sent = 0
        self.acked = 0
        #: How the last v2 client of this run described itself (handed to the next one).
        self.last_client = ""
        #: (card, payload bytes, events) of the latest classic replies (-1: no data).
        self._recent: collections.deque[tuple[int, int, int]] = collections.deque(
            maxlen=RECENT_REPLIES
        )

    # ------------------------------------------------------------- runs

    def run_started(self, run: RunIdentity) -> int:
        """Start: a new generation; drop what qSender still holds (superseded).

        Returns the bytes dropped here; the sender thread drops its own
        buffers when it catches up (`catch_up`).
        """
        with self.pool.lock:
            self.generation += 1
            self.run = run
            dropped = self.pool.q_sender.get_all(Owner.SENDER)
            nbytes = self._count(dropped, LossReason.SUPERSEDED)
            self.pool.release_many(dropped)
        return nbytes

    def catch_up(self) -> int:
        """In the sender thread: forget the previous run's buffers; returns bytes dropped."""
        if self._caught_up == self.generation:
            return 0
        with self.pool.lock:
            buffers = [span.buf for span in self._unacked]
            if self._held is not None and self._held not in buffers:
                buffers.append(self._held)
            for span in self._unacked:
                span.buf.sent_bytes = span.start
            nbytes = self._count(buffers, LossReason.SUPERSEDED)
            self._unacked.clear()
            self._held, self._ends = None, []
            self.pool.release_many(buffers)
            self.sent = self.acked = 0
            self.last_client = ""
            self._recent.clear()
            self._caught_up = self.generation
        return nbytes

    @property
    def held_generation(self) -> int:
        """The run whose data the sender still holds: acknowledgements of it still count."""
        return self._caught_up

    @property
    def current(self) -> bool:
        """Whether the sender thread has caught up with the latest Start."""
        return self._caught_up == self.generation

    # ---------------------------------------------------------- replies

    def next_buffer(self, wait: float) -> Buffer | None:
        """The buffer being served, or qSender's head within ``wait``; its next reply is
        ``[buf.sent_bytes, next_end)``, at stream offset `sent`."""
        self.catch_up()
        while self._held is None:
            with self.pool.lock:
                buf = self.pool.q_sender.get(Owner.SENDER, wait)
                stale = not self.current  # a Start came while we waited: the buffer is old
            if buf is None:
                return None
            self._held = buf
            if stale:
                self.catch_up()
            elif buf.sent_bytes >= buf.nbytes:
                self._held = None
                self.pool.release(buf)  # nothing left: never an empty data reply
            else:
                self._ends = cuts.reply_ends(buf, self.max_reply_bytes)
        return self._held

    @property
    def next_end(self) -> int:
        """Where the next reply of the buffer being served ends (whole packets)."""
        return self._ends[0]

    def prefetch(self) -> None:
        """Take the next buffer and plan its cuts while the receiver reads the last reply."""
        if self._held is None:
            self.next_buffer(0.0)

    def reply_sent(self, buf: Buffer, end: int, acknowledged: bool) -> None:
        """``buf`` is on the wire up to ``end``. Classic replies are final; v2 ones wait for
        an acknowledgement."""
        start = buf.sent_bytes
        if not acknowledged:
            self._recent.append((buf.card, end - start, buffer_events(buf, start, end)))
        elif not self._unacked or self._unacked[-1].buf is not buf:
            self._unacked.append(_Span(buf, start, self.sent))
        buf.sent_bytes = end
        self.sent += end - start
        if not acknowledged:
            self.acked = self.sent
        del self._ends[0]
        if not self._ends:
            self._held = None
            if not acknowledged:
                self.pool.release(buf)

    def acknowledge(self, offset: int) -> None:
        """Every byte below stream ``offset`` is stored: release what it covers.

        Raises ValueError for an offset beyond what was sent.
        """
        if offset > self.sent:
            raise ValueError(f"acknowledged {offset} bytes, only {self.sent} were sent")
        if offset <= self.acked:
            return
        self.acked = offset
        while self._unacked:
            span = self._unacked[0]
            if span.stream_end > offset:
                span.start += offset - span.stream_start
                span.stream_start = offset
                return
            self._unacked.popleft()
            if span.buf is not self._held:
                self.pool.release(span.buf)

    def requeue(self) -> int:
        """A connection ended: unacknowledged bytes and the buffer being cut go back to
        the head of qSender in order; returns the bytes put back."""
        with self.pool.lock:
            if not self.current:
                self.catch_up()
                return 0
            buffers: list[Buffer] = []
            for span in self._unacked:
                span.buf.sent_bytes = span.start
                buffers.append(span.buf)
            if self._held is not None and self._held not in buffers:
                buffers.append(self._held)
            self._unacked.clear()
            self._held, self._ends = None, []
            self.sent = self.acked
            for buf in reversed(buffers):
                self.pool.q_sender.put_front(buf)
        return sum(buf.nbytes - buf.sent_bytes for buf in buffers)

    def drop_unreachable(self) -> int:
        """Nobody can receive (listener closed, nobody connected): drop everything queued."""
        self.requeue()
        with self.pool.lock:
            dropped = self.pool.q_sender.get_all(Owner.SENDER)
            self._count(dropped, LossReason.UNREACHABLE)
            self.pool.release_many(dropped)
        return len(dropped)

    def no_data_sent(self) -> None:
        """A classic no-data reply went out (its header takes room in the socket too)."""
        self._recent.append((-1, 0, 0))

    def lost_in_flight(self, unsent: int) -> None:
        """The last ``unsent`` bytes handed to the socket of a classic client that was then
        closed never reached it: every reply they touch is lost whole (a receiver drops
        a partial reply)."""
        while unsent > 0 and self._recent:
            card, size, events = self._recent.pop()
            self.losses.add(LossReason.IN_FLIGHT, card, size, events)
            unsent -= CLASSIC_HEADER_BYTES + size

    # ------------------------------------------------------------- state

    def data_waiting(self) -> bool:
        """Something is left to send (queued, or the rest of the buffer being cut)."""
        return self._held is not None or len(self.pool.q_sender) > 0

    def outstanding(self) -> bool:
        """Something is not yet delivered for good: waiting, or sent and unacknowledged."""
        return self.data_waiting() or bool(self._unacked)

    def _count(self, buffers: list[Buffer], reason: LossReason) -> int:
        """Count undelivered bytes and events of ``buffers`` as lost for ``reason``."""
        total = 0
        for buf in buffers:
            nbytes = buf.nbytes - buf.sent_bytes
            if nbytes <= 0:
                continue
            self.losses.add(reason, buf.card, nbytes, buffer_events(buf, buf.sent_bytes))
            total += nbytes
        return total


"""The buffer pool and its three queues (spec 02 §1).

200 buffers of 1 MiB are allocated once and move between qFree, qWritten and
qSender by reference; the stages never copy bytes. Every buffer carries an
owner tag, changed under the pool's single lock together with the queue it
enters or leaves, so `BufferPool.audit` can prove conservation (or show a
leak) at any moment.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ioc.hardware import WORD

POOL_SIZE = 200
BUFFER_BYTES = 1 << 20
#: qFree at or below this share of the pool means nobody takes data promptly: inLoop
#: reads larger, rarer chunks to spare buffers (`ioc.scan_timing.read_rule`).
PRESSURE_FREE_SHARE = 1 / 4
#: qFree at or below this share of the pool is "running low": outLoop is asked for its
#: next batch at once instead of at its 50-ms beat. A full crate (receivers behind, its
#: retention budget used) keeps about 8 % of the pool out of qSender, and inLoop takes
#: more than that in 50 ms at 330 MB/s; waiting for the beat then stalls its reads.
LOW_FREE_SHARE = 1 / 8
BUFFER_WORDS = BUFFER_BYTES // 4


class Owner(enum.Enum):
    """Where a buffer is: in one of the queues or held by one stage."""

    FREE = "qFree"
    WRITTEN = "qWritten"
    SENDER_QUEUE = "qSender"
    INLOOP = "inLoop"
    OUTLOOP = "outLoop"
    SENDER = "sender"

    @property
    def queued(self) -> bool:
        return self in (Owner.FREE, Owner.WRITTEN, Owner.SENDER_QUEUE)


class Buffer:
    """One preallocated 1 MiB block and what inLoop recorded about its content."""

    __slots__ = (
        "after_reset",
        "board_type",
        "card",
        "data",
        "fifo",
        "id",
        "is_type_f",
        "nbytes",
        "owner",
        "packet_words",
        "sent_bytes",
        "words",
    )

    def __init__(self, buffer_id: int, nbytes: int = BUFFER_BYTES) -> None:
        self.id = buffer_id
        self.data = bytearray(nbytes)
        #: Big-endian word view of ``data``: what the FIFO reads write into.
        self.words = np.frombuffer(self.data, dtype=WORD)
        self.owner = Owner.FREE
        self.clear()

    def clear(self) -> None:
        """Forget the content (the bytes themselves are left as they are)."""
        self.card = -1
        self.board_type = 0
        self.fifo = -1
        self.is_type_f = False
        #: First buffer of its board after a FIFO reset: outLoop forgets the
        #: board's previous timestamps when it reaches it (in-band, so in order).
        self.after_reset = False
        self.nbytes = 0
        #: Bytes of the payload already delivered by the sender.
        self.sent_bytes = 0
        #: Set by outLoop when its check found equal-size packets chained over the
        #: whole payload (words per packet); 0 = unknown, the sender finds the cuts itself.
        self.packet_words = 0

    def payload(self) -> memoryview:
        """The valid bytes, zero-copy."""
        return memoryview(self.data)[: self.nbytes]

    def payload_words(self) -> np.ndarray:
        return self.words[: self.nbytes // 4]

    def __repr__(self) -> str:
        return f"Buffer(id={self.id}, card={self.card}, nbytes={self.nbytes}, {self.owner.value})"


@dataclass(frozen=True)
class PoolAudit:
    """A consistent snapshot of where the buffers are."""

    total: int
    free: int
    written: int
    sender: int
    held: int
    ok: bool


class BufferQueue:
    """A FIFO of buffer references that never refuses a put (it can hold all).

    It also knows how many payload bytes it holds (not yet delivered): the
    retention limit of qSender is a limit on memory, not on buffers.
    """

    def __init__(self, pool: BufferPool, owner: Owner) -> None:
        self._pool = pool
        self.owner = owner
        self._items: collections.deque[Buffer] = collections.deque()
        self._cond = threading.Condition(pool.lock)
        #: Undelivered payload bytes of the queued buffers (under the pool lock).
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, buf: Buffer) -> None:
        with self._cond:
            buf.owner = self.owner
            self._items.append(buf)
            self.bytes += buf.nbytes - buf.sent_bytes
            self._cond.notify()

    def put_front(self, buf: Buffer) -> None:
        """Return a buffer to the head (the sender's failed reply goes first)."""
        with self._cond:
            buf.owner = self.owner
            self._items.appendleft(buf)
            self.bytes += buf.nbytes - buf.sent_bytes
            self._cond.notify()

    def put_many(self, bufs: Iterable[Buffer]) -> None:
        with self._cond:
            for buf in bufs:
                buf.owner = self.owner
                self._items.append(buf)
                self.bytes += buf.nbytes - buf.sent_bytes
            self._cond.notify_all()

    def items_locked(self) -> collections.deque[Buffer]:
        """The queue itself, for a caller holding the pool lock that rearranges it."""
        return self._items

    def get(self, holder: Owner, timeout: float | None = None) -> Buffer | None:
        """Take the head buffer for ``holder``; wait up to ``timeout`` (None: don't wait)."""
        with self._cond:
            if not self._items and timeout:
                deadline = time.monotonic() + timeout
                while not self._items:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if not self._items:
                return None
            buf = self._items.popleft()
            buf.owner = holder
            self.bytes -= buf.nbytes - buf.sent_bytes
            return buf

    def get_all(self, holder: Owner) -> list[Buffer]:
        """Take the whole backlog at once (outLoop's batch)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self.bytes = 0
            for buf in items:
                buf.owner = holder
            return items

    def wait_nonempty(self, timeout: float) -> bool:
        """Wait until the queue holds something, at most ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._items), timeout)

    def snapshot(self) -> list[Buffer]:
        with self._cond:
            return list(self._items)


class BufferPool:
    """The 200 buffers and the queues qFree, qWritten and qSender."""

    def __init__(self, size: int = POOL_SIZE, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.lock = threading.RLock()
        self.buffers = [Buffer(i + 1, buffer_bytes) for i in range(size)]
        self.buffer_bytes = buffer_bytes
        self.q_free = BufferQueue(self, Owner.FREE)
        self.q_written = BufferQueue(self, Owner.WRITTEN)
        self.q_sender = BufferQueue(self, Owner.SENDER_QUEUE)
        self.q_free.put_many(self.buffers)
        self.low_free = int(size * LOW_FREE_SHARE)
        #: Set when inLoop takes a buffer and leaves `low_free` or fewer (outLoop waits on it).
        self.running_low = threading.Event()

    @property
    def size(self) -> int:
        return len(self.buffers)

    def under_pressure(self) -> bool:
        """Whether qFree is down to `PRESSURE_FREE_SHARE` of the pool or less."""
        return len(self.q_free) <= self.size * PRESSURE_FREE_SHARE

    def take_free(self, timeout: float | None = None) -> Buffer | None:
        """inLoop takes an empty buffer, waiting up to ``timeout`` (None: not at all); None
        when qFree stays empty. Signals `running_low` when few are left."""
        buf = self.q_free.get(Owner.INLOOP, timeout)
        if len(self.q_free) <= self.low_free:
            self.running_low.set()
        if buf is not None:
            buf.clear()
        return buf

    def release(self, buf: Buffer) -> None:
        """Any stage returns a buffer to qFree."""
        self.q_free.put(buf)

    def release_many(self, bufs: Iterable[Buffer]) -> None:
        self.q_free.put_many(bufs)

    def flush_sender(self) -> list[Buffer]:
        """Drop everything waiting in qSender; returns what was dropped (now free)."""
        with self.lock:
            dropped = self.q_sender.get_all(Owner.SENDER)
            self.q_free.put_many(dropped)
        return dropped

    def audit(self) -> PoolAudit:
        """Walk every owner tag and compare with the queues: the leak check."""
        with self.lock:
            counts = collections.Counter(buf.owner for buf in self.buffers)
            queued_ids: list[int] = []
            ok = True
            for queue in (self.q_free, self.q_written, self.q_sender):
                items = queue.snapshot()
                queued_ids.extend(buf.id for buf in items)
                if len(items) != counts[queue.owner]:
                    ok = False
                if any(buf.owner is not queue.owner for buf in items):
                    ok = False
            if len(queued_ids) != len(set(queued_ids)):
                ok = False
            held = sum(n for owner, n in counts.items() if not owner.queued)
            free, written, sender = len(self.q_free), len(self.q_written), len(self.q_sender)
            if free + written + sender + held != self.size:
                ok = False
            return PoolAudit(self.size, free, written, sender, held, ok)

"""What the crate keeps for receivers: qSender bounded by memory, not by buffer count.

inLoop reads each FIFO whenever it has data, so at low rates a buffer holds a
few kB of a 1 MiB block; counted in buffers, the pool would be "full" with a
few percent of its memory used. outLoop therefore hands every checked buffer
to `Retention`, which

- queues it untouched while receivers keep up (the fast path copies nothing);
- once qSender holds ``COMPACT_AFTER`` buffers or more (nobody is keeping up),
  moves its whole packets into the free room of the last queued buffer of the
  same board and class (``compact``), so queued buffers fill up and the
  emptied one goes back to qFree. Only the last buffer of a board ever takes
  more, so each board's data stay in order; a board's end-of-run header never
  moves forward into its data: it stays at its place in the queue, after
  whatever other boards queued before it. A classic receiver ends once every
  board it has seen sent its end-of-run header, so packed boards must not
  show theirs before a board whose data were queued earlier has been seen;
- says when the memory budget (``limit_bytes`` of undelivered data in qSender)
  is exhausted: outLoop then discards whole incoming buffers (never an
  end-of-run header) and counts them.
"""

from __future__ import annotations

from ioc import cuts
from ioc.packets import CH_END_OF_RUN, channel_id
from ioc.pool import Buffer, BufferPool, Owner

MIB = 1 << 20
#: Queued buffers from which on receivers are taken to be behind and buffers are packed.
COMPACT_AFTER = 8


def is_end_of_run(buf: Buffer) -> bool:
    """Whether ``buf`` is a board's end-of-run (0xD) header."""
    return buf.is_type_f and int(channel_id(int(buf.words[1]))) == CH_END_OF_RUN


def _content_class(buf: Buffer) -> bool:
    """Master-trigger packets never share a buffer (or a reply) with anything else."""
    return buf.board_type == cuts.TRIGGER_BOARD_TYPE and not buf.is_type_f


class Retention:
    """The qSender side of the pool: packing queued data and the memory budget."""

    def __init__(self, pool: BufferPool, limit_bytes: int) -> None:
        self.pool = pool
        self.limit_bytes = limit_bytes
        #: Per card, the last buffer queued for it (valid while still queued, see `_tail`).
        self._last: dict[int, Buffer] = {}
        self._packing = False

    def exhausted(self, buf: Buffer) -> bool:
        """Would queueing ``buf`` take undelivered data past the memory budget?"""
        return self.pool.q_sender.bytes + buf.nbytes > self.limit_bytes

    def queue(self, buf: Buffer) -> bool:
        """Queue a checked buffer for the sender; True if its data went into queued
        buffers and the caller must release it (it is then empty)."""
        q_sender = self.pool.q_sender
        with self.pool.lock:
            if len(q_sender) < COMPACT_AFTER:
                self._packing = False
            else:
                if not self._packing:
                    self._packing = True
                    self._repack()
                tail = None if is_end_of_run(buf) else self._tail(buf)
                if tail is not None:
                    moved = self._move(buf, tail)
                    q_sender.bytes += moved
                    if buf.nbytes == 0:
                        return True
            q_sender.put(buf)
            self._last[buf.card] = buf
        return False

    def _tail(self, buf: Buffer) -> Buffer | None:
        """The last queued buffer of ``buf``'s card, if it can take ``buf``'s packets."""
        tail = self._last.get(buf.card)
        if (
            tail is None
            or tail.owner is not Owner.SENDER_QUEUE
            or tail.card != buf.card
            or _content_class(tail) != _content_class(buf)
            or tail.nbytes >= len(tail.data)
        ):
            return None
        return tail

    def _move(self, source: Buffer, target: Buffer) -> int:
        """Move the leading whole packets of ``source`` that fit into ``target``'s room.

        What is left of ``source`` moves to its start. Returns the bytes moved.
        """
        room = len(target.data) - target.nbytes
        moved = cuts.packet_prefix(source, room)
        if moved <= 0:
            return 0
        start = source.sent_bytes
        data = memoryview(source.data)
        target.data[target.nbytes : target.nbytes + moved] = data[start : start + moved]
        if target.packet_words != source.packet_words:
            target.packet_words = 0
        target.is_type_f = target.is_type_f and source.is_type_f
        target.nbytes += moved
        rest = source.nbytes - start - moved
        data[start : start + rest] = data[start + moved : start + moved + rest]  # a memmove
        source.nbytes = start + rest
        return moved

    def _repack(self) -> None:
        """Packing starts: fill the buffers queued before it, each from its card's next ones."""
        items = self.pool.q_sender.items_locked()
        kept: list[Buffer] = []
        emptied: list[Buffer] = []
        target: dict[int, Buffer] = {}
        for buf in items:
            previous = target.get(buf.card)
            if (
                previous is not None
                and buf.sent_bytes == 0
                and not is_end_of_run(buf)
                and _content_class(previous) == _content_class(buf)
            ):
                self._move(buf, previous)
                if buf.nbytes == 0:
                    emptied.append(buf)
                    continue
            kept.append(buf)
            target[buf.card] = buf
        if emptied:
            items.clear()
            items.extend(kept)
            self.pool.q_free.put_many(emptied)
        self._last.update(target)

"""Filtered event sampling for online analysis: the tap and its consumers (issue 17).

outLoop hands every buffer it has checked to `SampleTap.offer`, on its own
thread and only after the check, so the primary path decides nothing here and
never waits: with no consumer attached the call returns at once; otherwise
each consumer's filter (`ioc.sample_filter`) selects its events as a mask over
header fields gathered in vectorised passes, and only the selected packets are
copied into that consumer's bounded queue; their fields are decoded later, by
the reader. The master trigger's packets are sampled the same way, for the
consumers whose filter takes them (`ioc.sample_filter.Source`). A full queue
drops the newest selection and counts it lost for that consumer alone; nothing
ever blocks, and the buffer goes on to the sender untouched. Readers (PV Access
RPC, the classic sample port) take from the queues on their own threads.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ioc import packets
from ioc.decoder import KIND_EVENT, decode, native_view
from ioc.pool import Buffer
from ioc.sample_filter import (
    FIELD_DECODERS,
    TRIGGER_FIELD_DECODERS,
    HeaderFields,
    Mode,
    SampleFilter,
    TriggerFields,
)

TRIGGER_BOARD_TYPE = 4
#: How often an on-request consumer (most recent, K ready) refreshes what it keeps.
KEEP_PERIOD_S = 0.010
#: Events a consumer's queue holds before new selections are dropped (and counted).
DEFAULT_QUEUE_EVENTS = 20_000

#: One sampled event: decoded fields and where its packet lies in its chunk's words.
SAMPLE_DTYPE = np.dtype(
    [
        ("board", np.uint16),
        ("channel", np.uint8),
        ("header_type", np.uint8),
        ("event_type", np.uint8),
        ("flags", np.uint16),
        ("timestamp", np.uint64),
        ("energy", np.int32),
        ("trigger_type", np.uint16),
        ("trigger_mask", np.uint16),
        ("multiplicity", np.uint16),
        ("offset", np.int64),
        ("length", np.int32),
    ]
)


@dataclass
class Chunk:
    """Sampled packets of one buffer (one board): copied back to back, and where each lies.

    The fields are decoded by whoever reads the chunk (`events`), never by outLoop.
    A chunk of trigger packets names its board (``trigger_board``, the package
    data): unlike a digitizer packet, a trigger packet does not carry it.
    """

    words: np.ndarray  # >u4
    offsets: np.ndarray  # int64, into ``words``
    lengths: np.ndarray  # N of each packet
    end_of_run: bool = False
    trigger_board: int | None = None

    @property
    def count(self) -> int:
        return int(self.offsets.size)

    @property
    def is_trigger(self) -> bool:
        return self.trigger_board is not None

    def part(self, start: int, stop: int | None = None) -> Chunk:
        return Chunk(self.words, self.offsets[start:stop], self.lengths[start:stop],
                     self.end_of_run, self.trigger_board)

    def events(self) -> np.ndarray:
        """The packets' decoded fields (`SAMPLE_DTYPE`); a trigger packet's digitizer
        fields are 0 and its channel `packets.TRIGGER_CHANNEL`."""
        events = np.zeros(self.count, dtype=SAMPLE_DTYPE)
        if self.count and self.trigger_board is not None:
            trigger = TriggerFields(native_view(self.words), self.offsets)
            for name in TRIGGER_FIELD_DECODERS:
                events[name] = trigger[name]
            events["board"] = self.trigger_board
            events["channel"] = packets.TRIGGER_CHANNEL
        elif self.count:
            fields = HeaderFields(native_view(self.words), self.offsets, whole=True)
            for name in FIELD_DECODERS:
                events[name] = fields[name]
        events["offset"] = self.offsets
        events["length"] = self.lengths
        return events


#: What a consumer gets of a buffer when it takes none of its matches (it only counts drops).
EMPTY_CHUNK = Chunk(np.zeros(0, dtype=">u4"), np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass
class ConsumerStats:
    id: int
    name: str
    filter: str
    delivered: int
    lost: int
    queued: int


@dataclass
class Consumer:
    """One attached consumer: its filter, its bounded queue and its counters."""

    id: int
    name: str
    filter: SampleFilter
    capacity: int = DEFAULT_QUEUE_EVENTS
    #: Classic-protocol consumers also get every board's end-of-run header (their exit rule).
    wants_end_of_run: bool = False
    delivered: int = 0
    lost: int = 0
    queued: int = 0
    last_read: float = field(default_factory=time.monotonic)
    _seen: int = 0
    _next_keep: float = 0.0
    _chunks: collections.deque[Chunk] = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)

    def stats(self) -> ConsumerStats:
        return ConsumerStats(self.id, self.name, self.filter.text(), self.delivered, self.lost,
                             self.queued)

    # Producer side (outLoop's thread): never blocks on a reader.

    def choose(self, matching: np.ndarray) -> tuple[np.ndarray, int]:
        """The indices this consumer takes of one buffer's matches, and how many it drops.

        On-request modes refresh what they keep at most every `KEEP_PERIOD_S`:
        "most recent" is then at most that old, and copying stays rare.
        """
        mode = self.filter.mode
        if mode in (Mode.RECENT, Mode.READY):
            now = time.monotonic()
            if now < self._next_keep:
                return matching[:0], 0
            self._next_keep = now + KEEP_PERIOD_S
            return matching[-(1 if mode is Mode.RECENT else self.filter.count) :], 0
        if mode is Mode.PRESCALE:
            n = self.filter.count
            first = (-self._seen) % n
            self._seen += matching.size
            matching = matching[first::n]
        room = max(0, self.capacity - self.queued)
        if matching.size > room:
            return matching[:room], matching.size - room
        return matching, 0

    def put(self, chunk: Chunk, dropped: int) -> None:
        with self._ready:
            self.lost += dropped
            if chunk.count or chunk.end_of_run:
                if self.filter.mode in (Mode.RECENT, Mode.READY):
                    self._keep_latest(chunk)
                else:
                    self._chunks.append(chunk)
                    self.queued += chunk.count
                self._ready.notify_all()

    def _keep_latest(self, chunk: Chunk) -> None:
        """On-request modes hold only the newest K events (K = 1 for RECENT)."""
        keep = 1 if self.filter.mode is Mode.RECENT else self.filter.count
        self._chunks.append(chunk)
        self.queued += chunk.count
        while self._chunks and self.queued - self._chunks[0].count >= keep:
            self.queued -= self._chunks.popleft().count
        if self.queued > keep:  # trim the oldest chunk's surplus events
            head = self._chunks[0]
            surplus = self.queued - keep
            self._chunks[0] = head.part(surplus)
            self.queued = keep

    # Reader side.

    def take(self, max_events: int, timeout: float) -> list[Chunk]:
        """Up to ``max_events`` queued events as chunks; wait up to ``timeout`` for the first."""
        with self._ready:
            self.last_read = time.monotonic()
            if not self._chunks and timeout > 0:
                self._ready.wait_for(lambda: bool(self._chunks), timeout)
            taken: list[Chunk] = []
            budget = max_events
            while self._chunks and budget > 0:
                head = self._chunks[0]
                if head.count > budget:
                    taken.append(head.part(0, budget))
                    self._chunks[0] = head.part(budget)
                    self.queued -= budget
                    self.delivered += budget
                    break
                self._chunks.popleft()
                taken.append(head)
                self.queued -= head.count
                self.delivered += head.count
                budget -= head.count
            return taken

    def take_chunk(self, timeout: float) -> Chunk | None:
        """The whole head chunk (one board's events), waiting up to ``timeout`` for one."""
        with self._ready:
            self.last_read = time.monotonic()
            if not self._chunks and timeout > 0:
                self._ready.wait_for(lambda: bool(self._chunks), timeout)
            if not self._chunks:
                return None
            chunk = self._chunks.popleft()
            self.queued -= chunk.count
            self.delivered += chunk.count
            return chunk

    def put_back(self, chunk: Chunk) -> None:
        """Return the unsent rest of a chunk to the head (a reply holds only part of it)."""
        with self._ready:
            self._chunks.appendleft(chunk)
            self.queued += chunk.count
            self.delivered -= chunk.count


class SampleTap:
    """Any number of consumers, fed from the buffers outLoop has checked."""

    def __init__(self, queue_events: int = DEFAULT_QUEUE_EVENTS) -> None:
        self.queue_events = queue_events
        self._lock = threading.Lock()
        #: Replaced, never mutated: outLoop reads it without a lock.
        self._consumers: tuple[Consumer, ...] = ()
        self._ids = itertools.count(1)
        #: Package data of each card in the current run (replaced at every Start).
        self._run_boards: dict[int, int] = {}
        #: Counters of consumers already detached, so the totals never go back.
        self.retired_delivered = 0
        self.retired_lost = 0

    def attach(self, sample_filter: SampleFilter, name: str = "", *,
               end_of_run: bool = False) -> Consumer:
        consumer = Consumer(next(self._ids), name, sample_filter, self.queue_events,
                            wants_end_of_run=end_of_run)
        with self._lock:
            self._consumers = (*self._consumers, consumer)
        return consumer

    def detach(self, consumer_id: int) -> bool:
        with self._lock:
            gone = [c for c in self._consumers if c.id == consumer_id]
            self._consumers = tuple(c for c in self._consumers if c.id != consumer_id)
            for consumer in gone:
                self.retired_delivered += consumer.delivered
                self.retired_lost += consumer.lost
        return bool(gone)

    def consumer(self, consumer_id: int) -> Consumer | None:
        return next((c for c in self._consumers if c.id == consumer_id), None)

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        return self._consumers

    def totals(self) -> tuple[int, int, int]:
        """(consumers, delivered, lost) including detached consumers' counts."""
        consumers = self._consumers
        return (
            len(consumers),
            self.retired_delivered + sum(c.delivered for c in consumers),
            self.retired_lost + sum(c.lost for c in consumers),
        )

    def set_run_boards(self, package_data: dict[int, int]) -> None:
        """At Start: each card's package data for the run (trigger packets do not carry it)."""
        self._run_boards = dict(package_data)

    # outLoop's call.

    def offer(self, buf: Buffer) -> None:
        """A checked buffer: copy each consumer's selection of it (never waits)."""
        consumers = self._consumers
        if not consumers:
            return
        if buf.is_type_f:
            self._offer_status(buf, consumers)
        elif buf.board_type == TRIGGER_BOARD_TYPE:
            self._offer_triggers(buf, consumers)
        else:
            self._offer_events(buf, consumers)

    def _offer_status(self, buf: Buffer, consumers: tuple[Consumer, ...]) -> None:
        words = buf.payload_words()
        if words.size < packets.TYPE_F_WORDS:
            return
        if int(packets.channel_id(int(words[1]))) != packets.CH_END_OF_RUN:
            return
        length = packets.TYPE_F_HEADER_LENGTH
        chunk = Chunk(words[: length + 1].copy(), np.zeros(1, np.int64),
                      np.full(1, length, np.int64), end_of_run=True)
        for consumer in consumers:
            if consumer.wants_end_of_run:
                consumer.put(chunk, 0)

    def _offer_events(self, buf: Buffer, consumers: tuple[Consumer, ...]) -> None:
        takers = [c for c in consumers if c.filter.takes_digitizer]
        if not takers:
            return
        words = buf.payload_words()
        offsets, lengths = event_spans(words, buf.packet_words)
        if offsets.size == 0:
            return
        fields = HeaderFields(native_view(words), offsets)
        for consumer in takers:
            chunk, dropped = _selection(consumer, consumer.filter.match(fields), words, offsets,
                                        lengths, buf.packet_words)
            if chunk is not None:
                consumer.put(chunk, dropped)

    def _offer_triggers(self, buf: Buffer, consumers: tuple[Consumer, ...]) -> None:
        takers = [c for c in consumers if c.filter.takes_trigger]
        if not takers:
            return
        words = buf.payload_words()
        size = packets.TRIGGER_WORDS
        offsets = np.arange(0, words.size - size + 1, size, dtype=np.int64)
        if offsets.size == 0:
            return
        lengths = np.full(offsets.size, size - 1, dtype=np.int64)
        board = self._run_boards.get(buf.card, -1)
        fields = TriggerFields(native_view(words), offsets)
        for consumer in takers:
            chunk, dropped = _selection(consumer, consumer.filter.match_trigger(board, fields),
                                        words, offsets, lengths, size, trigger_board=board)
            if chunk is not None:
                consumer.put(chunk, dropped)


def _selection(consumer: Consumer, mask: np.ndarray | None, words: np.ndarray,
               offsets: np.ndarray, lengths: np.ndarray, packet_words: int,
               trigger_board: int | None = None) -> tuple[Chunk | None, int]:
    """What ``consumer`` takes of a buffer's packets matching ``mask`` (None: all), copied,
    and how many it drops; (None, 0) when it has nothing to put."""
    matching = np.arange(offsets.size) if mask is None else np.flatnonzero(mask)
    if matching.size == 0:
        return None, 0
    chosen, dropped = consumer.choose(matching)
    if chosen.size == 0:
        return (EMPTY_CHUNK, dropped) if dropped else (None, 0)
    return copy_events(words, offsets, lengths, chosen, packet_words, trigger_board), dropped


def event_spans(words: np.ndarray, packet_words: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, N) of the digitizer events of a checked buffer.

    When the check found equal-size packets chained over the whole buffer the
    starts are arithmetic; otherwise the decoder finds them.
    """
    if packet_words:
        offsets = np.arange(0, words.size - packet_words + 1, packet_words, dtype=np.int64)
        return offsets, np.full(offsets.size, packet_words - 1, dtype=np.int64)
    events = decode(words).events
    events = events[events["kind"] == KIND_EVENT]
    return events["offset"].astype(np.int64), events["length"].astype(np.int64)


def copy_events(words: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                chosen: np.ndarray, packet_words: int = 0,
                trigger_board: int | None = None) -> Chunk:
    """Copy only the chosen packets (whole, back to back); nothing is decoded here.

    Equal-size packets (``packet_words``, known from the check) are copied as
    rows of a 2-D view; others through an index of every word they hold.
    """
    sizes = lengths[chosen] + 1
    new_offsets = np.zeros(chosen.size, dtype=np.int64)
    if chosen.size > 1:
        np.cumsum(sizes[:-1], out=new_offsets[1:])
    if packet_words:
        rows = words[: offsets.size * packet_words].reshape(offsets.size, packet_words)
        copied = rows[chosen].reshape(-1)
    else:
        total = int(sizes.sum())
        copied = words[np.arange(total, dtype=np.int64)
                       + np.repeat(offsets[chosen] - new_offsets, sizes)]
    return Chunk(copied, new_offsets, lengths[chosen], trigger_board=trigger_board)

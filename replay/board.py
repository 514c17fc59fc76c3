"""A replayed board: recorded packets enter its FIFO when their time comes.

Packets wait in a bounded queue that the crate's feeder thread keeps topped up
from the recording. Like the simulator, a board does nothing between calls:
each call that looks at the FIFO first lets in the packets now due, that is
whose timestamp, counted from the recording's first, divided by the speed, is
past the time since master logic went on. What does not fit is lost and
counted, and the FIFO reports full, as a real FIFO would; at speed "max"
packets enter as soon as there is room below the almost-full mark, so none
is lost and the IOC reads as fast as it can.

Master logic on after a run starts the recording again from its beginning:
every run replays it whole.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from ioc.hardware import TRIGGER_FIFOS, WORD, Board, BoardIdentity, FifoStatus, ReadError
from ioc.packets import PACKAGE_DATA_MAX, TIMESTAMP_MASK
from replay.packets import Packets
from sim import registers

log = logging.getLogger("dgs.replay")

#: Packets queued ahead per board (words): what the feeder keeps ready.
QUEUE_WORDS = 1 << 20


class WordFifo:
    """A FIFO of whole packets in one block of memory (allocated on first use)."""

    def __init__(self, capacity_words: int) -> None:
        self.capacity_words = capacity_words
        self.almost_full_words = -(-capacity_words * 7 // 8)
        self.full = False
        self._memory: np.ndarray | None = None
        self._head = self._tail = 0

    @property
    def depth_words(self) -> int:
        return self._tail - self._head

    def push(self, words: np.ndarray) -> None:
        count = words.size
        if self._memory is None:
            self._memory = np.zeros(self.capacity_words, dtype=WORD)
        if self._tail + count > self.capacity_words:
            depth = self.depth_words
            self._memory[:depth] = self._memory[self._head : self._tail]
            self._head, self._tail = 0, depth
        self._memory[self._tail : self._tail + count] = words
        self._tail += count

    def read(self, out: np.ndarray, count: int) -> None:
        assert self._memory is not None or count == 0
        if count:
            out[:count] = self._memory[self._head : self._head + count]
        self._head += count
        if self._head == self._tail:
            self._head = self._tail = 0

    def clear(self) -> None:
        self._head = self._tail = 0
        self.full = False


class ReplayBoard(Board):
    """One configured board, fed with its recorded packets (thread-safe)."""

    def __init__(
        self,
        identity: BoardIdentity,
        package_data: int,
        *,
        fifo_words: int,
        speed: float,
        first_key: int,
        origin_ns: int,
        wake: threading.Event,
    ) -> None:
        self.identity = identity
        self._lock = threading.Lock()
        self._speed = speed
        self._first_key = first_key
        self._wake = wake
        count = TRIGGER_FIFOS if identity.kind.is_trigger else 1
        self._fifos = [WordFifo(fifo_words) for _ in range(count)]
        self._selected = 0
        self._on_since_ns: int | None = None
        self._queue: collections.deque[Packets] = collections.deque()
        self._queued_words = 0
        self._generation = 0  # raised by a rewind: blocks read before it are refused
        self._fresh = True  # nothing replayed since the last rewind
        self.replayed = 0  # packets that entered a FIFO
        self.dropped = 0  # packets that arrived when their FIFO had no room
        self._at_on = (0, 0)  # both counts when master logic last went on
        # The replay clock (latch_timestamp): a key and when it was current.
        self._clock_key, self._clock_ns = first_key, origin_ns
        self._latched = 0
        self._package_register = (
            registers.TRIGGER_PACKAGE_DATA
            if identity.kind.is_trigger
            else registers.DIGITIZER_PACKAGE_DATA
        )
        self._registers = registers.power_on(identity.kind, package_data)

    # What the feeder thread uses.

    def wanted(self) -> tuple[int, bool]:
        """``(generation, whether the queue wants more)`` for the feeder."""
        with self._lock:
            return self._generation, self._queued_words < QUEUE_WORDS

    def offer(self, generation: int, packets: Packets) -> None:
        """Queue packets read for ``generation`` (dropped if a rewind came since)."""
        with self._lock:
            if generation == self._generation and len(packets):
                self._queue.append(packets)
                self._queued_words += packets.nwords

    # Letting packets in.

    def _due_key(self, now_ns: int) -> float:
        if self._speed == 0:
            return float("inf")
        assert self._on_since_ns is not None
        return self._first_key + (now_ns - self._on_since_ns) / 10 * self._speed

    def _admit(self) -> None:
        """Move the packets now due into the selected FIFO (lock held)."""
        if self._on_since_ns is None or not self._queue:
            return
        due = self._due_key(time.monotonic_ns())
        fifo = self._fifos[self._selected]
        limit = fifo.capacity_words if self._speed else fifo.almost_full_words - 1
        while self._queue:
            block = self._queue[0]
            ready = int(np.searchsorted(block.keys, due, side="right"))
            if ready == 0:
                break
            room = limit - fifo.depth_words
            fits = max(0, int(np.searchsorted(block.bounds, room, side="right")) - 1)
            taken = min(ready, fits)
            if taken:
                fifo.push(block.words[: int(block.bounds[taken])])
                self.replayed += taken
                self._fresh = False
                self._clock_key, self._clock_ns = int(block.keys[taken - 1]), time.monotonic_ns()
            lost = 0
            if taken < ready and self._speed:
                lost = ready - taken
                self.dropped += lost
                fifo.full = True
            used = taken + lost
            self._queued_words -= int(block.bounds[used])
            if used == len(block):
                self._queue.popleft()
            else:
                self._queue[0] = block.part(used, len(block))
                break
        if self._queued_words < QUEUE_WORDS // 2:
            self._wake.set()

    # The Board interface.

    @property
    def package_data(self) -> int:
        with self._lock:
            return registers.PACKAGE_DATA.get(self._registers[self._package_register])

    @property
    def fifo_words(self) -> int:
        return self._fifos[0].capacity_words

    def _fifo(self, fifo: int) -> WordFifo:
        return self._fifos[fifo if self.identity.kind.is_trigger else 0]

    def status(self, fifo: int = 0) -> FifoStatus:
        with self._lock:
            self._admit()
            target = self._fifo(fifo)
            depth = target.depth_words
            return FifoStatus(target.full, depth >= target.almost_full_words, depth == 0, depth)

    def read(self, out: np.ndarray, nwords: int, fifo: int = 0) -> int:
        with self._lock:
            target = self._fifo(fifo)
            if not 0 <= nwords <= target.depth_words:
                raise ReadError(
                    f"{self.identity.name}: read of {nwords} words, FIFO depth {target.depth_words}"
                )
            target.read(out, nwords)
            return nwords

    def reset_fifo(self, fifo: int = 0) -> None:
        with self._lock:
            self._admit()
            self._fifo(fifo).clear()

    def set_master_logic(self, on: bool) -> None:
        with self._lock:
            if on == (self._on_since_ns is not None):
                return
            if not on:
                self._admit()
                self._on_since_ns = None
                self._say_what_was_replayed()
                return
            if not self._fresh:
                self._generation += 1
                self._queue.clear()
                self._queued_words = 0
                self._fresh = True
                self._wake.set()
            self._on_since_ns = time.monotonic_ns()
            self._at_on = (self.replayed, self.dropped)

    def _say_what_was_replayed(self) -> None:
        """One line per board and run: a replay too fast for the IOC shows here (lock held)."""
        replayed, dropped = self.replayed - self._at_on[0], self.dropped - self._at_on[1]
        if replayed or dropped:
            log.info("replay: %s: %d packets replayed, %d lost to a full FIFO",
                     self.identity.name, replayed, dropped)

    def reinit_pipeline(self) -> None:
        """Nothing to re-initialise: the packets are recorded."""

    def latch_timestamp(self) -> int:
        """The replay's clock: the last packet's timestamp, running on in real time since it
        entered (before any, from the recording's first at build), never going back; so the
        IOC's own headers fall among and after the replayed packets."""
        with self._lock:
            now_ns = time.monotonic_ns()
            running = self._clock_key + (now_ns - self._clock_ns) // 10
            self._latched = max(self._latched, running)
            return self._latched & TIMESTAMP_MASK

    def set_package_data(self, value: int) -> None:
        """The board id the IOC's own headers carry; replayed packets keep the recorded one."""
        if not 0 <= value <= PACKAGE_DATA_MAX:
            raise ValueError(f"package data is 0..{PACKAGE_DATA_MAX}, not {value}")
        with self._lock:
            current = self._registers[self._package_register]
            self._registers[self._package_register] = registers.PACKAGE_DATA.put(current, value)

    def select_fifo(self, fifo: int) -> None:
        if self.identity.kind.is_trigger:
            with self._lock:
                self._admit()
                self._selected = fifo

    def write_register(self, register: str, value: int) -> None:
        with self._lock:
            if register not in self._registers:
                raise KeyError(register)
            if registers.is_read_only(register):
                raise ValueError(f"{self.identity.name}: {register} is read-only")
            self._registers[register] = int(value) & registers.REGISTER_MASK

    def read_register(self, register: str) -> int:
        with self._lock:
            return self._registers[register]

"""A board FIFO: a fixed block of words plus a record of the events in it.

Events enter whole, in batches written straight into the FIFO's memory (no
intermediate copy); reads take words from the head. The memory is one array
of the FIFO's capacity, compacted when a batch would run past its end, so it
never grows. Each batch remembers its event size and the channel of every
event, so a reset can say how many events of each channel it threw away.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from ioc.hardware import WORD


@dataclass
class Batch:
    start: int  # absolute word index of its first word (words ever written before it)
    event_words: int
    channels: np.ndarray  # uint8, one per event
    epoch: int  # accounting epoch it was generated in

    @property
    def end(self) -> int:
        return self.start + self.event_words * self.channels.size


def cleared_counts(
    batches: collections.deque[Batch], read_words: int, epoch: int, channels: int
) -> np.ndarray:
    """Per channel, the events of ``epoch`` with words unread at absolute word ``read_words``."""
    cleared = np.zeros(channels, dtype=np.int64)
    for batch in batches:
        if batch.epoch != epoch:
            continue
        first = max(0, (read_words - batch.start) // batch.event_words)
        cleared += np.bincount(batch.channels[first:], minlength=channels)
    return cleared


class Fifo:
    """One FIFO of ``capacity_words`` words holding whole events."""

    def __init__(self, capacity_words: int, channels: int) -> None:
        if capacity_words <= 0:
            raise ValueError("a FIFO needs a positive capacity")
        self.capacity_words = capacity_words
        self.channels = channels
        # "Almost full" = at least 7/8 of the capacity (rounded up to whole words).
        self.almost_full_words = -(-capacity_words * 7 // 8)
        self.full = False
        self._memory: np.ndarray | None = None  # allocated on first use
        self._head = 0
        self._tail = 0
        self._read_words = 0  # absolute index of the head word
        self._batches: collections.deque[Batch] = collections.deque()

    @property
    def depth_words(self) -> int:
        return self._tail - self._head

    @property
    def free_words(self) -> int:
        return self.capacity_words - self.depth_words

    def reserve(self, nwords: int) -> np.ndarray:
        """A writable ``>u4`` view of the next ``nwords`` words; `commit` makes them data."""
        if nwords > self.free_words:
            raise ValueError(f"{nwords} words do not fit in {self.free_words} free words")
        if self._memory is None:
            self._memory = np.zeros(self.capacity_words, dtype=WORD)
        if self._tail + nwords > self.capacity_words:
            depth = self.depth_words
            self._memory[:depth] = self._memory[self._head : self._tail]
            self._head, self._tail = 0, depth
        return self._memory[self._tail : self._tail + nwords]

    def commit(self, event_words: int, channels: np.ndarray, epoch: int) -> None:
        """Append the events just written into the reserved view."""
        if channels.size == 0:
            return
        start = self._read_words + self.depth_words
        self._batches.append(Batch(start, event_words, channels, epoch))
        self._tail += event_words * channels.size

    def read(self, out: np.ndarray, nwords: int) -> None:
        """Move the oldest ``nwords`` words into ``out[:nwords]``."""
        if not 0 <= nwords <= self.depth_words:
            raise ValueError(f"cannot read {nwords} words from a FIFO of depth {self.depth_words}")
        if nwords == 0:
            return
        out[:nwords] = self._memory[self._head : self._head + nwords]
        self._head += nwords
        self._read_words += nwords
        if self._head == self._tail:
            self._head = self._tail = 0
        while self._batches and self._batches[0].end <= self._read_words:
            self._batches.popleft()

    def clear(self, epoch: int) -> np.ndarray:
        """Empty the FIFO; returns, per channel, how many events of ``epoch`` it threw away.

        An event counts as thrown away if any of its words were still unread.
        """
        cleared = cleared_counts(self._batches, self._read_words, epoch, self.channels)
        self._read_words += self.depth_words
        self._batches.clear()
        self._head = self._tail = 0
        self.full = False
        return cleared

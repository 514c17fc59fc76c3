"""The crate process's side of a FIFO in the shared window: a ring the IOC reads.

It keeps `sim.fifo.Fifo`'s interface, so a `SimBoard` writes events into it as
into its own FIFO; the difference is where the words and positions live. Only
this side moves the tail (after a batch is whole, so the depth the IOC sees is
always event-bounded); the IOC moves the head as it reads, and `clear` (a FIFO
reset, which the IOC requests between reads) sets head = tail.
"""

from __future__ import annotations

import collections

import numpy as np

from ioc.hardware import WORD
from sim.fifo import Batch, cleared_counts
from sim.window import F_FULL, F_HEAD, F_TAIL


class RingFifo:
    """One FIFO of ``ring.size`` words in a window, filled by the crate process."""

    def __init__(self, ring: np.ndarray, control: np.ndarray, channels: int) -> None:
        self.capacity_words = ring.size
        self.channels = channels
        self.almost_full_words = -(-self.capacity_words * 7 // 8)
        self._ring = ring
        self._control = control
        self._batches: collections.deque[Batch] = collections.deque()
        #: A batch that would run past the ring's end is written here, then copied in two parts.
        self._scratch: np.ndarray | None = None

    @property
    def full(self) -> bool:
        return bool(self._control[F_FULL])

    @full.setter
    def full(self, value: bool) -> None:
        self._control[F_FULL] = int(value)

    @property
    def depth_words(self) -> int:
        return int(self._control[F_TAIL] - self._control[F_HEAD])

    @property
    def free_words(self) -> int:
        return self.capacity_words - self.depth_words

    def reserve(self, nwords: int) -> np.ndarray:
        """A writable view of the next ``nwords`` words; `commit` makes them data."""
        if nwords > self.free_words:
            raise ValueError(f"{nwords} words do not fit in {self.free_words} free words")
        start = int(self._control[F_TAIL]) % self.capacity_words
        if start + nwords <= self.capacity_words:
            self._scratch = None
            return self._ring[start : start + nwords]
        self._scratch = np.empty(nwords, dtype=WORD)
        return self._scratch

    def commit(self, event_words: int, channels: np.ndarray, epoch: int) -> None:
        """Publish the events just written: the tail moves past them."""
        if channels.size == 0:
            return
        tail = int(self._control[F_TAIL])
        nwords = event_words * channels.size
        if self._scratch is not None:
            start = tail % self.capacity_words
            first = self.capacity_words - start
            self._ring[start:] = self._scratch[:first]
            self._ring[: nwords - first] = self._scratch[first:nwords]
            self._scratch = None
        self._forget_read()
        self._batches.append(Batch(tail, event_words, channels, epoch))
        self._control[F_TAIL] = tail + nwords

    def clear(self, epoch: int) -> np.ndarray:
        """Empty the FIFO; per channel, how many events of ``epoch`` it threw away."""
        head = int(self._control[F_HEAD])
        cleared = cleared_counts(self._batches, head, epoch, self.channels)
        self._control[F_HEAD] = self._control[F_TAIL]
        self._batches.clear()
        self.full = False
        return cleared

    def _forget_read(self) -> None:
        head = int(self._control[F_HEAD])
        while self._batches and self._batches[0].end <= head:
            self._batches.popleft()

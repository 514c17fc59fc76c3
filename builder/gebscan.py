"""Reading GEB files in bounded blocks: whole records only, their timestamps found with numpy.

`scan_records` is `receiver.geb.read_records` for bytes that may end inside a
record: it walks the chain of lengths (a growing run of equal-length records
checked at once, one step per length change) and stops before a partial record.
`RecordReader` reads a byte range of a file into one buffer it keeps for its
whole life (fresh memory costs page faults on first touch, a large share of a
merge's time otherwise): each `RecordReader.refill` moves the records not yet
used to the front and reads the next block behind them. `RecordBlocks` hands
out copies of whole blocks, for callers that keep them. `file_timestamps` only
looks at headers, through memory maps of a window at a time (no copy at all).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from receiver.geb import GEB_HEADER_BYTES


class CorruptFile(ValueError):
    """A file's records do not chain up to its end (truncated or not a GEB file)."""


def field_at(raw: np.ndarray, offsets: np.ndarray, at: int, dtype: str) -> np.ndarray:
    """The ``dtype`` field ``at`` bytes into each record starting at ``offsets`` (one gather)."""
    size = np.dtype(dtype).itemsize
    if raw.size < size:
        return np.empty(0, dtype=dtype)
    fields = np.ndarray((raw.size - size + 1,), dtype=dtype, buffer=raw, strides=(1,))
    return fields[offsets + at]


def _every(raw: np.ndarray, position: int, count: int, step: int, at: int,
           dtype: str) -> np.ndarray:
    """A view of the field ``at`` of ``count`` records of ``step`` bytes from ``position``."""
    return np.ndarray((count,), dtype=dtype, buffer=raw, offset=position + at, strides=(step,))


def scan_records(raw: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """The whole records at the beginning of ``raw``: their starts, where they end, and
    their timestamps. Runs of equal-length records are read as strided views (no gather)."""
    size = raw.size
    found: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    position, block = 0, 16
    while position + GEB_HEADER_BYTES <= size:
        length = int(_every(raw, position, 1, 1, 4, "<i4")[0])
        if length < 0:
            raise CorruptFile(f"negative record length at byte {position}")
        step = GEB_HEADER_BYTES + length
        count = min(block, (size - position) // step)
        if count == 0:
            break
        same = _every(raw, position, count, step, 4, "<i4") == length
        run = count if bool(same.all()) else max(1, int(np.argmin(same)))
        found.append(position + step * np.arange(run, dtype=np.int64))
        stamps.append(_every(raw, position, run, step, 8, "<u8").astype(np.uint64))
        position += run * step
        block = min(block * 4, 1 << 22) if run == count else 16
    if not found:
        return np.empty(0, dtype=np.int64), position, np.empty(0, dtype=np.uint64)
    if len(found) == 1:
        return found[0], position, stamps[0]
    return np.concatenate(found), position, np.concatenate(stamps)


def file_timestamps(path: Path, window_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(timestamps, bytes)`` of the records of a file, a mapped window at a time."""
    size = os.path.getsize(path)
    position = 0
    with open(path, "rb") as source:
        window = window_bytes
        while position < size:
            aligned = position - position % mmap.ALLOCATIONGRANULARITY
            length = min(window + position - aligned, size - aligned)
            mapped = mmap.mmap(source.fileno(), length, offset=aligned, access=mmap.ACCESS_READ)
            try:
                raw = np.frombuffer(mapped, dtype=np.uint8)[position - aligned :]
                _, end, stamps = scan_records(raw)  # copies: the map can close
                del raw
            finally:
                mapped.close()
            if end == 0:
                if aligned + length >= size:
                    raise CorruptFile(f"{path}: a partial record at byte {position}")
                window *= 2  # a record longer than the window
                continue
            yield stamps, end
            position += end


@dataclass
class Block:
    """Whole records read from a file: bytes, record starts (plus the end), timestamps."""

    data: np.ndarray
    bounds: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return self.timestamps.size


class RecordReader:
    """The records of ``path``'s bytes ``[start, stop)``, a block at a time in one kept buffer.

    After `refill`, records ``next..`` of ``bounds``/``timestamps`` are the ones
    not used yet (``bounds``: record starts in ``buffer`` and the end of the
    last whole record). Callers use records by moving ``next`` on; views of
    ``buffer`` stay valid until the next `refill`.
    """

    def __init__(self, path: Path, block_bytes: int, start: int = 0,
                 stop: int | None = None) -> None:
        self.path = path
        self.block_bytes = max(int(block_bytes), 4096)
        self.buffer = np.empty(2 * self.block_bytes, dtype=np.uint8)
        self.position = start
        self.stop = os.path.getsize(path) if stop is None else stop
        self.filled = 0
        self.bounds = np.zeros(1, dtype=np.int64)
        self.timestamps = np.empty(0, dtype=np.uint64)
        self.next = 0
        self._fd: int | None = None

    @property
    def done(self) -> bool:
        """Everything of the range has been read into the buffer."""
        return self.position >= self.stop

    @property
    def remaining(self) -> int:
        return self.timestamps.size - self.next

    def refill(self) -> None:
        """Keep the unused records (and a partial one), read the next block behind them."""
        keep_from = int(self.bounds[self.next])
        kept = self.filled - keep_from
        if kept and keep_from:
            self.buffer[:kept] = self.buffer[keep_from : self.filled]
        self.filled = kept
        want = self.block_bytes
        while True:
            want = min(want, self.stop - self.position)
            if self.filled + want > self.buffer.size:
                grown = np.empty(self.filled + want, dtype=np.uint8)
                grown[: self.filled] = self.buffer[: self.filled]
                self.buffer = grown
            self._read(self.buffer[self.filled : self.filled + want])
            self.filled += want
            raw = self.buffer[: self.filled]
            offsets, end, stamps = scan_records(raw)
            if offsets.size or self.done:
                break
            length = int(field_at(raw, np.zeros(1, np.int64), 4, "<i4")[0]) if raw.size >= 8 else 0
            want = max(self.block_bytes, GEB_HEADER_BYTES + length - self.filled)
        if self.done and end != self.filled:
            at = self.stop - self.filled + end
            raise CorruptFile(f"{self.path}: a partial record at byte {at}")
        self.bounds = np.append(offsets, end)
        self.timestamps = stamps
        self.next = 0
        if self.done:
            self.close()

    def _read(self, into: np.ndarray) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(into)
        got = 0
        while got < len(view):
            count = os.preadv(self._fd, [view[got:]], self.position + got)
            if count == 0:
                raise CorruptFile(f"{self.path} became shorter while being read")
            got += count
        self.position += got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RecordBlocks:
    """Copies of whole blocks of records from a file's range (for callers that keep them)."""

    def __init__(self, path: Path, block_bytes: int, start: int = 0,
                 stop: int | None = None) -> None:
        self.reader = RecordReader(path, block_bytes, start, stop)

    @property
    def done(self) -> bool:
        return self.reader.done and self.reader.remaining == 0

    def next_block(self) -> Block:
        """The next block of records (empty once `done`); CorruptFile on a partial record."""
        reader = self.reader
        while reader.remaining == 0 and not reader.done:
            reader.refill()
        bounds = reader.bounds[reader.next :]
        first = int(bounds[0])
        block = Block(reader.buffer[first : bounds[-1]].copy(), bounds - first,
                      reader.timestamps[reader.next :].copy())
        reader.next = reader.timestamps.size
        return block

    def close(self) -> None:
        self.reader.close()

"""Reading GEB files in bounded blocks: whole records only, their timestamps found with numpy.

`scan_records` is `receiver.geb.read_records` for a block that may end inside a
record: it walks the chain of lengths (a growing run of equal-length records
checked at once, one step per length change) and stops before a partial record.
`RecordBlocks` reads a byte range of a file block by block with ``pread``; a
record cut by a block's end is read again at the start of the next block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from receiver.geb import GEB_HEADER_BYTES

_LENGTH_FIELD = np.arange(4, 8)
_TIMESTAMP_FIELD = np.arange(8, 16)


class CorruptFile(ValueError):
    """A file's records do not chain up to its end (truncated or not a GEB file)."""


def scan_records(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Start offsets of the whole records at the beginning of ``raw``, and where they end."""
    size = raw.size
    found: list[np.ndarray] = []
    position, block = 0, 16
    while position + GEB_HEADER_BYTES <= size:
        length = int(raw[position + _LENGTH_FIELD].view("<i4")[0])
        if length < 0:
            raise CorruptFile(f"negative record length at byte {position}")
        step = GEB_HEADER_BYTES + length
        count = min(block, (size - position) // step)
        if count == 0:
            break
        starts = position + step * np.arange(count, dtype=np.int64)
        same = raw[starts[:, None] + _LENGTH_FIELD].view("<i4")[:, 0] == length
        run = count if bool(same.all()) else max(1, int(np.argmin(same)))
        found.append(starts[:run])
        position += run * step
        block = min(block * 2, 1 << 20) if run == count else 16
    offsets = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    return offsets, position


def timestamps_at(raw: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The GEB header timestamps of the records starting at ``offsets``."""
    return raw[offsets[:, None] + _TIMESTAMP_FIELD].view("<u8")[:, 0]


@dataclass
class Block:
    """Whole records read from a file: bytes, record starts (plus the end), timestamps."""

    data: np.ndarray
    bounds: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return self.timestamps.size


class RecordBlocks:
    """Blocks of whole records from ``path``'s bytes ``[start, stop)`` (default: all of it)."""

    def __init__(self, path: Path, block_bytes: int, start: int = 0,
                 stop: int | None = None) -> None:
        self.path = path
        self.block_bytes = max(int(block_bytes), 4096)
        self.position = start
        self.stop = os.path.getsize(path) if stop is None else stop
        self._fd: int | None = None

    @property
    def done(self) -> bool:
        return self.position >= self.stop

    def next_block(self) -> Block:
        """The next block of records (empty once `done`); CorruptFile on a partial record."""
        want = self.block_bytes
        while not self.done:
            size = min(want, self.stop - self.position)
            raw = self._read(self.position, size)
            offsets, end = scan_records(raw)
            if offsets.size:
                bounds = np.append(offsets, end)
                block = Block(raw[:end], bounds, timestamps_at(raw, offsets))
                self.position += end
                return block
            if self.position + size >= self.stop:
                raise CorruptFile(f"{self.path}: a partial record at byte {self.position}")
            length = int(raw[_LENGTH_FIELD].view("<i4")[0]) if raw.size >= 8 else 0
            want = max(want * 2, GEB_HEADER_BYTES + length)
        self.close()
        return Block(np.empty(0, np.uint8), np.zeros(1, np.int64), np.empty(0, np.uint64))

    def _read(self, offset: int, size: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = np.empty(size, dtype=np.uint8)
        view = memoryview(raw)
        got = 0
        while got < size:
            count = os.preadv(self._fd, [view[got:]], offset + got)
            if count == 0:
                raise CorruptFile(f"{self.path} became shorter while being read")
            got += count
        return raw

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

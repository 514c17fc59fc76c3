"""The time-ordered merge of GEB files, streaming with bounded memory (``dgs-merge``).

Order: records by timestamp; equal timestamps keep input order (the files in
the order given, then position in the file). The output is exactly a stable
sort by timestamp of all input records read one file after another.

Two passes, both a block at a time:

1. Scan: every file's headers are read once (through memory maps); its
   records are counted and checked for time order. A file in order
   (per-board and per-channel files) is a sorted run as it is. A file out
   of order (arrival order, or anything else) is cut into sorted runs
   written to a temporary file: a block is sorted together
   with the records held back from the block before; the records earlier than
   the new block's earliest go out (they are nearly always final), the rest wait
   for the next block, at most one block of them. A run ends where a record
   would go out earlier than the run's last, so any disorder is handled, and
   bounded disorder (~100 ms) gives a few long runs.
2. Merge: a k-way merge of all runs that moves whole batches: every record
   earlier than the smallest "last timestamp read" of the runs still being
   read can go out now; those records are gathered from all runs and ordered
   with one stable numpy sort (skipped when already in order). More runs than
   `MAX_FAN_IN` are merged in groups into temporary runs first.

Memory: about ``memory_bytes`` for blocks and batches, whatever the input size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.gebscan import Block, RecordBlocks, RecordReader, file_timestamps
from builder.hits import RECORD_STATUS, record_kinds, records_from_bounds

#: Most runs merged in one pass (each holds a file descriptor and a block).
MAX_FAN_IN = 128
DEFAULT_MEMORY_BYTES = 192 * 1024 * 1024
_MIN_BLOCK = 64 * 1024
#: Blocks of the scan (larger gain nothing: the per-block work is already small).
_SCAN_BLOCK = 8 * 1024 * 1024

#: Called with each batch of output: record bytes, their bounds (starts and end), timestamps;
#: the arrays are valid until the call returns (they are reused).
BatchSink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
#: Called with bytes of input done (scan, then merge), for a progress display.
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Run:
    """Records in time order: bytes ``[start, stop)`` of ``path``."""

    path: Path
    start: int
    stop: int


@dataclass
class MergeStats:
    files: int = 0
    unsorted_files: int = 0
    runs: int = 0
    records_in: int = 0
    bytes_in: int = 0
    records_out: int = 0
    bytes_out: int = 0
    status_dropped: int = 0
    bytes_dropped: int = 0


def permute(data: np.ndarray, bounds: np.ndarray,
            order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records ``order`` of the records ``data``/``bounds``, as new bytes and bounds.

    One fancy-index copy per distinct record length, each record moved as one
    ``V<length>`` item (no per-byte index arrays).
    """
    lengths = np.diff(bounds)[order]
    out_bounds = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_bounds[1:])
    out = np.empty(int(out_bounds[-1]), dtype=np.uint8)
    sources = bounds[:-1][order]
    for size in np.unique(lengths).tolist():
        chosen = np.flatnonzero(lengths == size)
        _items(out, size)[out_bounds[chosen]] = _items(data, size)[sources[chosen]]
    return out, out_bounds


def _join(blocks: list[Block]) -> Block:
    """Blocks as one (bounds shifted onto the joined bytes)."""
    blocks = [b for b in blocks if len(b)]
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        return Block(np.empty(0, np.uint8), np.zeros(1, np.int64), np.empty(0, np.uint64))
    data = np.concatenate([b.data[b.bounds[0] : b.bounds[-1]] for b in blocks])
    lengths = np.concatenate([np.diff(b.bounds) for b in blocks])
    bounds = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return Block(data, bounds, np.concatenate([b.timestamps for b in blocks]))


def _select(block: Block, order: np.ndarray) -> Block:
    data, bounds = permute(block.data, block.bounds, order)
    return Block(data, bounds, block.timestamps[order])


class _RunWriter:
    """Appends sorted runs to one temporary file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        self.runs: list[Run] = []
        self._run_start = 0
        self._last: int | None = None

    def append(self, block: Block) -> None:
        if not len(block):
            return
        if self._last is not None and int(block.timestamps[0]) < self._last:
            self.end_run()
        _write_all(self._fd, block.data[block.bounds[0] : block.bounds[-1]])
        self.size += int(block.bounds[-1] - block.bounds[0])
        self._last = int(block.timestamps[-1])

    def end_run(self) -> None:
        if self.size > self._run_start:
            self.runs.append(Run(self.path, self._run_start, self.size))
        self._run_start, self._last = self.size, None

    def close(self) -> list[Run]:
        self.end_run()
        os.close(self._fd)
        return self.runs


def _write_all(fd: int, data: np.ndarray) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def sorted_runs(path: Path, block_bytes: int, temp: Path) -> list[Run]:
    """Cut an out-of-order file into sorted runs in the temporary file ``temp``."""
    writer = _RunWriter(temp)
    reader = RecordBlocks(path, block_bytes)
    held = _join([])
    try:
        while not reader.done:
            block = reader.next_block()
            both = _join([held, block])
            order = np.argsort(both.timestamps, kind="stable")
            ordered = both.timestamps[order]
            out = int(np.searchsorted(ordered, block.timestamps.min(), side="left"))
            sizes = np.diff(both.bounds)[order]
            kept_bytes = np.cumsum(sizes[::-1])[::-1]  # bytes from each position to the end
            out = max(out, int(np.searchsorted(-kept_bytes, -block_bytes, side="left")))
            writer.append(_select(both, order[:out]))
            held = _select(both, order[out:])
        writer.append(held)
    finally:
        reader.close()
    return writer.close()


def is_time_ordered(path: Path, window_bytes: int, stats: MergeStats,
                    progress: Progress | None) -> bool:
    """Read ``path``'s headers once: count its records into ``stats``; whether they are in
    time order."""
    ordered, last, records = True, 0, 0
    for stamps, nbytes in file_timestamps(path, window_bytes):
        records += stamps.size
        if ordered and stamps.size:
            ordered = int(stamps[0]) >= last and bool((stamps[1:] >= stamps[:-1]).all())
            last = int(stamps[-1])
        if progress:
            progress("scan", nbytes)
    stats.records_in += records
    stats.bytes_in += os.path.getsize(path)
    return ordered


class _Scratch:
    """An output buffer reused from batch to batch (fresh memory costs page faults)."""

    def __init__(self) -> None:
        self._bytes = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray:
        if self._bytes.size < size:
            self._bytes = np.empty(max(size, self._bytes.size * 3 // 2), dtype=np.uint8)
        return self._bytes[:size]


def _items(data: np.ndarray, size: int) -> np.ndarray:
    """``data`` seen as one ``V<size>`` item starting at every byte (records moved whole)."""
    return np.ndarray((data.size - size + 1,), dtype=f"V{size}", buffer=data, strides=(1,))


def merge_runs(runs: list[Run], sink: BatchSink, memory_bytes: int,
               drop_status: bool, stats: MergeStats, progress: Progress | None) -> None:
    """k-way merge of sorted runs into ``sink`` (ties: run order, then position).

    Every record earlier than the smallest last timestamp read among the runs
    still being read goes out in the batch of this round; then the runs that
    set that bound (or used up half their block) read on.
    """
    block_bytes = max(_MIN_BLOCK, memory_bytes // (5 * max(1, len(runs))))
    readers = [RecordReader(run.path, block_bytes, run.start, run.stop) for run in runs]
    scratch = _Scratch()
    try:
        while True:
            for reader in readers:
                while reader.remaining == 0 and not reader.done:
                    reader.refill()
            still_reading = [r for r in readers if not r.done]
            bound = min((int(r.timestamps[-1]) for r in still_reading), default=None)
            parts = []
            for reader in readers:
                if not reader.remaining:
                    continue
                count = reader.remaining if bound is None else int(
                    np.searchsorted(reader.timestamps[reader.next :], bound, side="left"))
                if count:
                    parts.append((reader, reader.next, reader.next + count))
                    reader.next += count
            if parts:
                _emit(parts, sink, drop_status, stats, progress, scratch)
            elif bound is None:
                return
            for reader in still_reading:
                if (int(reader.timestamps[-1]) == bound
                        or reader.remaining * 2 < reader.timestamps.size):
                    reader.refill()
    finally:
        for reader in readers:
            reader.close()


def _emit(parts: list[tuple[RecordReader, int, int]], sink: BatchSink, drop_status: bool,
          stats: MergeStats, progress: Progress | None, scratch: _Scratch) -> None:
    """One batch out: the parts' records in timestamp order (stable), gathered once."""
    stamps = np.concatenate([r.timestamps[a:b] for r, a, b in parts])
    lengths = np.concatenate([np.diff(r.bounds[a : b + 1]) for r, a, b in parts])
    consumed = int(lengths.sum())
    keep = None
    if drop_status:
        keep = np.concatenate([
            record_kinds(r.buffer, records_from_bounds(r.bounds[a : b + 1], r.timestamps[a:b]))
            != RECORD_STATUS for r, a, b in parts])
        stats.status_dropped += int(keep.size - keep.sum())
        stats.bytes_dropped += int(lengths[~keep].sum())
    in_order = len(parts) == 1 or bool((stamps[1:] >= stamps[:-1]).all())
    if in_order and (keep is None or keep.all()):
        for reader, first, stop in parts:  # as they are: no copy
            start, end = int(reader.bounds[first]), int(reader.bounds[stop])
            sink(reader.buffer[start:end], reader.bounds[first : stop + 1] - start,
                 reader.timestamps[first:stop])
    else:
        order = np.arange(stamps.size) if in_order else np.argsort(stamps, kind="stable")
        if keep is not None:
            order = order[keep[order]]
        slot = np.full(stamps.size, -1, dtype=np.int64)
        slot[order] = np.arange(order.size)
        size = int(lengths[0]) if lengths.size else 0
        if keep is None and bool((lengths == size).all()):  # one length: slots are offsets
            out_bounds = np.arange(order.size + 1, dtype=np.int64) * size
            out = scratch.get(int(out_bounds[-1]))
            items, base = _items(out, size), 0
            for reader, first, stop in parts:
                start, end = int(reader.bounds[first]), int(reader.bounds[stop])
                items[slot[base : base + stop - first] * size] = (
                    reader.buffer[start:end].view(f"V{size}"))
                base += stop - first
        else:
            out_bounds = np.zeros(order.size + 1, dtype=np.int64)
            np.cumsum(lengths[order], out=out_bounds[1:])
            out = scratch.get(int(out_bounds[-1]))
            base = 0
            for reader, first, stop in parts:
                count = stop - first
                _scatter(reader, first, stop, lengths[base : base + count],
                         out, out_bounds, slot[base : base + count])
                base += count
        stamps = stamps[order]
        sink(out, out_bounds, stamps)
    stats.records_out += stamps.size
    stats.bytes_out += int(lengths.sum() if keep is None else lengths[keep].sum())
    if progress:
        progress("merge", consumed)


def _scatter(reader: RecordReader, first: int, stop: int, lengths: np.ndarray,
             out: np.ndarray, out_bounds: np.ndarray, slot: np.ndarray) -> None:
    """Copy records ``first..stop`` of ``reader`` to their ``slot`` in ``out`` (-1: left out)."""
    starts = reader.bounds[first:stop]
    sizes = np.unique(lengths)
    for size in sizes.tolist():
        chosen = np.flatnonzero((lengths == size) & (slot >= 0))
        _items(out, size)[out_bounds[slot[chosen]]] = _items(reader.buffer, size)[starts[chosen]]


def merge_files(files: list[Path], sink: BatchSink, *, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                drop_status: bool = False, temp_dir: Path | None = None,
                progress: Progress | None = None) -> MergeStats:
    """Merge every record of ``files`` into ``sink`` in time order (see the module doc)."""
    stats = MergeStats(files=len(files))
    scan_window = max(_MIN_BLOCK, min(memory_bytes // 4, _SCAN_BLOCK))
    with tempfile.TemporaryDirectory(prefix="dgs-merge-", dir=temp_dir) as scratch:
        runs: list[Run] = []
        for number, path in enumerate(files):
            if is_time_ordered(path, scan_window, stats, progress):
                runs.append(Run(path, 0, os.path.getsize(path)))
            else:
                stats.unsorted_files += 1
                sort_block = max(_MIN_BLOCK, memory_bytes // 12)  # ~6 blocks live while sorting
                runs += sorted_runs(path, sort_block, Path(scratch) / f"runs-{number}")
        stats.runs = len(runs)
        runs = _reduce_fan_in(runs, Path(scratch), memory_bytes)
        merge_runs(runs, sink, memory_bytes, drop_status, stats, progress)
    return stats


def _reduce_fan_in(runs: list[Run], scratch: Path, memory_bytes: int) -> list[Run]:
    """Merge consecutive groups of runs into temporary runs until at most `MAX_FAN_IN` are left."""
    level = 0
    while len(runs) > MAX_FAN_IN:
        merged: list[Run] = []
        for first in range(0, len(runs), MAX_FAN_IN):
            group = runs[first : first + MAX_FAN_IN]
            if len(group) == 1:
                merged += group
                continue
            path = scratch / f"level-{level}-{first}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                merge_runs(group, lambda data, _b, _t, fd=fd: _write_all(fd, data),
                           memory_bytes, False, MergeStats(), None)
            finally:
                os.close(fd)
            merged.append(Run(path, 0, os.path.getsize(path)))
        runs, level = merged, level + 1
    return runs

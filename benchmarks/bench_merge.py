"""P10: `dgs-merge` throughput on a generated run of >= 1 GB across 40 files (issue 16).

The run: the demo crate's layout, 4 boards x 10 channels = 40 classic per-channel
files, 200-sample LED events (468-byte records), each channel's events at
Poisson times over the same span, so every file is time-ordered and all 40
interleave. Files live on tmpfs (``/dev/shm``), like the receiver benchmarks.

Figures, all measured in the same run on the same files:

- P10: `dgs-merge RUN -o OUT` in MB/s of input (and records/s), against reading
  the same files once (``cat`` to /dev/null); target >= 0.5 x that rate. Its
  note also gives ``cat`` of the files into one file, which reads and writes
  every byte and merges nothing: the most any merge writing its output can do;
- P10h: the same against a plain-Python merge (``heapq.merge`` of per-file
  record generators, struct-unpacked headers, written to a file); the ratio
  is the figure asked for (target: faster, >= 1 x);
- P10s: both merges again on a smaller run of header-only records (68 bytes),
  where the cost per record, not per byte, decides;
- P10m: `dgs-merge`'s peak resident memory (``ru_maxrss`` from ``wait4``); target
  < 500 MB.

The merged file is checked: same size as the input and dgs-merge's own count
check passed. Output files are written into memory freed while they are
written (`common.releasing_tmpfs` says why).

Run: ``.venv/bin/python benchmarks/bench_merge.py [--json FILE] [--gigabytes G]``
"""

from __future__ import annotations

import argparse
import heapq
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Figure, fill_tmpfs, finish, releasing_tmpfs

BOARDS = (101, 102, 103, 104)
CHANNELS = 10
SAMPLES = 200
TARGET_RATIO_CAT = 0.5
TARGET_RSS_MB = 500.0
_HEADER = struct.Struct("<iiQ")


def channel_file(path: Path, board: int, channel: int, stamps: np.ndarray,
                 samples: int = SAMPLES) -> int:
    """One classic per-channel file of records at ``stamps``; returns its bytes."""
    words = 13 + samples // 2
    record = np.zeros(16 + 4 * words, dtype=np.uint8)
    record[:16] = np.frombuffer(_HEADER.pack(14, 4 * words, 0), dtype=np.uint8)
    pre, post = 1000 * 256, 2000 * 256  # a 1000-count pulse over a 1000-count baseline, M = 256
    head = [3 << 27 | words << 16 | board << 4 | channel, 0, 13 << 26 | 7 << 16, 0, 0, 1000, 0,
            (post & 0xFF) << 24 | pre, post >> 8]  # words 1..9
    record[16 : 16 + 4 * len(head)] = np.array(head, dtype=">u4").view(np.uint8)
    record[16 + 52 :] = np.full(samples // 2, 1000 << 16 | 1000, dtype=">u4").view(np.uint8)
    table = np.tile(record, (stamps.size, 1))
    table[:, 8:16] = stamps.astype("<u8")[:, None].view(np.uint8)
    table[:, 20:24] = (stamps & 0xFFFFFFFF).astype(">u4")[:, None].view(np.uint8)
    table[:, 24:28] = (np.uint64(13 << 26 | 7 << 16) | stamps >> np.uint64(32)).astype(
        ">u4")[:, None].view(np.uint8)
    path.write_bytes(table.tobytes())
    return table.size


def generate(run_dir: Path, gigabytes: float, samples: int = SAMPLES) -> tuple[list[Path], int]:
    """The 40 files of the run; ``(paths, records)``."""
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(10)
    record_bytes = 16 + 4 * (13 + samples // 2)
    per_file = int(gigabytes * 1e9 / record_bytes / (len(BOARDS) * CHANNELS)) + 1
    span = 10 * 100_000_000  # ten seconds of 10 ns ticks
    paths = []
    for board in BOARDS:
        for channel in range(CHANNELS):
            stamps = np.sort(rng.integers(0, span, per_file)).astype(np.uint64)
            path = run_dir / f"run00010.gtd_000_{board:04d}_{channel:X}"
            channel_file(path, board, channel, stamps, samples)
            paths.append(path)
    return paths, per_file * len(paths)


def cat_seconds(paths: list[Path], into: Path | None = None) -> float:
    """``cat`` of the files to /dev/null, or ``into`` one file: every byte read (and then
    written), nothing merged."""
    started = time.perf_counter()
    with open(into or os.devnull, "wb") as sink:
        subprocess.run(["cat", *map(str, paths)], stdout=sink, check=True)
    return time.perf_counter() - started


def _records(path: Path):
    """(timestamp, file index kept by heapq's tie order, bytes) of each record of a file."""
    with open(path, "rb", buffering=1 << 20) as source:
        while header := source.read(16):
            _, length, stamp = _HEADER.unpack(header)
            yield stamp, header + source.read(length)


def heapq_seconds(paths: list[Path], output: Path) -> float:
    """The plain-Python merge (keyed on the timestamp; stable across inputs)."""
    started = time.perf_counter()
    with open(output, "wb", buffering=1 << 20) as sink:
        for _, record in heapq.merge(*map(_records, paths), key=lambda item: item[0]):
            sink.write(record)
    return time.perf_counter() - started


def dgs_merge(run_dir: Path, output: Path) -> tuple[float, int, str]:
    """Run dgs-merge; ``(seconds, peak RSS bytes, its output)``."""
    command = [str(REPO / ".venv" / "bin" / "dgs-merge"), str(run_dir), "-o", str(output)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        printed = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"dgs-merge exited {proc.returncode}: {printed}")
    return seconds, usage.ru_maxrss * 1024, printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--gigabytes", type=float, default=1.05, help="run size (default 1.05)")
    parser.add_argument("--header-only-gigabytes", type=float, default=0.2,
                        help="size of the header-only run (default 0.2)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-merge-", dir="/dev/shm") as scratch:
        root = Path(scratch)
        paths, records = generate(root / "run00010", args.gigabytes)
        size = sum(p.stat().st_size for p in paths)
        print(f"run: {len(paths)} files, {size / 1e9:.2f} GB, {records} records", flush=True)
        cat_s = min(cat_seconds(paths) for _ in range(2))
        (root / "ballast").mkdir()
        fresh_mb_s = fill_tmpfs(root / "ballast", size)
        with releasing_tmpfs(root / "ballast", [], fresh_mb_s):
            merge_s, rss, printed = dgs_merge(root / "run00010", root / "merged.gtd")
        merged = root / "merged.gtd"
        complete = merged.stat().st_size == size and "count check passed" in printed
        print(printed.strip(), flush=True)
        merged.unlink()
        copy_s = cat_seconds(paths, root / "copy.gtd")  # into the memory the merge freed
        (root / "copy.gtd").unlink()
        heap_s = heapq_seconds(paths, root / "heap.gtd")
        complete &= (root / "heap.gtd").stat().st_size == size
        (root / "heap.gtd").unlink()
        for path in paths:
            path.unlink()
        small_paths, small_records = generate(root / "run00011", args.header_only_gigabytes, 0)
        small_mb = sum(p.stat().st_size for p in small_paths) / 1e6
        small_merge_s, _, small_printed = dgs_merge(root / "run00011", root / "small.gtd")
        small_heap_s = heapq_seconds(small_paths, root / "small-heap.gtd")
        complete &= "count check passed" in small_printed
    mb = size / 1e6
    figures = [
        Figure(id="P10", what="dgs-merge, 40 files, 200-sample records (vs cat > /dev/null)",
               value=mb / merge_s, unit="MB/s", baseline=mb / cat_s, baseline_what="cat",
               target=TARGET_RATIO_CAT, target_on="ratio", conditions_met=complete,
               note=f"{records / merge_s / 1e6:.2f} M records/s; {size / 1e9:.2f} GB in "
                    f"{merge_s:.1f} s; output complete: {complete}; cat into one file (every "
                    f"byte read and written, nothing merged) {mb / copy_s:.0f} MB/s = "
                    f"{cat_s / copy_s:.2f} x cat, the merge {copy_s / merge_s:.2f} x that"),
        Figure(id="P10h", what="dgs-merge vs plain-Python heapq merge", value=mb / merge_s,
               unit="MB/s", baseline=mb / heap_s, baseline_what="heapq merge", target=1.0,
               target_on="ratio", conditions_met=complete,
               note=f"heapq merge {records / heap_s / 1e6:.2f} M records/s"),
        Figure(id="P10s", what="the same with header-only records (68 B) vs heapq merge",
               value=small_mb / small_merge_s, unit="MB/s", baseline=small_mb / small_heap_s,
               baseline_what="heapq merge", target=1.0, target_on="ratio",
               conditions_met=complete,
               note=f"{small_records / small_merge_s / 1e6:.2f} M records/s against "
                    f"{small_records / small_heap_s / 1e6:.2f} M; {small_mb:.0f} MB"),
        Figure(id="P10m", what="dgs-merge peak resident memory", value=rss / 2**20, unit="MB",
               baseline=None, baseline_what="", target=TARGET_RSS_MB, higher_is_better=False),
    ]
    return finish(args.json, "P10 dgs-merge", figures, began, records=records, bytes=size,
                  cat_s=cat_s, copy_s=copy_s, merge_s=merge_s, heapq_s=heap_s, peak_rss_bytes=rss)


if __name__ == "__main__":
    sys.exit(main())

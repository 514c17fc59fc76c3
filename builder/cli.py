"""`dgs-merge`: a run's GEB files merged in time order, and optionally coincidence events.

    dgs-merge RUN_DIR [RUN_DIR…] -o OUT.gtd [--events OUT.root|OUT.h5]

Inputs: each RUN_DIR's data files (``<run>.<ext>_<chunk>…``: every layout of
`dgs-receiver` and the classic receiver's names; side files such as the JSON
snapshots are not data), by name, or a GEB file given directly. Record order:
see `builder.merge` (timestamp, then input order, then position). ``--status
drop`` leaves out the type-F status records (end of data, empty, FIFO errors);
by default every record is kept. At the end the counts are checked: records
and bytes written (plus status records dropped) must equal those read, else
exit 1.

``--events`` builds coincidence events (`builder.events`) from the merged
digitizer hits and writes them with the run directories' begin/end PV
snapshots as metadata (`builder.eventfile`).

Exit codes: 0 done and every record accounted for; 1 a count mismatch or an
unreadable input; 2 refused before writing (bad options, no input, an output
that exists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from builder.calibration import Calibration
from builder.eventfile import open_event_writer
from builder.events import DEFAULT_WINDOW_TICKS, EventBuilder
from builder.gebscan import CorruptFile
from builder.hits import DEFAULT_FILTER_LENGTH, hits_from_records, records_from_bounds
from builder.merge import DEFAULT_MEMORY_BYTES, MergeStats, merge_files

EXIT_DONE, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: ``<run>.<ext>_<chunk>`` and what may follow: the data files of a run directory.
DATA_FILE = re.compile(r"^[^.].*\.[^._/]+_\d{3}(_.+)?$")


def data_files(run_dir: Path) -> list[Path]:
    """The GEB data files of a run directory, by name."""
    return sorted(p for p in run_dir.iterdir() if p.is_file() and DATA_FILE.match(p.name))


def run_metadata(run_dirs: list[Path], when: str) -> dict[str, Any] | None:
    """The ``pvs_<when>`` snapshots of the run directories as one document (crates joined)."""
    documents = []
    for run_dir in run_dirs:
        for path in sorted(run_dir.glob(f"*.pvs_{when}.json")):
            documents.append(json.loads(path.read_text(encoding="utf-8")))
    if not documents:
        return None
    return {"runs": [d.get("run") for d in documents], "when": when,
            "crates": [crate for d in documents for crate in d.get("crates", [])]}


def crate_of_board(snapshot: dict[str, Any] | None) -> dict[int, int]:
    """Board id → crate number, from the package-data PVs of each crate's snapshot."""
    boards: dict[int, int] = {}
    for crate in (snapshot or {}).get("crates", []):
        name = str(crate.get("crate", ""))
        if not name.isdigit():
            continue
        for pv, value in crate.get("pvs", {}).items():
            own = pv.startswith(f"VME{name}:") and pv.lower().endswith(":user_package_data")
            if own and isinstance(value, int | float):
                boards[int(value)] = int(name)
    return boards


class ProgressBar:
    """One redrawn line on stderr, only when it is a terminal."""

    def __init__(self, total_bytes: int, err: TextIO) -> None:
        self.total = max(1, total_bytes)
        self.err = err
        self.done = {"scan": 0, "merge": 0}
        self.began = time.monotonic()
        self._drawn = 0.0

    def __call__(self, phase: str, nbytes: int) -> None:
        self.done[phase] += nbytes
        now = time.monotonic()
        if now - self._drawn < 0.2:
            return
        self._drawn = now
        rate = (self.done["scan"] + self.done["merge"]) / max(now - self.began, 1e-6) / 1e6
        self.err.write(f"\rdgs-merge: scan {100 * self.done['scan'] / self.total:5.1f}%  "
                       f"merge {100 * self.done['merge'] / self.total:5.1f}%  {rate:7.1f} MB/s ")
        self.err.flush()

    def finish(self) -> None:
        self.err.write("\n")
        self.err.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dgs-merge", description="Merge a run's GEB files in time order; build events.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (or GEB files), in the order ties keep")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.gtd",
                        help="the merged GEB file (never replaced if it exists)")
    parser.add_argument("--status", choices=("keep", "drop"), default="keep",
                        help="type-F status records: keep them (default) or drop them")
    parser.add_argument("--events", type=Path, metavar="OUT.root|OUT.h5",
                        help="write coincidence events (ROOT via uproot, HDF5 via h5py)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW_TICKS, metavar="TICKS",
                        help=f"coincidence window after an event's first hit, 10 ns ticks "
                             f"(default {DEFAULT_WINDOW_TICKS} = 1 µs)")
    parser.add_argument("--calibration", type=Path, metavar="FILE",
                        help="CSV board,channel,gain,offset (keV = gain × e + offset; * = any)")
    parser.add_argument("--filter-length", type=int, default=DEFAULT_FILTER_LENGTH, metavar="M",
                        help=f"energy filter length M: e = (post − pre) / M "
                             f"(default {DEFAULT_FILTER_LENGTH})")
    parser.add_argument("--traces", action="store_true", help="put the traces in the events")
    parser.add_argument("--chunk-events", type=int, metavar="N",
                        help="start a new event file every N events")
    parser.add_argument("--chunk-seconds", type=float, metavar="S",
                        help="start a new event file every S seconds of data time")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY_BYTES // 2**20,
                        metavar="MB", help="memory for blocks and batches (default %(default)s)")
    parser.add_argument("--tmp-dir", type=Path, metavar="DIR",
                        help="where sorted runs of out-of-order files go (default: beside OUT)")
    args = parser.parse_args(argv)
    if args.output is None and args.events is None:
        parser.error("give -o OUT.gtd, --events OUT.root|OUT.h5, or both")
    if args.window < 0 or args.memory < 1 or args.filter_length < 1:
        parser.error("--window must be >= 0, --memory and --filter-length >= 1")
    return args


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = parse_args(argv)
    files: list[Path] = []
    for item in args.inputs:
        if item.is_dir():
            files += data_files(item)
        elif item.is_file():
            files.append(item)
        else:
            print(f"dgs-merge: refused: {item} does not exist", file=err)
            return EXIT_USAGE
    if not files:
        print("dgs-merge: refused: no GEB data files in the inputs", file=err)
        return EXIT_USAGE
    if args.output is not None and args.output.exists():
        print(f"dgs-merge: refused: {args.output} already exists", file=err)
        return EXIT_USAGE
    try:
        return _merge(args, files, out, err)
    except (FileExistsError, ValueError) as error:
        print(f"dgs-merge: refused: {error}", file=err)
        return EXIT_USAGE


def _merge(args: argparse.Namespace, files: list[Path], out: TextIO, err: TextIO) -> int:
    run_dirs = [item for item in args.inputs if item.is_dir()]
    begin = run_metadata(run_dirs, "begin")
    calibration = Calibration.from_csv(args.calibration) if args.calibration else None
    writer = builder = None
    if args.events is not None:
        metadata = {"created_by": "dgs-merge", "inputs": [str(p) for p in args.inputs],
                    "window_ticks": args.window, "filter_length": args.filter_length,
                    "calibration": str(args.calibration) if args.calibration else None,
                    "pvs_begin": begin}
        writer = open_event_writer(args.events, metadata, args.chunk_events, args.chunk_seconds,
                                   calibration, args.traces)
        builder = EventBuilder(args.window)
    crates = crate_of_board(begin)
    part = fd = None
    if args.output is not None:
        part = args.output.with_name(f".{args.output.name}.part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def sink(data, bounds, timestamps) -> None:
        if fd is not None:
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        if builder is not None and writer is not None:
            hits, traces = hits_from_records(
                data, records_from_bounds(bounds, timestamps), crate_of_board=crates,
                filter_length=args.filter_length, with_traces=args.traces)
            writer.write(builder.feed(hits, traces))

    bar = ProgressBar(sum(p.stat().st_size for p in files), err) if err.isatty() else None
    began = time.monotonic()
    try:
        stats = merge_files(files, sink, memory_bytes=args.memory * 2**20,
                            drop_status=args.status == "drop",
                            temp_dir=args.tmp_dir or (args.output or args.events).parent,
                            progress=bar)
    except (CorruptFile, OSError) as error:
        print(f"dgs-merge: failed: {error}", file=err)
        _abandon(fd, part)
        if writer is not None:
            writer.abort()
        return EXIT_FAILED
    finally:
        if bar is not None:
            bar.finish()
    seconds = time.monotonic() - began
    if fd is not None and part is not None and args.output is not None:
        os.close(fd)
        os.link(part, args.output)
        os.unlink(part)
    if writer is not None and builder is not None:
        writer.write(builder.flush())
        writer.set_end_metadata({"pvs_end": run_metadata(run_dirs, "end")})
        event_files = writer.close()
        print(f"dgs-merge: {writer.events} events ({writer.hits} hits, window {args.window} "
              f"ticks) in {', '.join(str(p) for p in event_files)}", file=out)
    return _report(stats, args, seconds, out, err)


def _abandon(fd: int | None, part: Path | None) -> None:
    if fd is not None:
        os.close(fd)
    if part is not None:
        part.unlink(missing_ok=True)


def _report(stats: MergeStats, args: argparse.Namespace, seconds: float, out: TextIO,
            err: TextIO) -> int:
    rate = stats.bytes_in / max(seconds, 1e-9) / 1e6
    print(f"dgs-merge: {stats.records_in} records in {stats.files} files "
          f"({stats.unsorted_files} out of time order, {stats.runs} sorted runs), "
          f"{stats.bytes_in / 1e6:.1f} MB in {seconds:.1f} s ({rate:.0f} MB/s)", file=out)
    records = stats.records_out + stats.status_dropped
    nbytes = stats.bytes_out + stats.bytes_dropped
    if (records, nbytes) != (stats.records_in, stats.bytes_in):
        print(f"dgs-merge: COUNT MISMATCH: {stats.records_in} records ({stats.bytes_in} bytes) "
              f"read, {stats.records_out} ({stats.bytes_out}) written, "
              f"{stats.status_dropped} ({stats.bytes_dropped}) dropped", file=err)
        return EXIT_FAILED
    where = f" to {args.output}" if args.output else ""
    dropped = f" and {stats.status_dropped} status records dropped" if stats.status_dropped else ""
    print(f"dgs-merge: {stats.records_out} records written{where}{dropped}: "
          f"count check passed: {stats.records_in} records and {stats.bytes_in} bytes read "
          f"= written + dropped", file=out)
    return EXIT_DONE

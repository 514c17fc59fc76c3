"""Online building in `dgs-receiver`: the merged file and the coincidence-event files.

``--layout merged`` writes one GEB stream of every board of every crate in
timestamp order (`receiver.merge` decides when a record may be written);
``--events OUT.root|OUT.h5`` groups the merged hits into coincidence events
online (`builder.events`, the same rule as ``dgs-merge --events``) and writes
them with `builder.eventfile`, the begin and end PV snapshots as metadata. The
event files come besides any layout's run files, or instead of them with
``--layout none``.

Acknowledgement (v2): a reply is acknowledged once its records are written to
the per-board files and handed to the merger. With ``--layout merged`` or
``none`` the merger holds them in memory until they can be written in order,
so the merged file and the event files come WITHOUT the resume guarantee of the
per-board layouts: a receiver killed (SIGKILL, a crash) loses what it held, at
most ``--merge-wait`` seconds of data, and one taking over the run cannot cut
a merged file back to an acknowledged offset (its records are interleaved
across replies). A clean stop (end of run, Ctrl-C, SIGTERM, ``--max-seconds``)
writes everything held. Why: acknowledging only what is durable would need
per-record bookkeeping across crates and still duplicate records of a reply
partly written; the lossless archive is the per-board layout, so keep one
(``--layout classic --events ...``) when a kill must lose nothing.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from builder.events import DEFAULT_WINDOW_TICKS
from builder.hits import DEFAULT_FILTER_LENGTH
from receiver import snapshot
from receiver.files import Layout, RunDirectory, Stream, StreamKey
from receiver.merge import DEFAULT_WAIT_S, Merger, Released

EVENT_SUFFIXES = (".root", ".h5", ".hdf5")


def add_options(parser: argparse.ArgumentParser, positive) -> None:
    """The online-building options (``positive``: the parser's positive-number type)."""
    group = parser.add_argument_group("online building (merged layout, events)")
    group.add_argument("--merge-wait", type=positive(float), default=DEFAULT_WAIT_S,
                       help="merged/events: longest time a record is held back waiting for "
                            f"a silent board, seconds (default {DEFAULT_WAIT_S:g})")
    group.add_argument("--events", type=Path, metavar="OUT.root|OUT.h5",
                       help="also build coincidence events online and write them here")
    group.add_argument("--window", type=int, default=DEFAULT_WINDOW_TICKS, metavar="TICKS",
                       help="coincidence window after an event's first hit, 10 ns ticks "
                            f"(default {DEFAULT_WINDOW_TICKS} = 1 µs, as dgs-merge)")
    group.add_argument("--calibration", type=Path, metavar="FILE",
                       help="CSV board,channel,gain,offset for the keV columns (as dgs-merge)")
    group.add_argument("--filter-length", type=int, default=DEFAULT_FILTER_LENGTH, metavar="M",
                       help=f"energy filter length M: e = (post - pre) / M "
                            f"(default {DEFAULT_FILTER_LENGTH})")
    group.add_argument("--traces", action="store_true", help="put the traces in the events")


def check(args: argparse.Namespace) -> str | None:
    """Problems with the online options, as one message."""
    if args.layout == Layout.NONE.value and args.events is None:
        return "--layout none writes no data files: give --events OUT.root|OUT.h5"
    if args.events is not None and args.events.suffix.lower() not in EVENT_SUFFIXES:
        return f"--events must end in one of {', '.join(EVENT_SUFFIXES)}"
    if args.window < 0 or args.filter_length < 1:
        return "--window must be >= 0 and --filter-length >= 1"
    if args.events is not None and args.events.exists():
        return f"{args.events} already exists"
    if args.events is None and (args.calibration or args.traces):
        return "--calibration and --traces need --events"
    return None


def wanted(args: argparse.Namespace) -> bool:
    """Whether this run needs the merger at all."""
    return args.layout in (Layout.MERGED.value, Layout.NONE.value) or args.events is not None


class OnlineOutput:
    """Where released records go: the merged stream, the event files, or both."""

    def __init__(self, run: RunDirectory, args: argparse.Namespace, connections: int,
                 metadata: dict, expected: set[int] | None = None) -> None:
        self.run = run
        self.stream: Stream | None = None
        if run.layout is Layout.MERGED:
            self.stream = run.stream(StreamKey(-1, -1, False))
        self.events = None
        if args.events is not None:
            from receiver.online_events import EventSink  # needs the "events" extra

            self.events = EventSink(args, metadata)
        self.merger = Merger(connections, args.merge_wait, self.write, expected)

    def write(self, released: Released) -> None:
        """One block in timestamp order (late records flagged): merged file, then events."""
        if self.stream is not None:
            self.stream.write(released.data, released.bounds)
            self.stream.settle()
        if self.events is not None:
            on_time = ~released.late
            crates = self.merger.crate_of_board
            if on_time.all():
                self.events.feed(released.data, released.bounds, released.timestamp, crates)
            elif on_time.any():
                keep = np.flatnonzero(on_time)
                self.events.feed(*_subset(released, keep), released.timestamp[keep], crates)

    def finish(self) -> None:
        """End of run: write what the merger holds and the last events."""
        self.merger.close()
        if self.events is not None:
            self.events.flush()

    def close(self, end_metadata: dict) -> None:
        """Close the event files with the end-of-run snapshot, if any."""
        if self.events is not None:
            self.events.close(end_metadata)

    def summary(self) -> dict:
        c = self.merger.counters
        document = {
            "merge_wait_s": self.merger.wait_s,
            "records": c.records,
            "late": c.late,
            "released_by_wait": c.released_by_wait,
            "max_held": c.max_held,
        }
        if self.events is not None:
            document["events"] = self.events.summary()
        return document


def start(run: RunDirectory, args: argparse.Namespace, begin: list[dict],
            err: TextIO) -> OnlineOutput | bool | None:
    """The merger and event files this run needs (None: none; False: could not start)."""
    if not wanted(args):
        return None
    try:
        return OnlineOutput(run, args, len(args.addresses), metadata(run, begin, "begin"),
                            _expected(begin, len(args.addresses)))
    except (ImportError, OSError, ValueError) as error:
        print(f"dgs-receiver: refused: online building: {error}", file=err, flush=True)
        return False


def _expected(begin: list[dict], connections: int) -> set[int] | None:
    """The enabled boards of every crate, if each crate's snapshot shows them."""
    boards: set[int] = set()
    for taken in begin:
        enabled = snapshot.enabled_boards(taken)
        if enabled is None:
            return None
        boards |= enabled
    return boards if len(begin) == connections else None


def metadata(run: RunDirectory, crates: list[dict] | None, when: str) -> dict:
    """What the event files say about the run: its name and the ``when`` (begin/end) PV
    snapshot of every crate (``pvs_begin``/``pvs_end``; empty without --pv-pva/--pv-ca)."""
    return {"run": run.run_name, f"pvs_{when}": crates or []}


def guard(action: Callable[[], object], write_failed: threading.Event) -> OSError | None:
    """Run an online-building step; a write error stops every puller acknowledging."""
    try:
        action()
    except OSError as error:
        write_failed.set()
        return error
    return None


def summary_line(document: dict) -> str:
    """The summary's line about online building (late records are what a user checks)."""
    events = document.get("events")
    return (
        f"online: {document['records']} records in timestamp order, {document['late']} late "
        f"(--merge-wait {document['merge_wait_s']:g} s, at most {document['max_held']} held)"
        + (f", {events['events']} events in {events['files']} file(s)" if events else "")
    )


def _subset(released: Released, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records ``keep`` of a block, back to back (bytes and bounds)."""
    starts, ends = released.bounds[keep], released.bounds[keep + 1]
    sizes = ends - starts
    bounds = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    index = np.arange(int(bounds[-1]), dtype=np.int64) + np.repeat(starts - bounds[:-1], sizes)
    return released.data[index], bounds

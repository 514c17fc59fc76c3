"""Coincidence events built online from the merged record stream (``--events``).

The same grouping and file writer as ``dgs-merge --events`` (`builder.events`,
`builder.eventfile`): records arrive here in timestamp order, their digitizer
hits are decoded (`builder.hits`), grouped, and each completed event is written
at once; the file is chunked and rotated by ``--chunk-events`` and
``--chunk-seconds`` like the run files. Only the digitizer hits become event
entries (type-F status headers and master-trigger records stay in the GEB
files); late records (`receiver.merge`) are left out, since an event cannot
reopen once written.
"""

from __future__ import annotations

import argparse

import numpy as np

from builder.calibration import Calibration
from builder.eventfile import open_event_writer
from builder.events import EventBuilder
from builder.hits import concat_hits, hits_from_records, records_from_bounds

#: Hits gathered before they are grouped and written: the file writers cost per call
#: (an HDF5 dataset grows per write), so blocks of a reply's size (~2,000 hits at the
#: P3 rate) would spend more time in them than in the data (measured: about half).
BATCH_HITS = 65_536


class EventSink:
    """Hits in, events out to the event files."""

    def __init__(self, args: argparse.Namespace, metadata: dict) -> None:
        self.window = args.window
        self.filter_length = args.filter_length
        self.with_traces = args.traces
        calibration = Calibration.from_csv(args.calibration) if args.calibration else None
        self.builder = EventBuilder(self.window)
        self.writer = open_event_writer(
            str(args.events),
            {"created_by": "dgs-receiver", **metadata, "window_ticks": self.window,
             "filter_length": self.filter_length,
             "calibration": str(args.calibration) if args.calibration else None},
            chunk_events=args.chunk_events, chunk_seconds=args.chunk_seconds,
            calibration=calibration, with_traces=self.with_traces,
        )
        self.hits = 0
        self.events = 0
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_hits = 0

    def feed(self, data: np.ndarray, bounds: np.ndarray, timestamps: np.ndarray,
             crate_of_board: dict[int, int] | None = None) -> None:
        """Records in timestamp order (``data`` bytes, ``bounds`` their offsets)."""
        hits, traces = hits_from_records(
            data, records_from_bounds(bounds, timestamps), crate_of_board=crate_of_board,
            filter_length=self.filter_length, with_traces=self.with_traces,
        )
        if hits.size:
            self.hits += hits.size
            self._pending.append((hits, traces))
            self._pending_hits += hits.size
            if self._pending_hits >= BATCH_HITS:
                self._build()

    def flush(self) -> None:
        """The end of the data: the events still open are complete."""
        self._build()
        self._write(self.builder.flush())

    def _build(self) -> None:
        """Group the gathered hits; write the events they complete."""
        if not self._pending:
            return
        pending, self._pending, self._pending_hits = self._pending, [], 0
        hits = concat_hits([h for h, _ in pending])
        traces = None
        if self.with_traces:
            width = max(t.shape[1] for _, t in pending)
            traces = np.full((hits.size, width), -1, dtype=np.int16)
            row = 0
            for _, part in pending:
                traces[row : row + part.shape[0], : part.shape[1]] = part
                row += part.shape[0]
        self._write(self.builder.feed(hits, traces))

    def close(self, end_metadata: dict) -> None:
        self.writer.set_end_metadata(end_metadata)
        self.writer.close()

    def summary(self) -> dict:
        return {"window_ticks": self.window, "hits": self.hits, "events": self.events,
                "files": len(self.writer.files)}

    def _write(self, events) -> None:
        if len(events):
            self.writer.write(events, events.traces)
            self.events += len(events)


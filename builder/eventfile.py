"""Event files: coincidence events in ROOT (uproot) or HDF5 (h5py), with the run's metadata.

ROOT (``.root``): a TTree ``events``, one entry per event:

- ``mult`` (int32): hits in the event, the counter of every per-hit branch;
- ``event_timestamp`` (uint64): the first hit's timestamp (10 ns ticks);
- per hit (jagged, ``mult`` long): ``board`` (uint16), ``channel`` (uint8),
  ``timestamp`` (uint64, 10 ns ticks), ``e`` (int32, ADC counts, see
  `builder.hits`), ``ekev`` (float32 keV; only with a calibration), ``header_type``
  (uint8: 7 LED, 8 CFD), ``flags`` (uint16, packet word 4 flag bits),
  ``pileup`` (uint8, 1 when flag bit 15 is set), ``crate`` (uint8);
- with traces: ``trace_samples`` (int32, samples per hit) and ``trace`` (int16,
  ``trace_n`` = mult × trace_samples values: hit 0's samples, then hit 1's…).

So ``events->Draw("ekev")``, ``events->Draw("e", "mult==2")`` or
``uproot.open(f)["events"].arrays()`` just work. ``metadata`` is a TObjString
holding the metadata as JSON.

HDF5 (``.h5``/``.hdf5``): dataset ``hits`` (compound, one row per hit: the fields
of `builder.hits.HIT_DTYPE`, ``event`` (int64, the event's row in ``events``) and,
with a calibration, ``energy_kev`` float32), dataset ``events`` (compound:
``first`` int64 row of its first hit in ``hits``, ``mult`` int32, ``timestamp``
uint64), with traces ``traces`` (int16, hits × samples, −1 padding). The file's
attributes hold the metadata: each top-level key, strings and numbers as they
are, anything else as JSON, and the whole dict as JSON in ``metadata``.
``pandas.read_hdf(f, "hits")`` (PyTables reads plain compound datasets as tables) gives
a table of hits, as does ``pandas.DataFrame(h5py.File(f)["hits"][:])``.

Chunks: with ``chunk_events`` a file holds at most that many events; with
``chunk_seconds`` a new file starts at the first event ≥ that long (in data
time, timestamps) after the file's first event, so offline and online files cut
alike. Chunked files are named like run chunks: ``OUT.root`` becomes
``OUT_000.root``, ``OUT_001.root``…; unchunked, the file is ``OUT.root`` itself.
A file is written as ``.<name>.part`` and renamed on close; an existing file is
never replaced. Each chunk's metadata adds ``chunk``, ``events`` and ``hits``; the
end-of-run part given to `set_end_metadata` goes into the chunks closed after it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from builder.calibration import Calibration
from builder.events import Events
from builder.hits import FLAG_PILE_UP, HIT_DTYPE, concat_hits

TICKS_PER_SECOND = 100_000_000
#: Hits gathered before a ROOT basket is written (larger baskets read faster).
_ROOT_BASKET_HITS = 500_000
_HDF5_SUFFIXES = (".h5", ".hdf5")


class _Chunk(Protocol):
    def write(self, events: Events, kev: np.ndarray | None, traces: np.ndarray | None) -> None: ...
    def close(self, metadata: dict) -> None: ...


class EventWriter:
    """Writes events to one file or a series of chunk files (see the module doc)."""

    def __init__(self, path: Path, metadata: dict, chunk_events: int | None,
                 chunk_seconds: float | None, calibration: Calibration | None,
                 with_traces: bool) -> None:
        if chunk_events is not None and chunk_events < 1:
            raise ValueError("--chunk-events must be at least 1")
        if chunk_seconds is not None and chunk_seconds <= 0:
            raise ValueError("--chunk-seconds must be positive")
        self.path = path
        self.metadata = dict(metadata)
        self.chunk_events = chunk_events
        self.chunk_ticks = None if chunk_seconds is None else int(chunk_seconds * TICKS_PER_SECOND)
        self.calibration = calibration
        self.with_traces = with_traces
        self.files: list[Path] = []
        self.events = 0
        self.hits = 0
        self._chunked = chunk_events is not None or chunk_seconds is not None
        self._chunk: _Chunk | None = None
        self._chunk_path: Path | None = None
        self._chunk_events = 0
        self._chunk_hits = 0
        self._chunk_first: int | None = None
        if not self._chunked:
            self._refuse_existing(path)

    def write(self, events: Events, traces: np.ndarray | None = None) -> None:
        """Append events (traces rows aligned with ``events.hits``; default ``events.traces``)."""
        if traces is None:
            traces = events.traces
        first = 0
        while first < len(events):
            if self._chunk is None:
                self._open(int(events.hits["timestamp"][events.offsets[first]]))
            stop = self._room(events, first)
            if stop == first:
                self._close_chunk()
                continue
            part = _slice(events, first, stop)
            lo, hi = int(events.offsets[first]), int(events.offsets[stop])
            kev = None if self.calibration is None else self.calibration.kev(part.hits)
            assert self._chunk is not None
            self._chunk.write(part, kev, None if traces is None else traces[lo:hi])
            self._chunk_events += stop - first
            self._chunk_hits += hi - lo
            self.events += stop - first
            self.hits += hi - lo
            first = stop

    def set_end_metadata(self, metadata: dict) -> None:
        """Add the end-of-run part (the end PV snapshot…) to the files still to close."""
        self.metadata.update(metadata)

    def close(self) -> list[Path]:
        """Close the open file; returns every file written. An empty run still gets one file."""
        if self._chunk is None and not self.files:
            self._open(None)
        self._close_chunk()
        return self.files

    def abort(self) -> None:
        """Stop after a failure: the open file is closed and removed (closed chunks stay)."""
        if self._chunk is not None and self._chunk_path is not None:
            self._chunk.close(self.metadata)
            self._chunk_path.with_name(f".{self._chunk_path.name}.part").unlink(missing_ok=True)
        self._chunk = self._chunk_path = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _room(self, events: Events, first: int) -> int:
        """How far (event index) the open chunk may take events from ``first``."""
        stop = len(events)
        if self.chunk_events is not None:
            stop = min(stop, first + self.chunk_events - self._chunk_events)
        if self.chunk_ticks is not None and self._chunk_first is not None:
            starts = events.hits["timestamp"][events.offsets[first:stop]]
            limit = np.uint64(self._chunk_first + self.chunk_ticks)
            stop = first + int(np.searchsorted(starts, limit, side="left"))
        return stop

    def _open(self, first_timestamp: int | None) -> None:
        if self._chunked:
            stem = f"{self.path.stem}_{len(self.files):03d}{self.path.suffix}"
            path = self.path.with_name(stem)
            self._refuse_existing(path)
        else:
            path = self.path
        part = path.with_name(f".{path.name}.part")
        part.unlink(missing_ok=True)
        if path.suffix.lower() in _HDF5_SUFFIXES:
            self._chunk = _Hdf5Chunk(part, self.calibration is not None, self.with_traces)
        else:
            self._chunk = _RootChunk(part, self.calibration is not None, self.with_traces)
        self._chunk_path = path
        self._chunk_events = self._chunk_hits = 0
        self._chunk_first = first_timestamp

    def _close_chunk(self) -> None:
        if self._chunk is None or self._chunk_path is None:
            return
        metadata = {**self.metadata, "chunk": len(self.files), "events": self._chunk_events,
                    "hits": self._chunk_hits}
        self._chunk.close(metadata)
        part = self._chunk_path.with_name(f".{self._chunk_path.name}.part")
        self._refuse_existing(self._chunk_path)
        os.rename(part, self._chunk_path)
        self.files.append(self._chunk_path)
        self._chunk = self._chunk_path = None

    @staticmethod
    def _refuse_existing(path: Path) -> None:
        if path.exists():
            raise FileExistsError(f"{path} already exists")


def open_event_writer(path: str | Path, metadata: dict, chunk_events: int | None = None,
                      chunk_seconds: float | None = None,
                      calibration: Calibration | str | Path | None = None,
                      with_traces: bool = False) -> EventWriter:
    """An event file writer: ``.root`` → ROOT via uproot, ``.h5``/``.hdf5`` → HDF5 via h5py."""
    path = Path(path)
    if path.suffix.lower() not in (".root", *_HDF5_SUFFIXES):
        raise ValueError(f"{path}: the event file must end in .root, .h5 or .hdf5")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.from_csv(calibration)
    return EventWriter(path, metadata, chunk_events, chunk_seconds, calibration, with_traces)


def _slice(events: Events, first: int, stop: int) -> Events:
    lo, hi = int(events.offsets[first]), int(events.offsets[stop])
    return Events(events.hits[lo:hi], events.offsets[first : stop + 1] - lo)


def _jsonable_attr(value: Any) -> Any:
    if isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value)


class _RootChunk:
    """One ROOT file: the ``events`` TTree, baskets of about `_ROOT_BASKET_HITS` hits."""

    def __init__(self, path: Path, calibrated: bool, with_traces: bool) -> None:
        import uproot

        self._file = uproot.recreate(path)
        self._calibrated = calibrated
        self._with_traces = with_traces
        self._pending: list[tuple[Events, np.ndarray | None, np.ndarray | None]] = []
        self._pending_hits = 0
        self._tree = None

    def write(self, events: Events, kev: np.ndarray | None, traces: np.ndarray | None) -> None:
        self._pending.append((events, kev, traces))
        self._pending_hits += events.hits.size
        if self._pending_hits >= _ROOT_BASKET_HITS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        import awkward as ak

        hits = concat_hits([e.hits for e, _, _ in self._pending])
        mult = np.concatenate([e.multiplicity for e, _, _ in self._pending]).astype(np.int32)
        heads = np.concatenate([e.hits["timestamp"][e.offsets[:-1]] for e, _, _ in self._pending])
        columns: dict[str, Any] = {"mult": mult, "event_timestamp": heads.astype(np.uint64)}
        per_hit = {
            "board": hits["board"], "channel": hits["channel"], "timestamp": hits["timestamp"],
            "e": hits["energy"], "header_type": hits["header_type"], "flags": hits["flags"],
            "pileup": ((hits["flags"] & FLAG_PILE_UP) != 0).astype(np.uint8),
            "crate": hits["crate"],
        }
        if self._calibrated:
            per_hit["ekev"] = np.concatenate([k for _, k, _ in self._pending])
        for name, values in per_hit.items():
            columns[name] = ak.unflatten(np.ascontiguousarray(values), mult)
        if self._with_traces:
            traces = _stack_traces([t for _, _, t in self._pending], hits.size)
            samples = traces.shape[1]
            columns["trace_samples"] = np.full(mult.size, samples, dtype=np.int32)
            columns["trace"] = ak.unflatten(traces.reshape(-1), mult * samples)
        if self._tree is None:
            types = {name: (value.type.content if isinstance(value, ak.Array) else value.dtype)
                     for name, value in columns.items()}
            self._tree = self._file.mktree(
                "events", types,
                counter_name=lambda name: "trace_n" if name == "trace" else "mult")
        self._tree.extend(columns)
        self._pending, self._pending_hits = [], 0

    def close(self, metadata: dict) -> None:
        if self._tree is None and not self._pending:  # no event: the branches all the same
            kev = np.empty(0, np.float32) if self._calibrated else None
            traces = np.empty((0, 0), np.int16) if self._with_traces else None
            self._pending.append((Events.empty(), kev, traces))
        self._flush()
        self._file["metadata"] = json.dumps(metadata)
        self._file.close()


def _stack_traces(parts: list[np.ndarray | None], hits: int) -> np.ndarray:
    """Trace rows of several writes as one array (−1 padding to the widest)."""
    present = [p for p in parts if p is not None]
    width = max((p.shape[1] for p in present), default=0)
    out = np.full((hits, width), -1, dtype=np.int16)
    row = 0
    for part in present:
        out[row : row + part.shape[0], : part.shape[1]] = part
        row += part.shape[0]
    return out


class _Hdf5Chunk:
    """One HDF5 file: resizable ``hits``, ``events`` (and ``traces``) datasets."""

    def __init__(self, path: Path, calibrated: bool, with_traces: bool) -> None:
        import h5py

        self._file = h5py.File(path, "w")
        fields = [*((name, HIT_DTYPE.fields[name][0]) for name in HIT_DTYPE.names),
                  ("event", np.int64)]
        if calibrated:
            fields.append(("energy_kev", np.float32))
        self._hit_dtype = np.dtype(fields)
        self._event_dtype = np.dtype([("first", np.int64), ("mult", np.int32),
                                      ("timestamp", np.uint64)])
        self._hits = self._file.create_dataset("hits", (0,), self._hit_dtype, maxshape=(None,),
                                               chunks=(65536,))
        self._events = self._file.create_dataset("events", (0,), self._event_dtype,
                                                 maxshape=(None,), chunks=(65536,))
        self._traces = None
        if with_traces:
            self._traces = self._file.create_dataset("traces", (0, 0), np.int16,
                                                     maxshape=(None, None), chunks=(1024, 64),
                                                     fillvalue=-1)

    def write(self, events: Events, kev: np.ndarray | None, traces: np.ndarray | None) -> None:
        hit_base, event_base = self._hits.shape[0], self._events.shape[0]
        rows = np.empty(events.hits.size, dtype=self._hit_dtype)
        for name in HIT_DTYPE.names:
            rows[name] = events.hits[name]
        rows["event"] = event_base + np.repeat(np.arange(len(events)), events.multiplicity)
        if kev is not None:
            rows["energy_kev"] = kev
        table = np.empty(len(events), dtype=self._event_dtype)
        table["first"] = hit_base + events.offsets[:-1]
        table["mult"] = events.multiplicity
        table["timestamp"] = events.hits["timestamp"][events.offsets[:-1]]
        self._hits.resize((hit_base + rows.size,))
        self._hits[hit_base:] = rows
        self._events.resize((event_base + table.size,))
        self._events[event_base:] = table
        if self._traces is not None:
            width = max(self._traces.shape[1], 0 if traces is None else traces.shape[1])
            self._traces.resize((hit_base + rows.size, width))
            if traces is not None and traces.size:
                self._traces[hit_base:, : traces.shape[1]] = traces

    def close(self, metadata: dict) -> None:
        for key, value in metadata.items():
            self._file.attrs[key] = _jsonable_attr(value)
        self._file.attrs["metadata"] = json.dumps(metadata)
        self._file.close()

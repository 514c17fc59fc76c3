"""Run directories and the files of a run (spec 04 file names).

Layouts (``<fn>`` = ``<run>/<run>.<ext>_<chunk>``, chunk three digits from 000):

- ``classic``: ``<fn>_<board>_<ch>`` per board (four digits) and channel (one
  hex digit, D/E/F for type-F headers); a trigger board's records, type-F
  included, go to ``<fn>_trig_<board>_0``;
- ``board``: ``<fn>_<board>`` per board, arrival order; trigger boards
  ``<fn>_trig_<board>``;
- ``single``: ``<fn>``, everything in arrival order;
- ``merged``: ``<fn>``, everything in timestamp order across boards and crates
  (`receiver.merge`: records are held back until they can be written in order);
- ``none``: no data files (with ``--events``: only the event files).

Every stream rotates on its own: a new chunk starts when the next record would
make the file exceed the size limit, and optionally when the file is older
than an interval or holds a number of records. A record larger than the limit
is written alone in its chunk (records are never split).

Safety: a file is written as ``.<name>.part`` and renamed to its name on close
(a hard link that fails if the name exists, so nothing is ever overwritten),
then it is read-only. `RunDirectory.create` refuses an existing non-empty run
directory before creating anything.

Atomic writes: what one `Stream.write` call writes either all lands or, on any
write error (a full disk), is taken back (files cut back to their size before
the call, chunks the call opened removed), so no file ever ends in a partial
record. A chunk rotated out stays open until `Stream.settle`, so the writes of
a whole reply (several streams) can still be taken back with `Stream.undo`.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_CHUNK_BYTES = 2_000_000_000
READ_ONLY = 0o444
#: Space set aside for a JSON side file written at the end of a run (the summary).
RESERVED_JSON_BYTES = 256 * 1024


class Layout(enum.Enum):
    CLASSIC = "classic"
    BOARD = "board"
    SINGLE = "single"
    MERGED = "merged"
    NONE = "none"


class RunExistsError(Exception):
    """The run directory or one of the run's files already exists; nothing was touched."""


@dataclass(frozen=True)
class Rotation:
    """When a stream starts a new chunk."""

    max_bytes: int = DEFAULT_CHUNK_BYTES
    max_seconds: float | None = None
    max_records: int | None = None

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("the chunk size limit must be at least 1 byte")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("the chunk interval must be positive")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("the chunk record count must be at least 1")


class StreamKey(NamedTuple):
    """Which file family records go to; ``board``/``channel`` -1 when the layout ignores them."""

    board: int
    channel: int
    trigger: bool


@dataclass
class ClosedFile:
    """A file of the run after it was closed."""

    path: Path
    nbytes: int
    records: int


class ChunkFile:
    """One open chunk: written under a temporary name, renamed read-only on close.

    Writes go straight to the file descriptor: a reply's records arrive as a
    few large pieces, and a user-space buffer would only add a copy (measured
    slower on tmpfs).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.part = path.with_name(f".{path.name}.part")
        if path.exists():
            raise RunExistsError(f"{path} already exists")
        self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.opened_at = time.monotonic()
        self.nbytes = 0
        self.records = 0

    def write(self, data: memoryview | np.ndarray, records: int) -> None:
        """Append; an error names this file (callers take the partial write back)."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # a regular file may take less than asked
                done += os.write(self._fd, view[done:])
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        finally:
            self.nbytes += done
        self.records += records

    def cut_back(self, nbytes: int, records: int) -> None:
        """Take back everything written after the file held ``nbytes`` (``records``)."""
        os.ftruncate(self._fd, nbytes)
        os.lseek(self._fd, nbytes, os.SEEK_SET)
        self.nbytes, self.records = nbytes, records

    def discard(self) -> None:
        """Close and remove a chunk that holds nothing to keep."""
        os.close(self._fd)
        self.part.unlink(missing_ok=True)

    def close(self) -> ClosedFile:
        """Make read-only, close, and give the file its name (never replacing one)."""
        os.fchmod(self._fd, READ_ONLY)
        os.close(self._fd)
        _publish(self.part, self.path)
        return ClosedFile(self.path, self.nbytes, self.records)


def _publish(part: Path, path: Path) -> None:
    """Rename ``part`` to ``path``, failing instead of replacing an existing ``path``."""
    try:
        os.link(part, path)
    except FileExistsError:
        raise RunExistsError(f"{path} appeared during the run; the data stay in {part}") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if path.exists():
            raise RunExistsError(f"{path} appeared during the run; data in {part}") from None
        os.rename(part, path)
        return
    os.unlink(part)


class Mark(NamedTuple):
    """A stream as it was before a write: what `Stream.undo` returns it to."""

    chunk: int
    current: ChunkFile | None
    nbytes: int
    records: int
    retired: int


class Stream:
    """The chunk files of one stream key, rotated by the run's `Rotation`."""

    def __init__(self, run: RunDirectory, key: StreamKey) -> None:
        self.run = run
        self.key = key
        self.chunk = -1
        self.current: ChunkFile | None = None
        #: Chunks rotated out and not yet closed (see `settle`).
        self.retired: list[ChunkFile] = []
        self.lock = threading.Lock()

    def write(self, data: np.ndarray, bounds: np.ndarray) -> Mark:
        """Write whole records: ``data`` bytes, ``bounds`` their byte offsets (records + 1).

        All or nothing: on an error the stream is returned to how it was, then the
        error is raised. Returns the mark to undo this write later.
        """
        with self.lock:
            mark = self._mark()
            try:
                self._write(data, bounds)
            except OSError:
                self._undo(mark)
                raise
            return mark

    def _write(self, data: np.ndarray, bounds: np.ndarray) -> None:
        rotation = self.run.rotation
        first, last = 0, bounds.size - 1
        while first < last:
            current = self._current()
            if current.records and self._expired(current):
                current = self._rotate()
            room = rotation.max_bytes - current.nbytes
            stop = int(np.searchsorted(bounds, bounds[first] + room, side="right")) - 1
            stop = min(stop, last)
            if rotation.max_records is not None:
                stop = min(stop, first + rotation.max_records - current.records)
            if stop <= first:
                if current.records:
                    self._rotate()
                    continue
                stop = first + 1  # a record larger than the limit goes alone
            begin, end = int(bounds[first]), int(bounds[stop])
            current.write(data[begin:end], stop - first)
            first = stop

    def _mark(self) -> Mark:
        current = self.current
        nbytes, records = (current.nbytes, current.records) if current else (0, 0)
        return Mark(self.chunk, current, nbytes, records, len(self.retired))

    def undo(self, mark: Mark) -> None:
        """Take back every write since ``mark`` (a later write of the same reply failed)."""
        with self.lock:
            self._undo(mark)

    def _undo(self, mark: Mark) -> None:
        opened = self.retired[mark.retired :]
        if self.current is not None and self.current is not mark.current:
            opened.append(self.current)
        for chunk in opened:
            if chunk is not mark.current:
                chunk.discard()
        del self.retired[mark.retired :]
        self.current, self.chunk = mark.current, mark.chunk
        if mark.current is not None:
            mark.current.cut_back(mark.nbytes, mark.records)

    def settle(self) -> None:
        """The reply's writes stand: close the chunks rotated out meanwhile."""
        if not self.retired:
            return
        with self.lock:
            retired, self.retired = self.retired, []
            for chunk in retired:
                self.run.closed(chunk.close())

    def _expired(self, current: ChunkFile) -> bool:
        interval = self.run.rotation.max_seconds
        return interval is not None and time.monotonic() - current.opened_at >= interval

    def _current(self) -> ChunkFile:
        if self.current is None:
            self.chunk += 1
            self.current = ChunkFile(self.run.path_for(self.key, self.chunk))
        return self.current

    def _rotate(self) -> ChunkFile:
        if self.current is not None:
            self.retired.append(self.current)
            self.current = None
        return self._current()

    def close(self) -> None:
        """Close every open chunk (caller holds the lock)."""
        for chunk in [*self.retired, *([self.current] if self.current else [])]:
            self.run.closed(chunk.close())
        self.retired, self.current = [], None


class RunDirectory:
    """A run's directory: its streams, its diagnostic file and its JSON side files."""

    def __init__(self, root: Path, run_name: str, ext: str, layout: Layout, rotation: Rotation):
        self.root = root
        self.run_name = run_name
        self.ext = ext
        self.layout = layout
        self.rotation = rotation
        self.path = root / run_name
        self._streams: dict[StreamKey, Stream] = {}
        self._lock = threading.Lock()
        self.files: list[ClosedFile] = []
        self.unknown = DiagnosticFile(self.path / f"{run_name}.unknown")

    @classmethod
    def create(
        cls,
        root: Path,
        run_name: str,
        ext: str = "gtd",
        layout: Layout = Layout.CLASSIC,
        rotation: Rotation = Rotation(),
    ) -> RunDirectory:
        """Check, then create the run directory; RunExistsError before touching anything."""
        check_name(run_name, "run name")
        check_name(ext, "extension")
        run = cls(root, run_name, ext, layout, rotation)
        exists = run.path.exists() or run.path.is_symlink()
        if exists and (not run.path.is_dir() or any(run.path.iterdir())):
            raise RunExistsError(f"run {run_name} already exists: {run.path}")
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    # ------------------------------------------------------------- naming

    @property
    def stem_prefix(self) -> str:
        """What every data file name of the run starts with."""
        return f"{self.run_name}.{self.ext}_"

    def stem(self, chunk: int) -> str:
        """``<run>.<ext>_<chunk>``, the ``<fn>`` of spec 04 without the directory."""
        return f"{self.run_name}.{self.ext}_{chunk:03d}"

    def key_for(self, board: int, channel: int, trigger: bool) -> StreamKey:
        """The stream of a record group under this layout."""
        if self.layout in (Layout.SINGLE, Layout.MERGED, Layout.NONE):
            return StreamKey(-1, -1, False)
        if self.layout is Layout.BOARD or trigger:
            return StreamKey(board, -1, trigger)
        return StreamKey(board, channel, False)

    def path_for(self, key: StreamKey, chunk: int) -> Path:
        stem = self.stem(chunk)
        if self.layout in (Layout.SINGLE, Layout.MERGED):
            return self.path / stem
        if key.trigger:
            suffix = "_0" if self.layout is Layout.CLASSIC else ""
            return self.path / f"{stem}_trig_{key.board:04d}{suffix}"
        if self.layout is Layout.BOARD:
            return self.path / f"{stem}_{key.board:04d}"
        return self.path / f"{stem}_{key.board:04d}_{key.channel:X}"

    # ------------------------------------------------------------- writing

    def stream(self, key: StreamKey) -> Stream:
        stream = self._streams.get(key)
        if stream is None:
            with self._lock:
                stream = self._streams.get(key)
                if stream is None:
                    stream = self._streams[key] = Stream(self, key)
        return stream

    def write(self, key: StreamKey, data: np.ndarray, bounds: np.ndarray) -> Mark:
        return self.stream(key).write(data, bounds)

    def close_board(self, board: int) -> None:
        """Close every open file of ``board`` (its 0xD arrived); later data start new chunks."""
        if self.layout in (Layout.SINGLE, Layout.MERGED, Layout.NONE):
            return
        for key, stream in list(self._streams.items()):
            if key.board == board:
                with stream.lock:
                    stream.close()

    def close(self) -> None:
        """Close every open file of the run."""
        for stream in list(self._streams.values()):
            with stream.lock:
                stream.close()
        self.unknown.close()

    def closed(self, closed: ClosedFile) -> None:
        with self._lock:
            self.files.append(closed)

    def reserve(self, name: str, nbytes: int = RESERVED_JSON_BYTES) -> None:
        """Set disk space aside now for the JSON side file ``name`` written at the end
        (the summary must be writable even when the run filled the disk)."""
        part = self._json_path(name).with_name(f".{self.run_name}.{name}.json.part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError:
            pass  # a file system that cannot reserve: the file is just written at the end
        finally:
            os.close(fd)

    def write_json(self, name: str, document: Any) -> Path:
        """A read-only JSON side file ``<run>/<run>.<name>.json`` (never replacing one);
        written into the space `reserve` set aside, if it did."""
        path = self._json_path(name)
        part = path.with_name(f".{path.name}.part")
        if path.exists():
            raise RunExistsError(f"{path} already exists")
        text = json.dumps(document, indent=1, sort_keys=False) + "\n"
        mode = "r+" if part.exists() else "x"
        with open(part, mode, encoding="utf-8") as out:
            out.write(text)
            out.truncate()
        os.chmod(part, READ_ONLY)
        _publish(part, path)
        return path

    def _json_path(self, name: str) -> Path:
        return self.path / f"{self.run_name}.{name}.json"


#: Header of each span in the diagnostic file: magic, header bytes, connection index,
#: reply number, byte offset in the reply, span bytes; then the IOC address (ASCII)
#: and the span's raw bytes as received.
UNKNOWN_HEADER = struct.Struct("<4sHHQII")
UNKNOWN_MAGIC = b"DGSU"


class DiagnosticFile:
    """Where data nothing could parse go, with where they came from. Opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spans = 0
        self.nbytes = 0
        self._file: ChunkFile | None = None
        self._lock = threading.Lock()

    def add(self, address: str, connection: int, reply: int, offset: int, data: bytes) -> None:
        label = address.encode("ascii", "replace")
        header = UNKNOWN_HEADER.pack(
            UNKNOWN_MAGIC, UNKNOWN_HEADER.size + len(label), connection, reply, offset, len(data)
        )
        with self._lock:
            if self._file is None:
                self._file = ChunkFile(self.path)
            self._file.write(memoryview(header + label + data), 1)
            self.spans += 1
            self.nbytes += len(data)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_unknown(data: bytes) -> list[tuple[str, int, int, int, bytes]]:
    """Parse a diagnostic file: ``(address, connection, reply, offset, raw bytes)`` per span."""
    spans = []
    position = 0
    while position < len(data):
        magic, header_bytes, connection, reply, offset, nbytes = UNKNOWN_HEADER.unpack_from(
            data, position
        )
        if magic != UNKNOWN_MAGIC:
            raise ValueError(f"not a diagnostic span at byte {position}")
        address = data[position + UNKNOWN_HEADER.size : position + header_bytes].decode("ascii")
        start = position + header_bytes
        spans.append((address, connection, reply, offset, data[start : start + nbytes]))
        position = start + nbytes
    return spans


def check_name(name: str, what: str) -> None:
    """A run name or extension must be one plain path component."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise ValueError(f"bad {what}: {name!r}")


"""A recording on disk: which files a source names, and each board's packets in them.

A source is a run directory, GEB run files (any layout of `receiver.files`, or
the classic receiver's, which names files the same way) or raw reply files
written by ``dgs-receiver --save-raw`` (``<run>.replies_<n>``). A directory
holding both is replayed from its GEB files.

The files of one stream (its chunks, in chunk order) form a *family*. Each
configured board reads, block by block, the families that may hold its
records (a file name that names another board is never opened) and keeps its
own: digitizer packets whose package data is the board's, trigger packets for
the trigger board. Type-F headers are skipped: the IOC makes its own. When a
board's records are spread over several families (the classic layout: one
file per channel) they are merged by timestamp; the order inside each file is
kept. Memory stays bounded by the block size whatever the size of the run.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ioc import packets, protocol
from ioc.hardware import WORD
from receiver import geb
from replay.packets import (
    PLACEHOLDER_TRIGGER_IDS,
    Packets,
    RecordingError,
    classify_geb,
    geb_packets,
    reply_kinds,
    reply_packets,
)

log = logging.getLogger("dgs.replay")

GEB_NAME = re.compile(
    r"(?P<stem>.+\.[^._]+)_(?P<chunk>\d{3})"
    r"(?:_(?P<trig>trig_)?(?P<board>\d{4})(?:_(?P<channel>[0-9A-F]))?)?"
)
RAW_NAME = re.compile(r".+\.replies_\d+")
#: Classic-layout channel files that hold only type-F headers.
STATUS_CHANNELS = frozenset("DEF")
BLOCK_BYTES = 1 << 20
#: A saved reply larger than this is not one (the IOC's largest reply is 10 MB).
MAX_REPLY_BYTES = 16 << 20
RAW_HEADER = protocol.CLASSIC_HEADER
#: The longest record payload a DGS packet makes (N = 510 words).
MAX_RECORD_PAYLOAD = 4 * packets.MAX_PACKET_LENGTH


@dataclass(frozen=True)
class Family:
    """The files of one recorded stream, in order, and what their names say."""

    paths: tuple[Path, ...]
    raw: bool
    board: int | None = None  # the board its name says, None: any
    trigger: bool | None = None  # its name says trigger (True) or digitizer (False) data

    def may_hold(self, board: int, trigger: bool) -> bool:
        if self.trigger is not None and self.trigger != trigger:
            return False
        if self.board is None:
            return True
        return self.board == board or (trigger and self.board in PLACEHOLDER_TRIGGER_IDS)


def families(sources: Iterable[str | Path]) -> list[Family]:
    """Every family of the sources (RecordingError naming a source that holds none)."""
    found: list[Family] = []
    for source in map(Path, sources):
        if source.is_dir():
            found += _directory(source)
        elif source.is_file():
            found += _grouped([source], raw=bool(RAW_NAME.fullmatch(source.name)))
        else:
            raise RecordingError(f"{source}: no such file or directory")
    return found


def _directory(directory: Path) -> list[Family]:
    names = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    geb_files = [p for p in names if GEB_NAME.fullmatch(p.name) and not RAW_NAME.fullmatch(p.name)]
    if geb_files:
        return _grouped(geb_files, raw=False)
    raw_files = [p for p in names if RAW_NAME.fullmatch(p.name)]
    if raw_files:
        return _grouped(raw_files, raw=True)
    raise RecordingError(
        f"{directory}: no GEB run files (<run>.<ext>_<chunk>...) or saved replies "
        "(<run>.replies_<n>) in it"
    )


def _grouped(paths: list[Path], raw: bool) -> list[Family]:
    """Chunks of the same stream joined in chunk order; the rest one family each."""
    if raw:
        return [Family((path,), raw=True) for path in paths]
    streams: dict[tuple, list[tuple[int, Path]]] = {}
    hints: dict[tuple, tuple[int | None, bool | None]] = {}
    for path in paths:
        match = GEB_NAME.fullmatch(path.name)
        if match is None:
            streams[(path,)] = [(0, path)]
            hints[(path,)] = (None, None)
            continue
        channel = match["channel"]
        if channel in STATUS_CHANNELS and not match["trig"]:
            continue
        key = (path.parent, match["stem"], match["trig"], match["board"], channel)
        streams.setdefault(key, []).append((int(match["chunk"]), path))
        board = int(match["board"]) if match["board"] else None
        hints[key] = (board, bool(match["trig"]) if board is not None else None)
    return [
        Family(tuple(path for _, path in sorted(chunks)), False, *hints[key])
        for key, chunks in streams.items()
    ]


@dataclass(frozen=True)
class Wanted:
    """Whose packets a board stream keeps."""

    board: int  # the configured package data
    trigger: bool


@dataclass
class Strangers:
    """Records of boards the configuration does not have: skipped, counted, said once."""

    digitizers: frozenset[int]
    has_trigger: bool
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, count: int) -> None:
        if label not in self.counts:
            log.warning("replay: %s is not in the configuration: its records are skipped", label)
            self.counts[label] = 0
        self.counts[label] += count


class FamilyCursor:
    """One family read block by block, keeping one board's packets.

    With ``strangers`` it also counts the records no configured board takes (one
    cursor per family does, so nothing is counted twice).
    """

    def __init__(self, family: Family, wanted: Wanted, strangers: Strangers | None) -> None:
        self.family = family
        self.wanted = wanted
        self.strangers = strangers
        self._buffer = bytearray(BLOCK_BYTES)
        self._file: BinaryIO | None = None
        self._index = -1
        self._filled = 0
        self._offset = 0  # byte offset of the buffer's start in the current file
        self._floor = 0
        self._size = 0  # of the current file
        self._said_unknown = False

    @property
    def _where(self) -> str:
        return str(self.family.paths[self._index])

    def rewind(self) -> None:
        self.close()
        self._index, self._filled, self._offset, self._floor = -1, 0, 0, 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next(self) -> bool:
        self.close()
        self._index += 1
        if self._index >= len(self.family.paths):
            return False
        try:
            self._file = open(self.family.paths[self._index], "rb")  # noqa: SIM115 - kept open
        except OSError as error:
            raise RecordingError(f"{self._where}: cannot read: {error.strerror}") from None
        self._filled = self._offset = 0
        self._size = os.fstat(self._file.fileno()).st_size
        return True

    def next(self) -> Packets | None:
        """The board's packets of the next block (maybe none); None at the family's end."""
        while self._file is not None or self._open_next():
            found = self._next_raw() if self.family.raw else self._next_geb()
            if found is not None:
                return found
        return None

    # GEB files

    def _next_geb(self) -> Packets | None:
        assert self._file is not None
        view = memoryview(self._buffer)
        read = self._file.readinto(view[self._filled :])
        self._filled += read
        if read == 0 and self._filled:
            raise RecordingError(
                f"{self._where}: truncated: the file ends inside the record at byte "
                f"{self._offset} ({self._filled} bytes of it)"
            )
        if read == 0:
            self._file.close()
            self._file = None
            return None
        try:
            records, end = geb.scan_records(view[: self._filled])
        except ValueError as error:
            raise RecordingError(f"{self._where}: not a GEB file: {error}") from None
        self._check_next_length(view, end)
        if end == 0:
            if self._filled == len(self._buffer):
                raise RecordingError(f"{self._where}: no whole record at byte {self._offset}")
            return Packets.empty()
        data = np.frombuffer(self._buffer, np.uint8, end)
        found = self._keep_geb(classify_geb(data, records, self._where, self._offset))
        self._buffer[: self._filled - end] = self._buffer[end : self._filled]
        self._filled -= end
        self._offset += end
        return found

    def _check_next_length(self, view: memoryview, end: int) -> None:
        """The record cut off by the block's end must at least claim a packet's length."""
        if self._filled - end < geb.GEB_HEADER_BYTES:
            return
        (length,) = struct.unpack_from("<i", view, end + 4)
        if not 0 < length <= MAX_RECORD_PAYLOAD:
            raise RecordingError(
                f"{self._where}: the record at byte {self._offset + end} is not a DGS packet "
                f"(record length {length})"
            )

    def _keep_geb(self, block) -> Packets:
        wanted = self.wanted
        if wanted.trigger:
            ids = block.board == wanted.board
            ids |= np.isin(block.board, list(PLACEHOLDER_TRIGGER_IDS))
            chosen = block.trigger & ids
        else:
            chosen = ~block.trigger & ~block.status & (block.board == wanted.board)
        if self.strangers is not None:
            self._count_geb(block)
        found, self._floor = geb_packets(block, chosen, wanted.trigger, self._floor)
        return found

    def _count_geb(self, block) -> None:
        strangers = self.strangers
        assert strangers is not None
        digitizer = ~block.trigger & ~block.status
        unknown = digitizer & ~np.isin(block.board, list(strangers.digitizers))
        for board, count in zip(*np.unique(block.board[unknown], return_counts=True)):
            strangers.add(f"board {board}", int(count))
        if not strangers.has_trigger and block.trigger.any():
            strangers.add("a trigger board", int(block.trigger.sum()))

    # raw replies

    def _next_raw(self) -> Packets | None:
        assert self._file is not None
        header = self._file.read(RAW_HEADER.size)
        if not header:
            self._file.close()
            self._file = None
            return None
        at = self._offset
        if len(header) < RAW_HEADER.size:
            raise RecordingError(f"{self._where}: truncated: a partial reply header at byte {at}")
        kind, length, status, records = RAW_HEADER.unpack(header)
        if (kind, status, records) != (protocol.SERVER_SUMMARY, 0, 1) or not (
            0 < length <= MAX_REPLY_BYTES and length % 4 == 0
        ):
            raise RecordingError(
                f"{self._where}: not a saved data reply at byte {at} (header {header.hex()})"
            )
        left = self._size - at - RAW_HEADER.size
        if left < length:
            raise RecordingError(
                f"{self._where}: truncated: the reply at byte {at} has {left} of "
                f"its {length} bytes"
            )
        self._offset += RAW_HEADER.size + length
        head = self._file.read(8)
        if self._someone_elses(np.frombuffer(head, WORD)):
            self._file.seek(length - len(head), 1)
            return Packets.empty()
        payload = head + self._file.read(length - len(head))
        return self._keep_raw(np.frombuffer(payload, WORD))

    def _keep_raw(self, words: np.ndarray) -> Packets:
        decoded = geb.decode_reply(words)
        if decoded.unknown and self.strangers is not None and not self._said_unknown:
            self._said_unknown = True
            log.warning("replay: %s: %d words of the reply at byte %d are not packets: skipped",
                        self._where, decoded.unknown_words, self._offset - 16 - words.nbytes)
        events, wanted = decoded.events, self.wanted
        digitizer, trigger = reply_kinds(events)
        chosen = trigger if wanted.trigger else digitizer & (events["board"] == wanted.board)
        if self.strangers is not None:
            unknown = digitizer & ~np.isin(events["board"], list(self.strangers.digitizers))
            for board, count in zip(*np.unique(events["board"][unknown], return_counts=True)):
                self.strangers.add(f"board {board}", int(count))
            if not self.strangers.has_trigger and trigger.any():
                self.strangers.add("a trigger board", int(trigger.sum()))
        found, self._floor = reply_packets(words, events, chosen, self._floor)
        return found

    def _someone_elses(self, head: np.ndarray) -> bool:
        """Whether a reply is another configured board's: a reply is one board's, and its
        first two words say whose, so it need not be read (nor decoded to count strangers)."""
        trigger = int(head[0]) == packets.TRIGGER_MARKER
        board = -1 if trigger or head.size < 2 else packets.board_id(int(head[1]))
        if trigger == self.wanted.trigger and (trigger or board == self.wanted.board):
            return False
        if self.strangers is None:
            return True
        return self.strangers.has_trigger if trigger else board in self.strangers.digitizers


class BoardStream:
    """One board's packets in recorded order, merged by timestamp across families."""

    def __init__(self, cursors: list[FamilyCursor]) -> None:
        self._cursors = cursors
        self._held: list[Packets] = [Packets.empty() for _ in cursors]
        self._done = [False] * len(cursors)

    def rewind(self) -> None:
        for cursor in self._cursors:
            cursor.rewind()
        self._held = [Packets.empty() for _ in self._cursors]
        self._done = [False] * len(self._cursors)

    def close(self) -> None:
        for cursor in self._cursors:
            cursor.close()

    def next(self) -> Packets | None:
        """The next packets (at least one), or None once every family is read."""
        for index, cursor in enumerate(self._cursors):
            while not self._done[index] and not len(self._held[index]):
                found = cursor.next()
                if found is None:
                    self._done[index] = True
                else:
                    self._held[index] = found
        live = [i for i, held in enumerate(self._held) if len(held)]
        if not live:
            return None
        if len(live) == 1:
            index = live[0]
            found, self._held[index] = self._held[index], Packets.empty()
            return found
        return self._merge(live)

    def _merge(self, live: list[int]) -> Packets:
        """Everything up to the earliest last key of a family still being read, by key."""
        open_keys = [int(self._held[i].keys[-1]) for i in live if not self._done[i]]
        horizon = min(open_keys) if open_keys else np.iinfo(np.int64).max
        parts = []
        for index in live:
            held = self._held[index]
            cut = int(np.searchsorted(held.keys, horizon, side="right"))
            parts.append(held.part(0, cut))
            self._held[index] = held.part(cut, len(held))
        merged = Packets.concat(parts)
        return merged.take(np.argsort(merged.keys, kind="stable"))


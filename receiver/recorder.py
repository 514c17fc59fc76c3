"""What one IOC connection of `dgs-receiver` does with a reply: its GEB records.

A reply's words are decoded and all its records built at once (`receiver.geb`),
trigger packets filed under their board (`TriggerIdentity`); the batch is
appended to the run's files all or nothing (`receiver.files`) and handed to
the online merger, if any (`receiver.merge`). A board's files close after its
end-of-run (0xD) header. Words that decode as nothing known go to the run's
unknown-data file. The counts the status line and the end-of-run summary show
are kept here too; the connection itself (`receiver.puller`) only asks,
reconnects and acknowledges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from ioc import packets, protocol
from ioc.decoder import KIND_TRIGGER, KIND_TYPE_F
from ioc.hardware import WORD
from receiver import geb
from receiver.client import HEADER, INSUFF_DATA, ReplyHeader
from receiver.files import ChunkFile, Layout, Mark, RunDirectory, Stream
from receiver.merge import Merger

GROUPING = {
    Layout.CLASSIC: geb.GROUP_CHANNEL,
    Layout.BOARD: geb.GROUP_BOARD,
    Layout.SINGLE: geb.GROUP_NONE,
    Layout.MERGED: geb.GROUP_NONE,
    Layout.NONE: geb.GROUP_NONE,
}
#: Layouts whose records go only through the merger (`receiver.merge`), not to per-board files.
MERGER_ONLY = (Layout.MERGED, Layout.NONE)
UNKNOWN_TRIGGER_BOARD = 0


class WriteFailed(Exception):
    """Writing the run's files failed; what the reply wrote was taken back."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path = path
        self.error = error


@dataclass
class ChannelSummary:
    records: int = 0
    nbytes: int = 0
    first_timestamp: int = -1
    last_timestamp: int = -1


@dataclass
class Counters:
    """What one connection has done (the link's state and the records it wrote);
    read by the status display from another thread."""

    replies: int = 0
    data_replies: int = 0
    payload_bytes: int = 0
    records: int = 0  # GEB records written, type-F headers included
    events: int = 0  # digitizer and trigger events among them
    errors: int = 0
    unknown_spans: int = 0
    reconnects: int = 0
    state: str = "connecting"
    boards_seen: set[int] = field(default_factory=set)
    boards_done: set[int] = field(default_factory=set)
    channels: dict[tuple[int, int], ChannelSummary] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    #: Wall-clock time (epoch seconds) when the last board's 0xD was written.
    completed_at: float | None = None
    #: v2: the IOC reported the run complete (every byte delivered and acknowledged).
    complete: bool = False

    @property
    def all_done(self) -> bool:
        return bool(self.boards_seen) and self.boards_seen <= self.boards_done


class TriggerIdentity:
    """What a connection knows about its crate's trigger board (see `receiver.cli`).

    ``ids`` are trigger package data: the crate's own from its PV snapshot
    (``crate_ids``) and any given with ``--trigger-board``; ``slots`` the
    trigger slots the snapshot shows. Trigger packets get ``board``: the
    crate's own id, else the only id known, until a type-F header names it.
    """

    def __init__(self, crate_ids: set[int], slots: set[int], given: Collection[int] = ()):
        self.ids = set(crate_ids) | set(given)
        self.slots = set(slots)
        own = crate_ids if len(crate_ids) == 1 else self.ids
        self.board = next(iter(own)) if len(own) == 1 else -1

    def learn(self, type_f: np.ndarray) -> None:
        """Type-F headers from a trigger slot or with a trigger id name the board."""
        if type_f.size == 0 or not (self.slots or self.ids):
            return
        mine = np.isin(type_f["slot"], list(self.slots)) | np.isin(type_f["board"], list(self.ids))
        if mine.any():
            board = int(type_f["board"][np.flatnonzero(mine)[0]])
            self.ids.add(board)
            self.board = board


class Recorder:
    """One connection's replies into GEB records: decode, batch, write, count."""

    def __init__(
        self,
        index: int,
        label: str,
        run: RunDirectory,
        types: geb.GebTypes,
        trigger: TriggerIdentity,
        counters: Counters,
        merger: Merger | None = None,
        crate: int | None = None,
    ) -> None:
        self.index = index
        self.label = label
        self.run_dir = run
        self.grouping = GROUPING[run.layout]
        self.types = types
        self.trigger = trigger
        self.counters = counters
        #: Online merge and event building, shared by every connection (None: files only).
        self.merger = merger
        #: The crate, for the merger: as given with ``--crate``, else as the v2 IOC says
        #: once greeted (`receiver.puller`); None while unknown.
        self.crate = crate
        self.raw: ChunkFile | None = None
        self._warned_trigger = False
        #: One reply's records are built here and written before the next reply is read:
        #: a separate writer thread measured twice the CPU per reply (GIL hand-offs).
        self.scratch = geb.Scratch()

    def save_replies(self) -> None:
        """Keep every data reply as it came (``--save-raw``), for replay."""
        self.raw = ChunkFile(self.run_dir.path / f"{self.run_dir.run_name}.replies_{self.index}")

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()

    def process_reply(
        self, header: ReplyHeader | protocol.V2Header, payload: memoryview
    ) -> dict[str, int]:
        """Account, decode and write one reply's records (in arrival order); returns the
        sizes of the files it wrote (for the journal). The caller counts the reply."""
        counters = self.counters
        if header.type == INSUFF_DATA:
            return {}
        counters.data_replies += 1
        counters.payload_bytes += len(payload)
        if self.raw is not None:
            self._guarded(self.raw.path, self.raw.write,
                          memoryview(HEADER.pack(header.type, len(payload), 0, 1)), 0)
            self._guarded(self.raw.path, self.raw.write, payload, 1)
        words = np.frombuffer(payload, dtype=WORD)
        decoded = geb.decode_reply(words)
        if decoded.unknown:
            self._unknown(payload, decoded.unknown)
        if decoded.events.size:
            return self._records(words, decoded.events)
        return {}

    def _guarded(self, path: object, write: Callable[..., None], *args: object) -> None:
        try:
            write(*args)
        except OSError as error:
            raise WriteFailed(str(path), error) from error

    def _unknown(self, payload: memoryview, spans: list[tuple[int, int]]) -> None:
        for offset, nwords in spans:
            self._guarded(
                self.run_dir.unknown.path, self.run_dir.unknown.add,
                self.label, self.index, self.counters.replies, offset * 4,
                bytes(payload[offset * 4 : (offset + nwords) * 4]),
            )
        self.counters.unknown_spans += len(spans)
        self.counters.errors += len(spans)

    def _records(self, words: np.ndarray, events: np.ndarray) -> dict[str, int]:
        counters = self.counters
        kinds = events["kind"]
        type_f = kinds == KIND_TYPE_F
        trigger_packets = kinds == KIND_TRIGGER
        any_type_f, any_trigger = bool(type_f.any()), bool(trigger_packets.any())
        if any_type_f:
            self.trigger.learn(events[type_f])
        if any_trigger and self.trigger.board < 0 and not self._warned_trigger:
            self._warned_trigger = True
            counters.errors += 1
            counters.messages.append(
                "trigger board unknown (no PV snapshot, --trigger-board or trigger type-F yet):"
                f" its packets are filed as board {UNKNOWN_TRIGGER_BOARD} until known"
            )
        trigger_board = self.trigger.board if self.trigger.board >= 0 else UNKNOWN_TRIGGER_BOARD
        batch = geb.make_batch(
            words, events, trigger_board=trigger_board, trigger_boards=self.trigger.ids,
            grouping=self.grouping, types=self.types, scratch=self.scratch,
        )
        ends: list[int] = []
        if any_type_f:
            end_of_run = type_f & (events["channel"] == packets.CH_END_OF_RUN)
            ends = [int(board) for board in events["board"][end_of_run].tolist()]
        sizes = self._write(batch, ends)
        counters.records += len(batch)
        counters.events += len(batch) - int(np.count_nonzero(type_f))
        if any_trigger and self.trigger.board >= 0:
            counters.boards_seen.add(self.trigger.board)
        boards = events["board"][~trigger_packets] if any_trigger else events["board"]
        if boards.size:
            first = int(boards[0])
            if (boards == first).all():
                counters.boards_seen.add(first)
            else:
                counters.boards_seen.update(int(b) for b in np.unique(boards))
        for board in ends:
            self._end_of_run(board)
        if ends and counters.completed_at is None and counters.all_done:
            counters.completed_at = time.time()
        return sizes

    def _write(self, batch: geb.Batch, ends: list[int]) -> dict[str, int]:
        """Append the records to their files, all or nothing; a board's files close after
        its 0xD; then hand them to the merger, if any. Returns the size of every file
        written (none when the merger holds them: see `receiver.merge` on acknowledging)."""
        run = self.run_dir
        written: list[tuple[Stream, Mark]] = []
        groups = [] if run.layout in MERGER_ONLY else batch.groups
        try:
            for group in groups:
                stream = run.stream(run.key_for(group.board, group.channel, group.trigger))
                mark = stream.write(batch.data, batch.bounds[group.first : group.stop + 1])
                written.append((stream, mark))
        except OSError as error:
            for done, mark in reversed(written):
                done.undo(mark)
            raise WriteFailed(error.filename or str(run.path), error) from error
        sizes: dict[str, int] = {}
        for done, _ in written:
            for chunk in done.retired:
                sizes[chunk.name] = chunk.nbytes
            if done.current is not None:
                sizes[done.current.name] = done.current.nbytes
            done.settle()
        self.summarise(batch.stats)
        for board in ends:
            run.close_board(board)
        if self.merger is not None:
            try:
                self.merger.add(self.index, batch, ends, self.crate)
            except OSError as error:
                raise WriteFailed(error.filename or str(run.path), error) from error
        return sizes

    def summarise(self, stats: geb.ChannelStats) -> None:
        """Add a written batch's per-channel sums to the end-of-run summary."""
        channels = self.counters.channels
        for board, channel, records, nbytes, first, last in zip(
            stats.board.tolist(), stats.channel.tolist(), stats.records.tolist(),
            stats.nbytes.tolist(), stats.first_timestamp.tolist(), stats.last_timestamp.tolist(),
            strict=True,
        ):
            entry = channels.get((board, channel))
            if entry is None:
                entry = channels[(board, channel)] = ChannelSummary(first_timestamp=first)
            entry.records += records
            entry.nbytes += nbytes
            entry.last_timestamp = last

    def _end_of_run(self, board: int) -> None:
        """The board's 0xD: its files close once this reply's records are written."""
        counters = self.counters
        if board in counters.boards_done:
            counters.errors += 1
            counters.messages.append(f"board {board}: a second end-of-run (0xD) header")
        counters.boards_done.add(board)

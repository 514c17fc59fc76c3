"""One IOC connection of `dgs-receiver`: pull, decode, build GEB records, write them.

Version 2 (the default) names the run it wants in its hello and writes only
that run's data. Each reply's records are written atomically (a write error
takes back what the reply had written, `receiver.files`), then recorded in
the journal (`receiver.journal`), then acknowledged: the IOC keeps everything
not acknowledged for whoever connects next, so a write error or a kill loses
nothing. The puller exits when the IOC reports the run complete (every byte
delivered and acknowledged). With ``--protocol classic`` it speaks the
original protocol and exits, like the classic receiver, once every board it
saw sent its end-of-run header.

A lost link is re-established within the connect timeout; a run whose boards
are all done is never reconnected to.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from ioc import packets, protocol
from ioc.decoder import KIND_TRIGGER, KIND_TYPE_F
from ioc.hardware import WORD
from receiver import geb, journal
from receiver.client import (
    HEADER,
    INSUFF_DATA,
    MAX_REPLY_BYTES,
    RETRY_S,
    DataConnection,
    ProtocolError,
    Refused,
    ReplyHeader,
    SenderOff,
    V2Connection,
)
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
#: A reply is expected at least every idle wait (20 ms); this long without one is a dead link.
READ_TIMEOUT_S = 10.0
UNKNOWN_TRIGGER_BOARD = 0


class WriteFailed(Exception):
    """Writing the run's files failed; what the reply wrote was taken back."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path = path
        self.error = error


class RunGone(ConnectionError):
    """The IOC no longer holds the run this receiver is taking (a new run superseded it)."""


@dataclass
class ChannelSummary:
    records: int = 0
    nbytes: int = 0
    first_timestamp: int = -1
    last_timestamp: int = -1


@dataclass
class Counters:
    """What one connection has done; read by the status display from another thread."""

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


@dataclass
class Stream2:
    """Where this receiver stands in the IOC's v2 stream of the run."""

    run: int = protocol.NO_RUN
    run_start_ns: int = 0
    crate: int = -1
    first_offset: int | None = None
    #: Everything below this stream offset is in this receiver's files.
    stored: int = 0
    gaps: int = 0
    recovered: list[str] = field(default_factory=list)


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


class Puller(threading.Thread):
    """One IOC connection: pull, decode, build records, write."""

    def __init__(
        self,
        index: int,
        address: tuple[str, int],
        crate: str | None,
        run: RunDirectory,
        args: argparse.Namespace,
        trigger: TriggerIdentity,
        stop: threading.Event,
        write_failed: threading.Event | None = None,
        merger: Merger | None = None,
    ) -> None:
        super().__init__(name=f"puller-{index}", daemon=True)
        self.index = index
        self.address = address
        self.crate = crate
        self.label = f"{address[0]}:{address[1]}" + (f" (crate {crate})" if crate else "")
        self.run_dir = run
        self.args = args
        self.grouping = GROUPING[run.layout]
        self.types = geb.GebTypes(args.geb_type_digitizer, args.geb_type_trigger)
        self.trigger = trigger
        self.stop_event = stop
        #: Set by whichever puller could not write: every puller stops acknowledging.
        self.write_failed = write_failed or threading.Event()
        #: Online merge and event building, shared by every puller (None: files only).
        self.merger = merger
        self.counters = Counters()
        self.stream = Stream2()
        self.failed: str | None = None
        self.failure: Exception | None = None
        self.write_error: WriteFailed | None = None
        #: The connection was down when the puller ended (its IOC most likely gone).
        self.link_down_at_end = False
        self.started_at = time.monotonic()
        self.raw: ChunkFile | None = None
        self.journal: journal.Journal | None = None
        self._warned_trigger = False
        self._said: set[str] = set()
        #: One reply's records are built here and written before the next reply is read:
        #: a separate writer thread measured twice the CPU per reply (GIL hand-offs).
        self.scratch = geb.Scratch()

    @property
    def v2(self) -> bool:
        return getattr(self.args, "protocol", "v2") == "v2"

    @property
    def finished(self) -> bool:
        """This IOC has nothing more for this receiver."""
        return self.counters.complete if self.v2 else self.counters.all_done

    # ----------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            if self.args.save_raw:
                self.raw = ChunkFile(
                    self.run_dir.path / f"{self.run_dir.run_name}.replies_{self.index}"
                )
            if self.v2:
                self._pull_v2()
            else:
                self._pull()
        except WriteFailed as failure:
            self.write_error = self.failure = failure
            self.failed = f"{self.label}: {failure}"
            self.write_failed.set()
        except (ConnectionError, TimeoutError, ProtocolError) as error:
            self.failure = error
            self.failed = f"{self.label}: {error}"
        except OSError as error:
            self.failed = f"{self.label}: cannot write: {error}"
        except Exception as error:  # reported, never a silent dead thread
            self.failed = f"{self.label}: internal error {error!r}"
        finally:
            if self.raw is not None:
                self.raw.close()
            if self.journal is not None:
                self.journal.close(self.stream.stored)
            self.link_down_at_end = self.counters.state in ("connecting", "reconnecting")
            if self.failed:
                self.counters.state = "failed"
            elif self.finished:
                self.counters.state = "done"
            else:
                self.counters.state = "stopped"

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.counters.messages.append(message)

    def _stopping(self) -> bool:
        return self.stop_event.is_set() or self.write_failed.is_set()

    # --------------------------------------------------------------- classic

    def _connect(self) -> DataConnection | None:
        """Connect within the connect timeout; None if asked to stop meanwhile."""
        deadline = time.monotonic() + self.args.connect_timeout
        while not self._stopping():
            try:
                return DataConnection.connect(
                    *self.address,
                    timeout=min(1.0, max(0.05, deadline - time.monotonic())),
                    read_timeout=READ_TIMEOUT_S,
                    max_reply_bytes=MAX_REPLY_BYTES,
                )
            except OSError as error:
                self._not_yet(error, deadline)
        return None

    def _not_yet(self, error: OSError, deadline: float) -> None:
        """No connection yet (receivers may start before the IOC listens): wait a little,
        or give up once the connect timeout has passed."""
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"no connection within {self.args.connect_timeout:g} s ({error})"
            ) from None
        self.stop_event.wait(0.05)

    def _pull(self) -> None:
        """Pull until done or stopped; a lost link is re-established within the timeout."""
        while True:
            conn = self._connect()
            if conn is None:
                return
            self.counters.state = "receiving"
            try:
                self._session(conn)
                return
            except SenderOff as busy:
                self._say_once("busy", f"{busy}; retrying")
                self.counters.state = "waiting"
                self.stop_event.wait(RETRY_S)
            except (ConnectionError, TimeoutError, ProtocolError) as error:
                if self.counters.all_done:
                    return  # every board sent its end-of-run header: nothing left to take
                self.counters.errors += 1
                self.counters.reconnects += 1
                self.counters.messages.append(f"link lost ({error}); reconnecting")
                self.counters.state = "reconnecting"
            finally:
                conn.close()

    def _session(self, conn: DataConnection) -> None:
        """Pull until done or stopped, then read every reply still owed."""
        conn.request(self.args.pipeline)
        stopping = False
        while conn.outstanding:
            header, payload = conn.read_reply()
            if self.write_failed.is_set():
                return  # nothing more is written (classic data in flight are lost)
            self.process_reply(header, payload)
            if not stopping:
                stopping = self.counters.all_done or self._stopping()
                if not stopping:
                    conn.request(1)

    # -------------------------------------------------------------- version 2

    def _pull_v2(self) -> None:
        """Hello, pull and acknowledge until the run is complete or we are stopped."""
        deadline = time.monotonic() + self.args.connect_timeout
        while not self._stopping():
            try:
                conn = self._open_v2(deadline)
            except Refused as refused:
                self._refused(refused, deadline)
                continue
            if conn is None:
                continue
            if self._over_already(conn):
                conn.close()
                if time.monotonic() + RETRY_S >= deadline:
                    raise ConnectionError(f"no new run within {self.args.connect_timeout:g} s")
                self._say_once("complete", f"run {conn.info.run} is complete; waiting for the next")
                self.stop_event.wait(RETRY_S)
                continue
            self.counters.state = "receiving"
            try:
                self._greeted(conn)
                self._session_v2(conn)
                if self.finished or self._stopping():
                    return
            except Refused as refused:
                if refused.reason is protocol.Refusal.WRONG_RUN:
                    raise RunGone(
                        f"the IOC moved on from run {self.stream.run}: {refused}; what it had "
                        "not delivered of that run was dropped (counted as superseded)"
                    ) from None
                raise ConnectionError(f"refused: {refused}") from None
            except (ConnectionError, TimeoutError, ProtocolError) as error:
                self.counters.errors += 1
                self.counters.reconnects += 1
                self.counters.messages.append(f"link lost ({error}); reconnecting")
                self.counters.state = "reconnecting"
                deadline = time.monotonic() + self.args.connect_timeout
            finally:
                conn.close()

    def _hello(self) -> protocol.Hello:
        wanted = self.args.run if self.args.run is not None else protocol.NO_RUN
        if self.stream.run != protocol.NO_RUN:
            wanted = self.stream.run
        description = journal.describe(self._journal_path())
        return protocol.Hello(wanted, self.stream.run_start_ns, description=description)

    def _open_v2(self, deadline: float) -> V2Connection | None:
        try:
            return V2Connection.open(
                *self.address, self._hello(),
                timeout=min(1.0, max(0.05, deadline - time.monotonic())),
                read_timeout=READ_TIMEOUT_S, max_reply_bytes=MAX_REPLY_BYTES,
            )
        except (ConnectionRefusedError, ConnectionResetError, TimeoutError) as error:
            self._not_yet(error, deadline)
            return None

    def _refused(self, refused: Refused, deadline: float) -> None:
        """Come back later (busy, or the run is not there yet), or give up."""
        if not refused.reason.retry:
            raise ConnectionError(f"refused: {refused}")
        if refused.reason is protocol.Refusal.WRONG_RUN and self.stream.run_start_ns:
            raise RunGone(
                f"the IOC no longer holds run {self.stream.run} ({refused}); was it restarted?"
            )
        what = "busy" if refused.reason is protocol.Refusal.BUSY else f"run {refused.info.run}"
        self._say_once(what, f"waiting: {refused}")
        self.counters.state = "waiting"
        if time.monotonic() + RETRY_S >= deadline:
            raise ConnectionError(
                f"gave up after {self.args.connect_timeout:g} s: {refused}"
            )
        self.stop_event.wait(RETRY_S)

    def _greeted(self, conn: V2Connection) -> None:
        """Check what the IOC holds, take over after a killed receiver, open the journal."""
        info, stream = conn.info, self.stream
        if self.crate is not None and info.crate != int(self.crate):
            raise ConnectionError(f"this is crate {info.crate:02d}, not crate {self.crate}")
        if stream.run == protocol.NO_RUN:
            stream.run, stream.run_start_ns, stream.crate = info.run, info.run_start_ns, info.crate
            stream.stored = conn.resume
            stream.first_offset = conn.resume
            self.counters.messages.append(
                f"receiving run {info.run} of crate {info.crate:02d} (v2), from byte {conn.resume}"
            )
        if conn.previous and self._takes_over(conn.previous):
            try:
                recovery = journal.recover(conn.previous, conn.resume)
            except journal.RecoveryError as error:
                self.counters.messages.append(
                    f"taking over from another receiver whose files could not be checked "
                    f"({error}): records it wrote after its last acknowledgement may also be here"
                )
            else:
                stream.recovered.append(recovery.summary())
                self.counters.messages.append(recovery.summary())
        if self.journal is None:
            self.journal = journal.Journal(self._journal_path(), {
                "run": self.run_dir.run_name, "files": self.run_dir.stem_prefix,
                "address": f"{self.address[0]}:{self.address[1]}", "crate": info.crate,
                "run_number": info.run, "run_start_ns": info.run_start_ns,
                "resume": conn.resume,
            })
        if info.complete:
            self.counters.complete = True

    def _over_already(self, conn: V2Connection) -> bool:
        """A receiver for whatever run comes next finds a finished one: not its run."""
        return (
            self.args.run is None and self.stream.run == protocol.NO_RUN and conn.info.complete
        )

    def _takes_over(self, previous: str) -> bool:
        return str(self._journal_path().absolute()) not in previous

    def _journal_path(self):
        return journal.journal_path(self.run_dir.path, self.run_dir.run_name, self.index)

    def _session_v2(self, conn: V2Connection) -> None:
        """Ask, write, acknowledge; then read the replies still owed and acknowledge them."""
        stream = self.stream
        ack = conn.resume
        if self.counters.complete:
            return
        conn.request(self.args.pipeline, ack)
        stopping = False
        while conn.outstanding:
            header, payload = conn.read_reply()
            if self.write_failed.is_set():
                return  # acknowledge nothing more: the IOC keeps it for the next receiver
            self.counters.replies += 1
            if header.type == INSUFF_DATA:
                if header.status & protocol.COMPLETE:
                    self.counters.complete = True
            else:
                if header.run != stream.run:
                    raise ProtocolError(f"data of run {header.run} while taking run {stream.run}")
                ack = self._take(header, payload)
            stopping = stopping or self.counters.complete or self._stopping()
            conn.request(0 if stopping else 1, ack)

    def _take(self, header: protocol.V2Header, payload: memoryview) -> int:
        """Write a data reply unless we hold it already; returns the offset to acknowledge."""
        stream = self.stream
        end = header.offset + header.length
        if end <= stream.stored:
            return end  # sent again after a reconnect: already in our files
        skip = max(0, stream.stored - header.offset)
        if header.offset > stream.stored:
            stream.gaps += 1
            self.counters.messages.append(
                f"bytes {stream.stored}..{header.offset} of the run went to another receiver"
            )
        sizes = self.process_reply(header, payload[skip:], classic=False)
        stream.stored = end
        if self.journal is not None:
            self.journal.record(end, sizes)
        return end

    # ------------------------------------------------------------ a reply

    def process_reply(self, header: ReplyHeader | protocol.V2Header, payload: memoryview,
                      classic: bool = True) -> dict[str, int]:
        """Account, decode and write one reply's records (in arrival order); returns the
        sizes of the files it wrote (for the journal)."""
        counters = self.counters
        if classic:
            counters.replies += 1
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

    def _guarded(self, path, write, *args) -> None:
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
                self.merger.add(self.index, batch, ends, self._crate_number())
            except OSError as error:
                raise WriteFailed(error.filename or str(run.path), error) from error
        return sizes

    def _crate_number(self) -> int | None:
        """This connection's crate: as given with ``--crate``, else as the v2 IOC says."""
        if self.crate is not None:
            return int(self.crate)
        return self.stream.crate if self.stream.crate >= 0 else None

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

"""`dgs-receiver`: pull from one or many crate IOCs and write GEB run files (spec 04, 05).

One thread per IOC connection keeps ``--pipeline`` requests in flight like the
classic receiver, decodes each reply with numpy, builds all its GEB records at
once (`receiver.geb`) and appends them to the run's files (`receiver.files`).
Boards are unique system-wide, so threads of different IOCs never write the
same file (in the single-file layout they share it under a lock).

The run ends when every board seen has sent its 0xD header (exit 0), or on
Ctrl-C / SIGTERM / ``--max-seconds`` (exit 1): the threads stop asking, read
the replies still owed, and every file is closed, renamed and made read-only
either way. An existing run is refused before anything is touched (exit 2); an
IOC that cannot be reached within ``--connect-timeout`` gives exit 3.

Trigger boards: trigger packets carry no board id. Records of a trigger board
(its packets and its type-F headers) get GEB type 15 and the trigger's real
package data, known from, first to last: the crate's begin-of-run PV snapshot
(the upper-case ``USER_PACKAGE_DATA`` records over PVA; the ``BoardType``
records name the trigger's slot over CA or PVA), ``--trigger-board ID``, or a
type-F header arriving from the trigger's slot. Until any of these is known, a
connection's trigger packets are filed as board 0 and counted as an error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from ioc import packets
from ioc.decoder import KIND_TRIGGER, KIND_TYPE_F
from ioc.hardware import WORD
from receiver import geb, snapshot
from receiver.client import (
    HEADER,
    INSUFF_DATA,
    MAX_REPLY_BYTES,
    DataConnection,
    ProtocolError,
    ReplyHeader,
)
from receiver.files import (
    DEFAULT_CHUNK_BYTES,
    ChunkFile,
    Layout,
    Rotation,
    RunDirectory,
    RunExistsError,
)

EXIT_DONE = 0
EXIT_INTERRUPTED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

GROUPING = {
    Layout.CLASSIC: geb.GROUP_CHANNEL,
    Layout.BOARD: geb.GROUP_BOARD,
    Layout.SINGLE: geb.GROUP_NONE,
}
#: A reply is expected at least every idle wait (20 ms); this long without one is a dead link.
READ_TIMEOUT_S = 10.0
UNKNOWN_TRIGGER_BOARD = 0


# ------------------------------------------------------------------ options


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _crate_id(text: str) -> str:
    if not text.isdigit() or len(text) > 2:
        raise argparse.ArgumentTypeError(f"crate must be NN (two digits), not {text!r}")
    return text.zfill(2)


def _positive(kind: type):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgs-receiver",
        description="Pull data from crate IOCs and write GEB run files.",
    )
    p.add_argument("addresses", nargs="+", metavar="HOST:PORT", type=parse_address,
                   help="data servers of the crate IOCs")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for runs (default .)")
    name = p.add_mutually_exclusive_group(required=True)
    name.add_argument("--run-name", help="run name (directory and file prefix)")
    name.add_argument("--run", type=int, help="run number: the run name is run%%05d")
    p.add_argument("--ext", default="gtd", help="file tag (default gtd)")
    p.add_argument("--layout", choices=[layout.value for layout in Layout], default="classic",
                   help="files per board and channel (classic), per board, or one (single)")
    p.add_argument("--chunk-bytes", type=_positive(int), default=DEFAULT_CHUNK_BYTES,
                   help="start a new chunk before a file exceeds this size")
    p.add_argument("--chunk-seconds", type=_positive(float),
                   help="also start a new chunk when a file is this old")
    p.add_argument("--chunk-events", type=_positive(int),
                   help="also start a new chunk when a file holds this many records")
    p.add_argument("--pipeline", type=_positive(int), default=6, help="requests in flight")
    p.add_argument("--connect-timeout", type=_positive(float), default=60.0,
                   help="seconds to wait for an IOC (at start and after a lost link)")
    p.add_argument("--max-seconds", type=_positive(float), help="stop after this long (exit 1)")
    p.add_argument("--pv-ca", action="append", default=[], metavar="HOST:PORT",
                   type=parse_address,
                   help="CA server of each crate (PV snapshot; crate-wide records)")
    p.add_argument("--pv-pva", action="append", default=[], metavar="HOST:PORT",
                   type=parse_address,
                   help="PVA server of each crate (PV snapshot, preferred: every record)")
    p.add_argument("--crate", action="append", default=[], metavar="NN", type=_crate_id,
                   help="crate id of each HOST:PORT, same order")
    p.add_argument("--trigger-board", action="append", default=[], type=int, metavar="ID",
                   help="package data of a master-trigger board")
    p.add_argument("--geb-type-digitizer", type=int, default=geb.GEB_TYPE_DIGITIZER,
                   help="GEB header type of digitizer records (default 14)")
    p.add_argument("--geb-type-trigger", type=int, default=geb.GEB_TYPE_TRIGGER,
                   help="GEB header type of trigger-board records (default 15)")
    p.add_argument("--save-raw", action="store_true",
                   help="also keep every data reply as received (<run>.replies_<n>)")
    p.add_argument("--status", choices=("plain", "tty", "auto"), default="auto",
                   help="progress display (tty) or plain lines (default: tty on a terminal)")
    p.add_argument("--status-interval", type=_positive(float),
                   help="seconds between status updates (default 1 tty, 5 plain)")
    return p


def _check(args: argparse.Namespace) -> str | None:
    """Cross-option problems argparse cannot see, as one message."""
    count = len(args.addresses)
    for option, values in (("--crate", args.crate), ("--pv-ca", args.pv_ca),
                           ("--pv-pva", args.pv_pva)):
        if values and len(values) != count:
            return f"give {option} once per HOST:PORT ({count}), not {len(values)} times"
    if (args.pv_ca or args.pv_pva) and not args.crate:
        return "a PV snapshot needs --crate NN for each HOST:PORT"
    if len(set(args.addresses)) != count:
        return "the same HOST:PORT is given twice"
    if args.run is not None and args.run < 0:
        return "--run must be >= 0"
    return None


# ------------------------------------------------------------- bookkeeping


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

    @property
    def all_done(self) -> bool:
        return bool(self.boards_seen) and self.boards_seen <= self.boards_done


class TriggerIdentity:
    """What a connection knows about its crate's trigger board (see the module text).

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
    ) -> None:
        super().__init__(name=f"puller-{index}", daemon=True)
        self.index = index
        self.address = address
        self.label = f"{address[0]}:{address[1]}" + (f" (crate {crate})" if crate else "")
        self.run_dir = run
        self.args = args
        self.grouping = GROUPING[run.layout]
        self.types = geb.GebTypes(args.geb_type_digitizer, args.geb_type_trigger)
        self.trigger = trigger
        self.stop_event = stop
        self.counters = Counters()
        self.failed: str | None = None
        self.started_at = time.monotonic()
        self.raw: ChunkFile | None = None
        self._warned_trigger = False
        #: One reply's records are built here and written before the next reply is read:
        #: a separate writer thread measured twice the CPU per reply (GIL hand-offs).
        self.scratch = geb.Scratch()

    # ----------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            if self.args.save_raw:
                self.raw = ChunkFile(
                    self.run_dir.path / f"{self.run_dir.run_name}.replies_{self.index}"
                )
            self._pull()
        except (ConnectionError, TimeoutError, ProtocolError) as error:
            self.failed = f"{self.label}: {error}"
        except OSError as error:
            self.failed = f"{self.label}: cannot write: {error}"
        except Exception as error:  # reported, never a silent dead thread
            self.failed = f"{self.label}: internal error {error!r}"
        finally:
            if self.raw is not None:
                self.raw.close()
            if self.failed:
                self.counters.state = "failed"
            elif self.counters.all_done:
                self.counters.state = "done"
            else:
                self.counters.state = "stopped"

    def _connect(self) -> DataConnection | None:
        """Connect within the connect timeout; None if asked to stop meanwhile."""
        deadline = time.monotonic() + self.args.connect_timeout
        while not self.stop_event.is_set():
            try:
                return DataConnection.connect(
                    *self.address,
                    timeout=min(1.0, max(0.05, deadline - time.monotonic())),
                    read_timeout=READ_TIMEOUT_S,
                    max_reply_bytes=MAX_REPLY_BYTES,
                )
            except OSError as error:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"no connection within {self.args.connect_timeout:g} s ({error})"
                    ) from None
                self.stop_event.wait(0.05)
        return None

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
            except (ConnectionError, TimeoutError, ProtocolError) as error:
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
            self.process_reply(header, payload)
            if not stopping:
                stopping = self.counters.all_done or self.stop_event.is_set()
                if not stopping:
                    conn.request(1)

    # ------------------------------------------------------------ a reply

    def process_reply(self, header: ReplyHeader, payload: memoryview) -> None:
        """Account, decode and write one reply's records (in arrival order)."""
        counters = self.counters
        counters.replies += 1
        if header.type == INSUFF_DATA:
            return
        counters.data_replies += 1
        counters.payload_bytes += header.length
        if self.raw is not None:
            self.raw.write(memoryview(HEADER.pack(*header)), 0)
            self.raw.write(payload, 1)
        words = np.frombuffer(payload, dtype=WORD)
        decoded = geb.decode_reply(words)
        if decoded.unknown:
            self._unknown(payload, decoded.unknown)
        if decoded.events.size:
            self._records(words, decoded.events)

    def _unknown(self, payload: memoryview, spans: list[tuple[int, int]]) -> None:
        for offset, nwords in spans:
            self.run_dir.unknown.add(
                self.label, self.index, self.counters.replies, offset * 4,
                bytes(payload[offset * 4 : (offset + nwords) * 4]),
            )
        self.counters.unknown_spans += len(spans)
        self.counters.errors += len(spans)

    def _records(self, words: np.ndarray, events: np.ndarray) -> None:
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
        ends: list[int] = []
        if any_type_f:
            end_of_run = type_f & (events["channel"] == packets.CH_END_OF_RUN)
            ends = [int(board) for board in events["board"][end_of_run].tolist()]
            for board in ends:
                self._end_of_run(board)
        self._write(batch, ends)
        if ends and counters.completed_at is None and counters.all_done:
            counters.completed_at = time.time()

    def _write(self, batch: geb.Batch, ends: list[int]) -> None:
        """Append the records to their files; a board's files close after its 0xD."""
        run = self.run_dir
        for group in batch.groups:
            key = run.key_for(group.board, group.channel, group.trigger)
            run.write(key, batch.data, batch.bounds[group.first : group.stop + 1])
        self.summarise(batch.stats)
        for board in ends:
            run.close_board(board)

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


# ------------------------------------------------------------------ status


class Status:
    """A live line per IOC: redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, pullers: Sequence[Puller], mode: str, interval: float | None,
                 out: TextIO) -> None:
        self.pullers = pullers
        self.out = out
        self.tty = mode == "tty" or (mode == "auto" and out.isatty())
        self.interval = interval or (1.0 if self.tty else 5.0)
        self.drawn = 0
        self.shown_messages = [0] * len(pullers)
        now = time.monotonic()
        self.last = now
        self.previous = [(now, 0)] * len(pullers)

    def note(self, text: str) -> None:
        self._clear()
        print(f"dgs-receiver: {text}", file=self.out, flush=True)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def update(self) -> None:
        now = time.monotonic()
        self.last = now
        lines = []
        for i, puller in enumerate(self.pullers):
            c = puller.counters
            messages = c.messages[self.shown_messages[i] :]
            self.shown_messages[i] += len(messages)
            for message in messages:
                self.note(f"{puller.label}: {message}")
            then, then_bytes = self.previous[i]
            rate = (c.payload_bytes - then_bytes) / max(now - then, 1e-9) / 1e6
            self.previous[i] = (now, c.payload_bytes)
            lines.append(
                f"{puller.label} {c.state:<12} {now - puller.started_at:7.1f} s "
                f"{c.payload_bytes / 1e6:10.1f} MB {rate:8.1f} MB/s {c.events:10d} events "
                f"{c.replies:8d} replies {c.errors:4d} errors "
                f"boards {len(c.boards_done)}/{len(c.boards_seen)} done"
            )
        self._clear()
        for line in lines:
            print(line + ("\x1b[K" if self.tty else ""), file=self.out)
        self.out.flush()
        self.drawn = len(lines) if self.tty else 0

    def _clear(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0


# ------------------------------------------------------------------- summary


def summary_document(run: RunDirectory, pullers: Sequence[Puller], code: int,
                     elapsed: float) -> dict:
    """The end-of-run summary: per IOC, per board and channel, and every file written."""
    iocs = []
    for puller in pullers:
        c = puller.counters
        iocs.append({
            "address": f"{puller.address[0]}:{puller.address[1]}",
            "state": c.state,
            "failure": puller.failed,
            "replies": c.replies,
            "data_replies": c.data_replies,
            "payload_bytes": c.payload_bytes,
            "records": c.records,
            "events": c.events,
            "errors": c.errors,
            "unknown_spans": c.unknown_spans,
            "reconnects": c.reconnects,
            "boards_seen": sorted(c.boards_seen),
            "boards_done": sorted(c.boards_done),
            "completed_at": c.completed_at,
            "trigger_board": puller.trigger.board if puller.trigger.board >= 0 else None,
            "messages": c.messages,
            "channels": [
                {
                    "board": board,
                    "channel": "trig" if channel == geb.TRIGGER_CHANNEL else f"{channel:X}",
                    "events": s.records,
                    "bytes": s.nbytes,
                    "first_timestamp": s.first_timestamp,
                    "last_timestamp": s.last_timestamp,
                }
                for (board, channel), s in sorted(c.channels.items())
            ],
        })
    return {
        "run": run.run_name,
        "exit_code": code,
        "seconds": round(elapsed, 3),
        "unknown": {"spans": run.unknown.spans, "bytes": run.unknown.nbytes},
        "iocs": iocs,
        "files": [
            {"name": f.path.name, "bytes": f.nbytes, "records": f.records}
            for f in sorted(run.files, key=lambda f: f.path.name)
        ],
    }


def print_summary(document: dict, out: TextIO) -> None:
    print(f"run {document['run']}: {document['seconds']:.1f} s, "
          f"{len(document['files'])} files, unknown spans {document['unknown']['spans']}",
          file=out)
    print(f"{'board':>6} {'ch':>4} {'events':>10} {'bytes':>14} {'first ts':>16} {'last ts':>16}",
          file=out)
    for ioc in document["iocs"]:
        for row in ioc["channels"]:
            print(
                f"{row['board']:6d} {row['channel']:>4} {row['events']:10d} {row['bytes']:14d} "
                f"{row['first_timestamp']:16d} {row['last_timestamp']:16d}",
                file=out,
            )
    out.flush()


# -------------------------------------------------------------------- main


def _snapshots(run: RunDirectory, args: argparse.Namespace, when: str, out: TextIO) -> list[dict]:
    """Take and save every crate's snapshot (``when`` = begin / end); say so."""
    crates = [
        (
            crate,
            "{}:{}".format(*args.pv_ca[i]) if args.pv_ca else None,
            "{}:{}".format(*args.pv_pva[i]) if args.pv_pva else None,
        )
        for i, crate in enumerate(args.crate)
    ]
    taken = snapshot.take_all(crates)
    path = run.write_json(f"pvs_{when}", {"run": run.run_name, "when": when, "crates": taken})
    problems = [f"crate {s['crate']}: {s['error']}" for s in taken if s["error"]]
    text = f"{when} snapshot of {len(taken)} crate(s) saved in {path.name}" + (
        f" ({'; '.join(problems)})" if problems else ""
    )
    print(f"dgs-receiver: {text}", file=out, flush=True)
    return taken


def run_receiver(args: argparse.Namespace, stop: threading.Event, out: TextIO,
                 err: TextIO) -> int:
    """Everything after the command line is parsed: the run itself."""
    run_name = args.run_name if args.run_name is not None else f"run{args.run:05d}"
    try:
        rotation = Rotation(args.chunk_bytes, args.chunk_seconds, args.chunk_events)
        run = RunDirectory.create(args.out, run_name, args.ext, Layout(args.layout), rotation)
    except (RunExistsError, ValueError) as error:
        print(f"dgs-receiver: refused: {error}", file=err, flush=True)
        return EXIT_USAGE
    except OSError as error:
        print(f"dgs-receiver: cannot create the run directory: {error}", file=err, flush=True)
        return EXIT_USAGE
    began = time.monotonic()
    print(f"dgs-receiver: run {run_name} in {run.path} ({args.layout} layout)", file=out,
          flush=True)
    identities: list[tuple[set[int], set[int]]] = [(set(), set())] * len(args.addresses)
    if args.crate and (args.pv_ca or args.pv_pva):
        taken = _snapshots(run, args, "begin", out)
        identities = [snapshot.trigger_identity(s) for s in taken]
    else:
        print("dgs-receiver: PV snapshot skipped (no --pv-ca/--pv-pva)", file=out, flush=True)
    given = set(args.trigger_board)
    pullers = [
        Puller(
            i, address, args.crate[i] if args.crate else None, run, args,
            TriggerIdentity(identities[i][0], identities[i][1], given), stop,
        )
        for i, address in enumerate(args.addresses)
    ]
    status = Status(pullers, args.status, args.status_interval, out)
    deadline = None if args.max_seconds is None else began + args.max_seconds
    for puller in pullers:
        puller.start()
    try:
        while any(p.is_alive() for p in pullers):
            if deadline is not None and time.monotonic() >= deadline and not stop.is_set():
                status.note(f"--max-seconds {args.max_seconds:g} reached: stopping")
                stop.set()
            if status.due():
                status.update()
            for puller in pullers:
                puller.join(0.05)
    finally:
        stop.set()
        for puller in pullers:
            puller.join()
        status.update()
        run.close()
    for puller in pullers:
        if puller.failed:
            print(f"dgs-receiver: {puller.failed}", file=err, flush=True)
    if any(p.failed for p in pullers):
        code = EXIT_CONNECTION
    elif all(p.counters.all_done for p in pullers):
        code = EXIT_DONE
    else:
        code = EXIT_INTERRUPTED
    if args.crate and (args.pv_ca or args.pv_pva):
        _snapshots(run, args, "end", out)
    document = summary_document(run, pullers, code, time.monotonic() - began)
    run.write_json("summary", document)
    print_summary(document, out)
    return code


def main(argv: list[str] | None = None, *, stop: threading.Event | None = None,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The command. ``stop`` ends the run like Ctrl-C (for callers embedding it)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problem = _check(args)
    if problem:
        parser.print_usage(err)
        print(f"dgs-receiver: error: {problem}", file=err, flush=True)
        return EXIT_USAGE
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        return run_receiver(args, stop, out, err)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())

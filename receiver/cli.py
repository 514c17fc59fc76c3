"""`dgs-receiver`: pull from one or many crate IOCs and write GEB run files (spec 04, 05).

One thread per IOC connection (`receiver.puller`) keeps ``--pipeline`` requests
in flight like the classic receiver; its recorder (`receiver.recorder`) decodes
each reply with numpy, builds all its GEB records at once (`receiver.geb`) and
appends them to the run's files (`receiver.files`). Boards are unique
system-wide, so threads of different IOCs never write the same file (in the
single-file layout they share it under a lock).

With ``--layout merged`` or ``--events`` every puller also hands its records
to one shared merger that writes them in timestamp order and builds
coincidence events (`receiver.online`; what that means for acknowledgement is
said there).

It speaks the acknowledged, run-tagged protocol v2 by default (``--protocol
classic`` for an original IOC): it takes only the run it was started for
(``--run N``), and the IOC keeps whatever it has not acknowledged, so a
second receiver of the same run (another ``--out``) gets exactly the rest.

Exit codes: 0 the run is complete (v2: every byte delivered and acknowledged;
classic: every board seen sent its 0xD header); 1 interrupted (Ctrl-C,
SIGTERM, ``--max-seconds``: the threads stop asking, read the replies still
owed, and every file is closed, renamed and made read-only either way), or the
IOC moved on to another run; 2 refused before anything was touched (an
existing run, bad options); 3 an IOC could not be reached within
``--connect-timeout``; 4 a write failed (a full disk): nothing more was
acknowledged, every file was cut back to its last whole record and closed,
and the summary says where it stopped.

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
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from receiver import geb, online, snapshot
from receiver.files import (
    DEFAULT_CHUNK_BYTES,
    Layout,
    Rotation,
    RunDirectory,
    RunExistsError,
)
from receiver.puller import Puller, RunGone
from receiver.recorder import TriggerIdentity

EXIT_DONE = 0
EXIT_INTERRUPTED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_WRITE = 4


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
                   help="files per board and channel (classic), per board, one in arrival "
                        "order (single), one in timestamp order (merged), none (--events only)")
    p.add_argument("--chunk-bytes", type=_positive(int), default=DEFAULT_CHUNK_BYTES,
                   help="start a new chunk before a file exceeds this size")
    p.add_argument("--chunk-seconds", type=_positive(float),
                   help="also start a new chunk when a file is this old (event files too)")
    p.add_argument("--chunk-events", type=_positive(int),
                   help="also start a new chunk when a file holds this many records "
                        "(an event file: this many events)")
    p.add_argument("--protocol", choices=("v2", "classic"), default="v2",
                   help="acknowledged, run-tagged v2 (default) or classic (an original IOC)")
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
    online.add_options(p, _positive)
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
    return online.check(args)


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
            "protocol": "v2" if puller.v2 else "classic",
            "complete": c.complete,
            "write_error": str(puller.write_error) if puller.write_error else None,
            **({"stream": {
                "run": puller.stream.run,
                "run_start_ns": puller.stream.run_start_ns,
                "crate": puller.stream.crate,
                "first_offset": puller.stream.first_offset,
                "stored": puller.stream.stored,
                "gaps": puller.stream.gaps,
                "recovered": puller.stream.recovered,
            }} if puller.v2 else {}),
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
    if document.get("online"):
        print(online.summary_line(document["online"]), file=out)
    out.flush()


# -------------------------------------------------------------------- main


def _snapshots(run: RunDirectory, args: argparse.Namespace, when: str, out: TextIO,
               unreachable: Sequence[bool] = ()) -> list[dict]:
    """Take and save every crate's snapshot (``when`` = begin / end); say so. Crates
    flagged ``unreachable`` (their data link was down at the end) get a short timeout."""
    crates = [
        (
            crate,
            "{}:{}".format(*args.pv_ca[i]) if args.pv_ca else None,
            "{}:{}".format(*args.pv_pva[i]) if args.pv_pva else None,
            snapshot.UNREACHABLE_TIMEOUT_S if i < len(unreachable) and unreachable[i]
            else snapshot.DEFAULT_TIMEOUT_S,
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
    run.reserve("summary")
    print(f"dgs-receiver: run {run_name} in {run.path} ({args.layout} layout)", file=out,
          flush=True)
    identities: list[tuple[set[int], set[int]]] = [(set(), set())] * len(args.addresses)
    taken: list[dict] = []
    if args.crate and (args.pv_ca or args.pv_pva):
        taken = _snapshots(run, args, "begin", out)
        identities = [snapshot.trigger_identity(s) for s in taken]
    else:
        print("dgs-receiver: PV snapshot skipped (no --pv-ca/--pv-pva)", file=out, flush=True)
    given = set(args.trigger_board)
    write_failed = threading.Event()
    building = online.start(run, args, taken, err)
    if building is False:
        return EXIT_USAGE
    pullers = [
        Puller(
            i, address, args.crate[i] if args.crate else None, run, args,
            TriggerIdentity(identities[i][0], identities[i][1], given), stop, write_failed,
            building.merger if building else None,
        )
        for i, address in enumerate(args.addresses)
    ]
    status = Status(pullers, args.status, args.status_interval, out)
    deadline = None if args.max_seconds is None else began + args.max_seconds
    for puller in pullers:
        puller.start()
    closing_error: OSError | None = None
    try:
        while any(p.is_alive() for p in pullers):
            if deadline is not None and time.monotonic() >= deadline and not stop.is_set():
                status.note(f"--max-seconds {args.max_seconds:g} reached: stopping")
                stop.set()
            if status.due():
                status.update()
            if building and not write_failed.is_set():
                closing_error = online.guard(building.merger.tick, write_failed) or closing_error
            for puller in pullers:
                puller.join(0.05)
    finally:
        stop.set()
        for puller in pullers:
            puller.join()
        status.update()
        if building and not write_failed.is_set():
            closing_error = online.guard(building.finish, write_failed) or closing_error
        try:
            run.close()
        except OSError as error:
            closing_error = error
    code = _exit_code(pullers, closing_error, err)
    end = None
    if args.crate and (args.pv_ca or args.pv_pva) and code != EXIT_WRITE:
        end = _snapshots(run, args, "end", out, [p.link_down_at_end for p in pullers])
    if building:
        ended = online.metadata(run, end, "end")
        closing_error = online.guard(lambda: building.close(ended), write_failed)
        if closing_error is not None:
            code = _exit_code(pullers, closing_error, err)
    document = summary_document(run, pullers, code, time.monotonic() - began)
    if building:
        document["online"] = building.summary()
    _save_summary(run, args.out, document, err)
    print_summary(document, out)
    return code


def _exit_code(pullers: Sequence[Puller], closing_error: OSError | None, err: TextIO) -> int:
    """The exit code, with one line on stderr for what went wrong."""
    write_error = next((p.write_error for p in pullers if p.write_error), None)
    if write_error is not None or closing_error is not None:
        what = str(write_error) if write_error else f"cannot close a file: {closing_error}"
        print(
            f"dgs-receiver: {what}; stopped: every file ends at its last whole record, and "
            "what was not acknowledged stays in the IOC for another receiver of this run",
            file=err, flush=True,
        )
        return EXIT_WRITE
    for puller in pullers:
        if puller.failed:
            print(f"dgs-receiver: {puller.failed}", file=err, flush=True)
    if any(isinstance(p.failure, RunGone) for p in pullers):
        return EXIT_INTERRUPTED
    if any(p.failed for p in pullers):
        return EXIT_CONNECTION
    if all(p.finished for p in pullers):
        return EXIT_DONE
    return EXIT_INTERRUPTED


def _save_summary(run: RunDirectory, out_dir: Path, document: dict, err: TextIO) -> None:
    """The summary goes into the run directory; on a full disk beside it; else to stderr."""
    try:
        run.write_json("summary", document)
        return
    except OSError as error:
        first = error
    beside = out_dir / f"{run.run_name}.summary.json"
    try:
        with open(beside, "x", encoding="utf-8") as file:
            json.dump(document, file, indent=1)
        print(f"dgs-receiver: summary written to {beside} ({first})", file=err, flush=True)
    except OSError:
        print(f"dgs-receiver: summary ({first}):", file=err)
        json.dump(document, err)
        print(file=err, flush=True)


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

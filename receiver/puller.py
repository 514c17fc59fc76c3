"""One IOC connection of `dgs-receiver`: connect, pull, acknowledge, reconnect.

The puller speaks the data protocol; each reply's records go to its recorder
(`receiver.recorder`: decode, GEB records, files, the online merger, counts).

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
from dataclasses import dataclass, field
from pathlib import Path

from ioc import protocol
from receiver import geb, journal
from receiver.client import (
    INSUFF_DATA,
    MAX_REPLY_BYTES,
    RETRY_S,
    DataConnection,
    ProtocolError,
    Refused,
    SenderOff,
    V2Connection,
)
from receiver.files import RunDirectory
from receiver.merge import Merger
from receiver.recorder import Counters, Recorder, TriggerIdentity, WriteFailed

#: A reply is expected at least every idle wait (20 ms); this long without one is a dead link.
READ_TIMEOUT_S = 10.0


class RunGone(ConnectionError):
    """The IOC no longer holds the run this receiver is taking (a new run superseded it)."""


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


class Puller(threading.Thread):
    """One IOC connection: ask, hand each reply to its recorder, acknowledge."""

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
        self.trigger = trigger
        self.stop_event = stop
        #: Set by whichever puller could not write: every puller stops acknowledging.
        self.write_failed = write_failed or threading.Event()
        self.counters = Counters()
        self.recorder = Recorder(
            index, self.label, run, geb.GebTypes(args.geb_type_digitizer, args.geb_type_trigger),
            trigger, self.counters, merger, int(crate) if crate is not None else None,
        )
        #: Bound once: the sessions call it for every reply they take.
        self._record_reply = self.recorder.process_reply
        self.stream = Stream2()
        self.failed: str | None = None
        self.failure: Exception | None = None
        self.write_error: WriteFailed | None = None
        #: The connection was down when the puller ended (its IOC most likely gone).
        self.link_down_at_end = False
        self.started_at = time.monotonic()
        self.journal: journal.Journal | None = None
        self._said: set[str] = set()

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
                self.recorder.save_replies()
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
            self.recorder.close()
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
        counters = self.counters
        conn.request(self.args.pipeline)
        stopping = False
        while conn.outstanding:
            header, payload = conn.read_reply()
            if self.write_failed.is_set():
                return  # nothing more is written (classic data in flight are lost)
            counters.replies += 1
            self._record_reply(header, payload)
            if not stopping:
                stopping = counters.all_done or self._stopping()
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
            self.recorder.crate = info.crate
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

    def _journal_path(self) -> Path:
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
        sizes = self._record_reply(header, payload[skip:])
        stream.stored = end
        if self.journal is not None:
            self.journal.record(end, sizes)
        return end

"""The product's receiver client for the data protocol (spec 05, docs/protocol.md).

Three layers, so the GEB file writer can reuse the lower ones:

- `DataConnection`: one classic TCP connection; 4-byte requests out, 16-byte
  header + exactly ``recLen`` payload bytes in, read into one preallocated
  buffer. `V2Connection`: the same for the acknowledged, run-tagged version 2.
- `decode_payload`: a reply's payload as packets, with `ioc.decoder`.
- `Tally`: what arrived, per board (events, 0xD end-of-run headers) and overall.

`Receiver` ties them together like the classic receiver: it keeps ``pipeline``
requests in flight, and stops when every board it saw has sent its 0xD (or at
a time or reply budget). Stopping is always clean: it stops asking, reads the
replies still owed, then closes, so nothing is lost.

``python -m receiver.client host:port`` prints throughput lines once a second.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ioc import packets, protocol
from ioc.decoder import EVENT_DTYPE, KIND_TRIGGER, KIND_TYPE_F, Decoded, decode
from ioc.hardware import WORD

REQUEST = protocol.CLASSIC_REQUEST
HEADER = protocol.CLASSIC_HEADER
SERVER_SUMMARY = protocol.SERVER_SUMMARY
INSUFF_DATA = protocol.INSUFF_DATA
#: The protocol's largest configurable reply.
MAX_REPLY_BYTES = 10_000_000

CONNECT_RETRY_S = 0.05
#: An IOC answers every request within its idle wait (20 ms); this long means a dead link.
READ_TIMEOUT_S = 30.0
#: After SENDER_OFF or a BUSY / WRONG_RUN refusal, ask again this often.
RETRY_S = 0.2


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""


class SenderOff(ConnectionError):
    """Classic SENDER_OFF: the IOC serves another receiver now; connect again later."""


class Refused(ConnectionError):
    """A v2 refusal: why, what the IOC holds, and its message."""

    def __init__(self, reason: protocol.Refusal, info: protocol.RunInfo, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.info = info


class ReplyHeader(NamedTuple):
    type: int
    length: int
    status: int
    recs: int


# --------------------------------------------------------------- protocol


class DataConnection:
    """One connection to a crate's data port.

    The payload returned by `read_reply` is a view into a buffer reused by the
    next read: decode or copy it before reading again.
    """

    def __init__(self, sock: socket.socket, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.sock = sock
        self.outstanding = 0
        self._header = bytearray(HEADER.size)
        self._payload = bytearray(max_reply_bytes)
        self._payload_view = memoryview(self._payload)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        read_timeout: float | None = 10.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> DataConnection:
        """Connect, retrying until ``timeout``: receivers may start before the IOC listens."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, timeout))
                break
            except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
                if time.monotonic() + CONNECT_RETRY_S >= deadline:
                    raise
                time.sleep(CONNECT_RETRY_S)
        sock.settimeout(read_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, max_reply_bytes)

    def request(self, count: int = 1) -> None:
        """Send ``count`` requests (one write); see `_send_request` for a closed server."""
        if count > 0:
            _send_request(self.sock, REQUEST * count)
            self.outstanding += count

    def read_reply(self) -> tuple[ReplyHeader, memoryview]:
        """Read the next reply: its header and exactly ``recLen`` payload bytes."""
        self._read_exactly(memoryview(self._header))
        header = ReplyHeader(*HEADER.unpack(self._header))
        if header.type == protocol.SENDER_OFF:
            raise SenderOff("the IOC is serving another receiver (SENDER_OFF)")
        if header.type == SERVER_SUMMARY:
            if not 0 < header.length <= len(self._payload) or header.recs != 1:
                raise ProtocolError(f"bad data reply header {header}")
        elif header.type == INSUFF_DATA:
            if header.length != 0:
                raise ProtocolError(f"INSUFF_DATA with a payload: {header}")
        else:
            raise ProtocolError(f"unexpected reply type {header.type}")
        payload = self._payload_view[: header.length]
        self._read_exactly(payload)
        self.outstanding -= 1
        return header, payload

    def _read_exactly(self, view: memoryview) -> None:
        _read_exactly(self.sock, view)

    def close(self) -> None:
        self.sock.close()


class V2Connection:
    """One version-2 connection: hello, then requests carrying acknowledgements.

    `read_reply` returns the header and a view into a buffer reused by the next read.
    """

    def __init__(self, sock: socket.socket, info: protocol.RunInfo, header: protocol.V2Header,
                 previous: str, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.sock = sock
        self.info = info
        #: The stream offset the IOC resumes at (its acknowledged offset).
        self.resume = header.offset
        #: How the previous v2 receiver of this run described itself ("" if none).
        self.previous = previous
        self.outstanding = 0
        self._header = bytearray(protocol.V2_HEADER.size)
        self._payload = bytearray(max_reply_bytes)
        self._payload_view = memoryview(self._payload)

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        hello: protocol.Hello,
        *,
        timeout: float = 10.0,
        read_timeout: float | None = 10.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> V2Connection:
        """Connect (retrying refused connections until ``timeout``) and say hello.

        Raises `Refused` when the IOC will not serve this client now.
        """
        classic = DataConnection.connect(host, port, timeout=timeout, read_timeout=read_timeout,
                                         max_reply_bytes=0)
        sock = classic.sock
        try:
            sock.sendall(hello.pack())
            header_bytes = _read_exactly(sock, memoryview(bytearray(protocol.V2_HEADER.size)))
            if header_bytes[:4] == protocol.SENDER_OFF_HEADER[:4]:
                raise ProtocolError("the server speaks only the classic protocol (SENDER_OFF)")
            header = protocol.V2Header.unpack(header_bytes)
            if header.type not in (protocol.HELLO_REPLY, protocol.REFUSED):
                raise ProtocolError(f"expected a hello reply, got type {header.type}")
            payload = _read_exactly(sock, memoryview(bytearray(header.length)))
            info, text = protocol.RunInfo.unpack(header.run, payload)
            if header.type == protocol.REFUSED:
                raise Refused(protocol.Refusal(header.status), info, text)
        except BaseException:
            sock.close()
            raise
        return cls(sock, info, header, text, max_reply_bytes)

    def request(self, count: int, ack: int) -> None:
        """Ask for ``count`` more replies; everything below stream offset ``ack`` is stored."""
        _send_request(self.sock, protocol.v2_request(count, ack))
        self.outstanding += count

    def read_reply(self) -> tuple[protocol.V2Header, memoryview]:
        """The next reply: data (type 4), no data (5), or a refusal (raises `Refused`)."""
        _read_exactly(self.sock, memoryview(self._header))
        header = protocol.V2Header.unpack(self._header)
        if header.type == protocol.REFUSED:
            payload = _read_exactly(self.sock, memoryview(bytearray(header.length)))
            info, text = protocol.RunInfo.unpack(header.run, payload)
            raise Refused(protocol.Refusal(header.status), info, text)
        if header.type == SERVER_SUMMARY:
            if not 0 < header.length <= len(self._payload):
                raise ProtocolError(f"bad data reply header {header}")
        elif header.type != INSUFF_DATA or header.length != 0:
            raise ProtocolError(f"unexpected reply {header}")
        payload = self._payload_view[: header.length]
        _read_exactly(self.sock, payload)
        self.outstanding -= 1
        return header, payload

    def close(self) -> None:
        self.sock.close()


def _send_request(sock: socket.socket, message: bytes) -> None:
    """Send a request; a server that has closed is left for the reads to report.

    A pipelining client may learn of the close from a request that fails while
    replies sent before it still wait in our socket: those are read as usual, and
    the read after them raises `ConnectionError`, instead of losing them here.
    """
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(message)


def _read_exactly(sock: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ConnectionError("the server closed the connection")
        got += count
    return view


# --------------------------------------------------------------- decoding


def decode_payload(payload: memoryview | bytes) -> Decoded:
    """Decode one data reply (one board): trigger packets if it starts with 0x0000AAAA."""
    words = np.frombuffer(payload, dtype=WORD)
    trigger = words.size > 0 and int(words[0]) == packets.TRIGGER_MARKER
    return decode(words, trigger=trigger)


# ------------------------------------------------------------ bookkeeping


@dataclass
class BoardLog:
    """Everything one board (by board id) sent: decoded records, in arrival order."""

    board: int
    chunks: list[np.ndarray] = field(default_factory=list)
    end_of_run: int = 0  # 0xD headers received

    @property
    def events(self) -> np.ndarray:
        """All decoded records of this board (`ioc.decoder.EVENT_DTYPE`), type-F included."""
        if not self.chunks:
            return np.empty(0, dtype=EVENT_DTYPE)
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0]

    @property
    def data_events(self) -> np.ndarray:
        """Digitizer events only (no type-F headers)."""
        events = self.events
        return events[events["kind"] != KIND_TYPE_F]


@dataclass
class Tally:
    """What a receiver got, overall and per board.

    Trigger packets carry no board id; they are kept apart in ``trigger``.
    """

    replies: int = 0
    data_replies: int = 0
    insuff_replies: int = 0
    payload_bytes: int = 0
    events: int = 0
    unknown_spans: int = 0
    unknown_words: int = 0
    boards: dict[int, BoardLog] = field(default_factory=dict)
    trigger: list[np.ndarray] = field(default_factory=list)
    #: Copies of every payload, in order, when the receiver keeps them (tests).
    payloads: list[bytes] | None = None

    def add_reply(self, header: ReplyHeader, payload: memoryview) -> Decoded | None:
        """Account one reply; data replies are decoded and filed by board."""
        self.replies += 1
        if header.type == INSUFF_DATA:
            self.insuff_replies += 1
            return None
        self.data_replies += 1
        self.payload_bytes += len(payload)
        if self.payloads is not None:
            self.payloads.append(bytes(payload))
        decoded = decode_payload(payload)
        self.add_decoded(decoded)
        return decoded

    def add_decoded(self, decoded: Decoded) -> None:
        events = decoded.events
        self.events += events.size
        self.unknown_spans += len(decoded.unknown)
        self.unknown_words += decoded.unknown_words
        if events.size == 0:
            return
        kinds = events["kind"]
        if (kinds == KIND_TRIGGER).any():
            self.trigger.append(events[kinds == KIND_TRIGGER])
            events = events[kinds != KIND_TRIGGER]
            if events.size == 0:
                return
        boards = events["board"]
        first = int(boards[0])
        if (boards == first).all():
            self._file(first, events)
        else:
            for board in np.unique(boards):
                self._file(int(board), events[boards == board])

    def _file(self, board: int, events: np.ndarray) -> None:
        log = self.boards.get(board)
        if log is None:
            log = self.boards[board] = BoardLog(board)
        log.chunks.append(events)
        end = (events["kind"] == KIND_TYPE_F) & (events["channel"] == packets.CH_END_OF_RUN)
        log.end_of_run += int(np.count_nonzero(end))

    @property
    def boards_seen(self) -> set[int]:
        return set(self.boards)

    @property
    def boards_done(self) -> set[int]:
        """Boards that sent their end-of-run 0xD header."""
        return {board for board, log in self.boards.items() if log.end_of_run}

    @property
    def all_done(self) -> bool:
        """Every board seen so far has sent its 0xD (the classic receiver's exit rule)."""
        return bool(self.boards) and all(log.end_of_run for log in self.boards.values())

    @property
    def trigger_events(self) -> np.ndarray:
        if len(self.trigger) > 1:
            self.trigger = [np.concatenate(self.trigger)]
        if not self.trigger:
            return np.empty(0, dtype=EVENT_DTYPE)
        return self.trigger[0]


# ---------------------------------------------------------------- session


class Receiver:
    """A receiver session: connect, pipeline requests, tally, stop cleanly."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        pipeline: int = 6,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 10.0,
        keep_payloads: bool = False,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        self.host, self.port = host, port
        self.pipeline = pipeline
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_reply_bytes = max_reply_bytes
        self.tally = Tally(payloads=[] if keep_payloads else None)

    def run(
        self,
        *,
        max_seconds: float | None = None,
        max_replies: int | None = None,
        until_done: bool = True,
        until: Callable[[Tally], bool] | None = None,
        on_reply: Callable[[Tally], None] | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> Tally:
        """Pull replies until every board seen sent its 0xD (with ``until_done``),
        ``until(tally)`` is true, ``max_seconds`` passed or ``max_replies`` replies
        were asked for; then read the replies still owed and close. Returns the
        tally (also ``self.tally``).

        An IOC busy with another receiver answers SENDER_OFF: then ``on_wait`` is told
        why and the connection is tried again, within the connect timeout (and
        ``max_seconds``).
        """
        started = time.monotonic()
        deadline = None if max_seconds is None else started + max_seconds
        connect_deadline = started + self.connect_timeout
        if deadline is not None:
            connect_deadline = min(connect_deadline, deadline)
        budget = max_replies if max_replies is not None else sys.maxsize
        while True:
            conn = DataConnection.connect(
                self.host,
                self.port,
                timeout=max(0.05, connect_deadline - time.monotonic()),
                read_timeout=self.read_timeout,
                max_reply_bytes=self.max_reply_bytes,
            )
            try:
                self._pull(conn, deadline, budget, until_done, until, on_reply)
                return self.tally
            except SenderOff as busy:
                if on_wait is not None:
                    on_wait(str(busy))
                if time.monotonic() + RETRY_S >= connect_deadline:
                    raise TimeoutError(f"{busy}; gave up waiting") from None
                time.sleep(RETRY_S)
            finally:
                conn.close()

    def _pull(
        self,
        conn: DataConnection,
        deadline: float | None,
        budget: int,
        until_done: bool,
        until: Callable[[Tally], bool] | None,
        on_reply: Callable[[Tally], None] | None,
    ) -> None:
        asked = min(self.pipeline, budget)
        conn.request(asked)
        stopping = asked >= budget
        while conn.outstanding:
            header, payload = conn.read_reply()
            self.tally.add_reply(header, payload)
            if on_reply is not None:
                on_reply(self.tally)
            if not stopping:
                stopping = (
                    (until_done and self.tally.all_done)
                    or (until is not None and until(self.tally))
                    or (deadline is not None and time.monotonic() >= deadline)
                    or asked >= budget
                )
            if not stopping:
                conn.request(1)
                asked += 1


# -------------------------------------------------------------------- CLI


class _Progress:
    """Prints one line of throughput figures per interval."""

    def __init__(self, interval: float, out=sys.stdout) -> None:
        self.interval = interval
        self.out = out
        self.start = time.monotonic()
        self.last = self.start
        self.last_bytes = self.last_events = self.last_replies = 0

    def __call__(self, tally: Tally, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        dt = max(now - self.last, 1e-9)
        print(
            f"t={now - self.start:.1f}s MB={tally.payload_bytes / 1e6:.1f} "
            f"MB/s={(tally.payload_bytes - self.last_bytes) / 1e6 / dt:.1f} "
            f"events/s={(tally.events - self.last_events) / dt:.0f} "
            f"replies/s={(tally.replies - self.last_replies) / dt:.0f}",
            file=self.out,
            flush=True,
        )
        self.last = now
        self.last_bytes, self.last_events, self.last_replies = (
            tally.payload_bytes, tally.events, tally.replies,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m receiver.client", description="Pull data from a crate IOC and report rates."
    )
    parser.add_argument("address", help="host:port of the crate's data server")
    parser.add_argument("--pipeline", type=int, default=6, help="requests in flight (default 6)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--replies", type=int, default=None, help="stop after this many replies")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between lines")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        parser.error("address must be host:port")
    receiver = Receiver(
        host, int(port), pipeline=args.pipeline, connect_timeout=args.connect_timeout,
        read_timeout=READ_TIMEOUT_S,
    )
    progress = _Progress(args.interval)
    waited: list[str] = []

    def say_why(reason: str) -> None:
        if not waited:
            print(f"receiver: waiting: {reason}; retrying every {RETRY_S:g} s", flush=True)
        waited.append(reason)

    try:
        tally = receiver.run(
            max_seconds=args.seconds, max_replies=args.replies, on_reply=progress,
            on_wait=say_why,
        )
    except KeyboardInterrupt:
        tally = receiver.tally
    except (OSError, ProtocolError) as err:
        print(f"receiver: {err}", file=sys.stderr)
        return 1
    progress(tally, force=True)
    done = sorted(tally.boards_done)
    print(
        f"total MB={tally.payload_bytes / 1e6:.1f} events={tally.events} replies={tally.replies} "
        f"insuff={tally.insuff_replies} boards={sorted(tally.boards_seen)} done={done}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One receiver connection on the data port, what it has asked for, and how it ends.

The first bytes decide the protocol: the classic request word (1) or a v2
hello. After that every complete message is checked as it arrives: a classic
request must be the word 1, a v2 request must carry its magic and an
acknowledgement that only moves forward. Anything else is a protocol
violation; the sender then ends the connection at once (a client sending
random bytes would otherwise be served real run data for every 4 bytes).

A connection is closed with a FIN, never a reset, so that what was sent last
(a refusal, the last 0xD headers) is not thrown away: the client's side is
read until it has taken everything (`Connection.linger`) or at least until
its unread requests are gone (`Connection.close`).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import select
import socket
import struct
import termios
import time

from ioc import protocol

#: Bytes of a request read and checked in one go; more wait in the socket.
READ_CHUNK = 65536
#: How often a lingering close looks at the send queue while the client sends nothing.
LINGER_POLL_S = 0.005


class Kind(enum.Enum):
    UNKNOWN = "unknown"
    CLASSIC = "classic"
    V2 = "v2"


class Violation(Exception):
    """The client sent something the protocol does not allow."""


class Connection:
    """One accepted client: its socket, protocol, outstanding requests and log state."""

    def __init__(self, sock: socket.socket, peer: str, now: float, log: logging.Logger) -> None:
        self.sock = sock
        self.peer = peer
        self.kind = Kind.UNKNOWN
        self.hello: protocol.Hello | None = None
        #: The v2 hello was answered (the client may now ask for data).
        self.greeted = False
        #: Requests received and not yet answered.
        self.pending = 0
        self.answered = 0
        #: Bytes of a reply whose send failed that were handed to the socket anyway.
        self.unfinished_reply = 0
        #: Highest acknowledgement received (v2), and whether a new one arrived.
        self.acked = 0
        self.ack_changed = False
        #: The run (generation) this v2 connection is bound to once greeted.
        self.generation = -1
        self.connected_at = now
        #: Last time it had a complete request outstanding or sent one.
        self.idle_since = now
        self._partial = b""
        self.log = log
        self.logged: set[str] = set()
        #: Reports a peer that closed or shut down its side, even with requests still queued.
        self.hangup = select.poll()
        self.hangup.register(sock, select.POLLRDHUP)

    def peer_gone(self) -> bool:
        """True once the client has closed: replies to it could only be lost."""
        return bool(self.hangup.poll(0))

    @property
    def identified(self) -> bool:
        """Classic, or v2 with its whole hello received."""
        return self.kind is Kind.CLASSIC or self.hello is not None

    def log_once(self, reason: str, message: str, *args: object) -> None:
        """Log each bad case of a connection once, never a flood."""
        if reason not in self.logged:
            self.logged.add(reason)
            self.log.warning("receiver %s: " + message, self.peer, *args)

    def note_partial_request(self) -> None:
        if self._partial:
            self.log_once("partial", "partial request (%d bytes) at close", len(self._partial))

    # ----------------------------------------------------------- parsing

    def feed(self, data: bytes | memoryview) -> None:
        """Take newly received bytes; raises `Violation` on anything the protocol forbids."""
        buffered = self._partial + bytes(data) if self._partial else bytes(data)
        if self.kind is Kind.UNKNOWN:
            buffered = self._identify(buffered)
        if self.kind is Kind.CLASSIC:
            self._partial = self._classic(buffered)
        elif self.kind is Kind.V2:
            self._partial = self._v2(buffered)
        else:
            self._partial = buffered

    def _identify(self, data: bytes) -> bytes:
        if len(data) < 4:
            return data
        if data[:4] == protocol.CLASSIC_REQUEST:
            self.kind = Kind.CLASSIC
            return data
        if data[:4] != protocol.HELLO_MAGIC:
            raise Violation(f"unknown request word 0x{int.from_bytes(data[:4], 'big'):08x}")
        fixed = protocol.HELLO.size
        if len(data) < fixed:
            return data
        if protocol.HELLO.unpack(data[:fixed])[5] > protocol.MAX_DESCRIPTION:
            raise Violation("a hello with an oversized description")
        end = fixed + protocol.Hello.description_bytes(data[:fixed])
        if len(data) < end:
            return data
        self.kind = Kind.V2
        self.hello = protocol.Hello.unpack(data[:fixed], data[fixed:end])
        return data[end:]

    def _classic(self, data: bytes) -> bytes:
        count = len(data) // 4
        whole = count * 4
        if data[:whole] != protocol.CLASSIC_REQUEST * count:
            words = [data[i : i + 4] for i in range(0, whole, 4)]
            bad = next(w for w in words if w != protocol.CLASSIC_REQUEST)
            raise Violation(f"unknown request word 0x{int.from_bytes(bad, 'big'):08x}")
        self.pending += count
        return data[whole:]

    def _v2(self, data: bytes) -> bytes:
        size = protocol.V2_REQUEST.size
        whole = len(data) - len(data) % size
        for magic, count, ack in protocol.V2_REQUEST.iter_unpack(data[:whole]):
            if magic != protocol.REQUEST_MAGIC:
                raise Violation(f"unknown request word 0x{int.from_bytes(magic, 'big'):08x}")
            if not self.greeted:
                raise Violation("a request before the hello was answered")
            if ack < self.acked:
                raise Violation(f"acknowledgement moved back from {self.acked} to {ack}")
            if ack != self.acked:
                self.acked = ack
                self.ack_changed = True
            self.pending += count
        return data[whole:]

    # ----------------------------------------------------------- ending

    def send_quietly(self, message: bytes) -> None:
        """A short control message; a client that is gone simply does not get it."""
        with contextlib.suppress(OSError):
            self.sock.sendall(message)

    def unsent_bytes(self) -> int:
        """Bytes still in the socket's send queue (not yet taken by the peer)."""
        try:
            queued = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        except OSError:
            return 0
        return struct.unpack("i", queued)[0]

    def linger(self, seconds: float, scratch: bytearray) -> None:
        """Half-close, then read (bounded) until the client has taken every byte sent or
        closed its side. A client that pipelines keeps sending requests until it sees the
        end; a request reaching a closed socket is answered with a reset, which throws
        away whatever replies were still in our send queue (the last 0xD headers at a
        shutdown). Requests and acknowledgements read meanwhile are fed as usual, so a v2
        client's last acknowledgements count."""
        sock = self.sock
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        with contextlib.suppress(OSError, Violation):
            sock.shutdown(socket.SHUT_WR)
            while self.unsent_bytes() > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if not poller.poll(min(left, LINGER_POLL_S) * 1000):
                    continue
                count = sock.recv_into(scratch, 0, socket.MSG_DONTWAIT)
                if count == 0:
                    return
                self.feed(memoryview(scratch)[:count])

    def close(self, scratch: bytearray) -> None:
        """Close after what was sent (a last control message): FIN first, then read what
        the client still sent, so the close is not a reset that could discard it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv_into(scratch, 0, socket.MSG_DONTWAIT):
                pass
        self.sock.close()

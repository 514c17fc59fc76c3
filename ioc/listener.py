"""The data port's listening socket: binding, accepting, and who may connect.

The sender opens it when a run with Save starts and closes it once the run's
data are delivered. Accepted sockets get what serving them needs (no Nagle,
send and receive timeouts so a blocked call returns in time for the sender
to look at its clocks); addresses outside ``allowed_receivers`` are closed at
once, each logged at most once a period since refused clients retry.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence

from ioc.connection import Connection

LISTEN_BACKLOG = 16
#: A refused address is logged at most this often.
REFUSAL_LOG_PERIOD_S = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """The allow-list as networks; empty means every address."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO / SO_RCVTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class RateLimitedLog:
    """Warnings about clients that retry: each (host, kind) at most once a period."""

    def __init__(self, log: logging.Logger, period: float = REFUSAL_LOG_PERIOD_S) -> None:
        self.log = log
        self.period = period
        self._quiet_until: dict[tuple[str, str], float] = {}

    def warning(self, host: str, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._quiet_until.get((host, kind), 0.0):
            return
        self._quiet_until[(host, kind)] = now + self.period
        self.log.warning(message, *args)


class DataListener:
    """Binds, listens and accepts on the data port (owned by the sender)."""

    def __init__(
        self,
        bind: str,
        port: int,
        *,
        max_segment: int,
        allowed: Sequence[str],
        send_slice_s: float,
        read_slice_s: float,
        log: logging.Logger,
        refusals: RateLimitedLog,
        on_refused: Callable[[], None],
    ) -> None:
        self.bind = bind
        self.port = port
        self.max_segment = max_segment
        self.allowed = allowed_networks(allowed)
        self.send_slice_s = send_slice_s
        self.read_slice_s = read_slice_s
        self.log = log
        self.refusals = refusals
        self.on_refused = on_refused
        self.sock: socket.socket | None = None
        self._failure_logged = False

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def make_socket(self) -> socket.socket:
        """A socket bound to the data port (raises OSError when it cannot be bound)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.max_segment > 0:
                with contextlib.suppress(OSError):  # accepted sockets inherit it, where allowed
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.max_segment)
            sock.bind((self.bind, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    def new_run(self) -> None:
        """A failure to listen is logged once per run."""
        self._failure_logged = False

    def open(self) -> None:
        if self.sock is not None:
            return
        try:
            sock = self.make_socket()
            sock.listen(LISTEN_BACKLOG)
        except OSError as err:
            if not self._failure_logged:
                self._failure_logged = True
                self.log.error("cannot listen on %s:%d: %s", self.bind, self.port, err)
            return
        sock.setblocking(False)
        self.port = sock.getsockname()[1]  # an ephemeral port, once chosen, is kept
        self.sock = sock
        self.log.info("listening on %s:%d", self.bind, self.port)

    def close(self, why: str = "") -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
            if why:
                self.log.info("listener closed: %s", why)

    def accept(self, limit: int) -> list[Connection]:
        """Accept up to ``limit`` pending connections from allowed addresses."""
        accepted: list[Connection] = []
        while self.sock is not None and len(accepted) < limit:
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self.log.warning("accept failed: %s", err)
                break
            if not self._allowed(address[0]):
                self.refusals.warning(address[0], "not allowed",
                                      "receiver %s refused: not in allowed_receivers", address[0])
                self.on_refused()
                sock.close()
                continue
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self.send_slice_s))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self.read_slice_s))
            peer = f"{address[0]}:{address[1]}"
            accepted.append(Connection(sock, peer, time.monotonic(), self.log))
            self.log.info("receiver %s connected", peer)
        return accepted

    def _allowed(self, host: str) -> bool:
        if not self.allowed:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.allowed)

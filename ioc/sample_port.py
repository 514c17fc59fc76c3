"""Sampled events over the classic data protocol on a second port (default 9002).

Any classic receiver (`python -m receiver.client`, `dgs-receiver --protocol
classic`, gtReceiver) can sample a live run here without touching the primary
stream on the data port: every connection is one consumer of `ioc.sampling`
with the configured default filter (``[crate] sample_filter``, every digitizer
event when left out; ``source=any`` adds the master trigger's packets, which a
classic receiver files as on the data port). The protocol is the classic one
byte for byte (docs/protocol.md): one reply per 4-byte request, whole packets
of one board per reply, at most ``max_reply_bytes``, type 5 after the idle
wait when nothing is queued. Each board's end-of-run header is passed on
whatever the filter, so a classic receiver ends as it does on 9001.
Connections are served each on a thread of its own and may come and go at any
time; the port stays open for the IOC's life. A client that falls behind loses
samples (counted), never the run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Sequence

import numpy as np

from ioc import protocol
from ioc.listener import allowed_networks
from ioc.sample_filter import SampleFilter
from ioc.sampling import Chunk, Consumer, SampleTap

#: Connections served at once; more are closed on accept (logged once each).
MAX_CLIENTS = 16
#: Seconds between checks for shutdown while waiting for requests.
POLL_S = 0.2

log = logging.getLogger("dgs.sampleport")


class SamplePort:
    """The listening socket and one thread per connected classic client."""

    def __init__(
        self,
        tap: SampleTap,
        bind: str,
        port: int,
        *,
        default_filter: SampleFilter,
        max_reply_bytes: int,
        idle_wait_s: float,
        allowed: Sequence[str] = (),
    ) -> None:
        self.tap = tap
        self.bind = bind
        self.port = port
        self.default_filter = default_filter
        self.max_reply_words = max_reply_bytes // 4
        self.idle_wait_s = idle_wait_s
        self.allowed = allowed_networks(allowed)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._clients: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start(self) -> int:
        """Listen; returns the port taken (0: the port could not be bound, logged)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind, self.port))
            sock.listen(8)
        except OSError as err:
            sock.close()
            log.warning("sample port %s:%d not served: %s", self.bind, self.port,
                        err.strerror or err)
            return 0
        sock.settimeout(POLL_S)
        self._sock = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._accept, name="samplePort", daemon=True).start()
        log.info("sampled events (classic protocol) on %s:%d, filter: %s", self.bind, self.port,
                 self.default_filter.text())
        return self.port

    def shutdown(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for thread in clients:
            thread.join(timeout=1.0)

    def _allowed(self, host: str) -> bool:
        if not self.allowed:
            return True
        address = ipaddress.ip_address(host)
        return any(address in network for network in self.allowed)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, (host, port) = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._clients) >= MAX_CLIENTS
            if full or not self._allowed(host):
                log.warning("sample client %s:%d refused (%s)", host, port,
                            "too many clients" if full else "not in allowed_receivers")
                sock.close()
                continue
            thread = threading.Thread(target=self._serve, args=(sock, f"{host}:{port}"),
                                      name="sampleClient", daemon=True)
            with self._lock:
                self._clients.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        consumer = self.tap.attach(self.default_filter, f"classic {peer}", end_of_run=True)
        log.info("sample client %s attached (consumer %d)", peer, consumer.id)
        pending = b""
        try:
            sock.settimeout(POLL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stop.is_set():
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    break
                pending += data
                count = len(pending) // 4
                requests, pending = pending[: count * 4], pending[count * 4 :]
                if requests != protocol.CLASSIC_REQUEST * count:
                    log.warning("sample client %s: not a classic request; closed", peer)
                    break
                for _ in range(count):
                    self._reply(sock, consumer)
        except OSError as err:
            log.info("sample client %s: %s", peer, err.strerror or err)
        finally:
            self.tap.detach(consumer.id)
            with contextlib.suppress(OSError):
                sock.close()
            log.info("sample client %s detached: %d events delivered, %d lost", peer,
                     consumer.delivered, consumer.lost)
            with self._lock:
                self._clients.discard(threading.current_thread())

    def _reply(self, sock: socket.socket, consumer: Consumer) -> None:
        """One classic reply: the next whole packets of one board, or no data."""
        chunk = consumer.take_chunk(self.idle_wait_s)
        if chunk is None:
            sock.sendall(protocol.INSUFF_DATA_HEADER)
            return
        taken, rest = _split(chunk, self.max_reply_words)
        if rest is not None:
            consumer.put_back(rest)
        payload = _packets(taken).tobytes()
        header = protocol.CLASSIC_HEADER.pack(protocol.SERVER_SUMMARY, len(payload), 0, 1)
        sock.sendmsg([header, payload])


def _split(chunk: Chunk, max_words: int) -> tuple[Chunk, Chunk | None]:
    """The leading events whose packets fit in ``max_words``, and the rest (or None)."""
    ends = chunk.offsets + chunk.lengths + 1
    fit = max(1, int(np.searchsorted(ends, max_words, side="right")))
    if fit >= chunk.count:
        return chunk, None
    return chunk.part(0, fit), chunk.part(fit)


def _packets(chunk: Chunk) -> np.ndarray:
    """The chunk's packets, back to back (they are contiguous in its words)."""
    start = int(chunk.offsets[0])
    end = int(chunk.offsets[-1] + chunk.lengths[-1] + 1)
    return chunk.words[start:end]

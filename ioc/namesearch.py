"""Ask the CA and PVA servers at given UDP addresses whether they serve some PV names.

The start-up check needs an answer within a fraction of a second from exactly
the addresses it names, in a process that is about to become an EPICS server
and must not create a CA or PVA client context yet (both read the environment
once). So this module speaks the two search requests itself. Each address gets
its own connected UDP socket: on this host, "nothing listens there" then comes
back at once as ECONNREFUSED instead of costing the whole timeout.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Endpoint = tuple[str, int]

#: Channel Access: 16-byte big-endian header (command, payload size, data type,
#: count, parameter 1, parameter 2); a search names the PV in an 8-byte padded payload.
CA_HEADER = struct.Struct(">HHHHII")
CA_VERSION = 0
CA_SEARCH = 6
CA_MINOR_VERSION = 13
CA_DONT_REPLY = 5  # a server without the name stays silent
CA_REPLY_USE_SENDER = 0xFFFFFFFF  # (or 0) the server's address is the reply's source

#: PV Access: 8-byte header (magic, version, flags, command, payload size).
PVA_MAGIC = 0xCA
PVA_VERSION = 2
PVA_SEARCH = 3
PVA_SEARCH_RESPONSE = 4
PVA_FLAG_CONTROL = 0x01
PVA_FLAG_BIG_ENDIAN = 0x80
PVA_SEARCH_UNICAST = 0x80
PVA_SEARCH_SEQUENCE = 1
PVA_GUID_BYTES = 12
PVA_ADDRESS_BYTES = 16

#: A lost datagram is sent again this often until the timeout.
RESEND_S = 0.15


@dataclass(frozen=True)
class Found:
    """A server that answered: it serves ``name``."""

    protocol: str  # "CA" or "PVA"
    name: str
    searched: Endpoint  # the UDP address asked
    server: Endpoint  # where that server accepts TCP connections


def ca_request(names: Sequence[str]) -> bytes:
    """One datagram searching every name; the channel id is the name's index."""
    parts = [CA_HEADER.pack(CA_VERSION, 0, 0, CA_MINOR_VERSION, 0, 0)]
    for cid, name in enumerate(names):
        payload = name.encode() + b"\0"
        payload += b"\0" * (-len(payload) % 8)
        parts.append(
            CA_HEADER.pack(CA_SEARCH, len(payload), CA_DONT_REPLY, CA_MINOR_VERSION, cid, cid)
        )
        parts.append(payload)
    return b"".join(parts)


def ca_answers(datagram: bytes, names: Sequence[str], searched: Endpoint) -> list[Found]:
    """The names a CA server says it has, from its reply datagram."""
    found = []
    offset = 0
    while offset + CA_HEADER.size <= len(datagram):
        command, size, tcp_port, _, address, cid = CA_HEADER.unpack_from(datagram, offset)
        offset += CA_HEADER.size + size
        if command == CA_SEARCH and cid < len(names):
            use_sender = address in (0, CA_REPLY_USE_SENDER)
            host = searched[0] if use_sender else socket.inet_ntoa(struct.pack(">I", address))
            found.append(Found("CA", names[cid], searched, (host, tcp_port)))
    return found


def _pva_string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) >= 254:
        raise ValueError(f"name too long for a PVA search: {text!r}")
    return bytes([len(raw)]) + raw


def pva_request(names: Sequence[str], reply_port: int) -> bytes:
    """A little-endian unicast search for every name; the instance id is the name's index."""
    payload = b"".join(
        [
            struct.pack("<IB3x", PVA_SEARCH_SEQUENCE, PVA_SEARCH_UNICAST),
            bytes(PVA_ADDRESS_BYTES),  # all zero: answer to the datagram's source address
            struct.pack("<H", reply_port),
            b"\x01" + _pva_string("tcp"),
            struct.pack("<H", len(names)),
            *(struct.pack("<I", cid) + _pva_string(name) for cid, name in enumerate(names)),
        ]
    )
    return struct.pack("<BBBBI", PVA_MAGIC, PVA_VERSION, 0, PVA_SEARCH, len(payload)) + payload


def _pva_host(raw: bytes, fallback: str) -> str:
    """An IPv4-mapped address from a search response, else where the response came from."""
    address = ipaddress.IPv6Address(raw)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None and int(mapped) != 0 else fallback


def pva_answers(datagram: bytes, names: Sequence[str], searched: Endpoint) -> list[Found]:
    """The names a PVA server says it has, from its response datagram."""
    found = []
    offset = 0
    while offset + 8 <= len(datagram):
        magic, _, flags, command = datagram[offset : offset + 4]
        order = ">" if flags & PVA_FLAG_BIG_ENDIAN else "<"
        (size,) = struct.unpack_from(order + "I", datagram, offset + 4)
        body = datagram[offset + 8 : offset + 8 + size]
        offset += 8 + size
        if magic != PVA_MAGIC or flags & PVA_FLAG_CONTROL or command != PVA_SEARCH_RESPONSE:
            continue
        try:
            found += _pva_response(body, order, names, searched)
        except (struct.error, IndexError, ValueError):
            continue  # not a response this module can read: no answer from it
    return found


def _pva_response(body: bytes, order: str, names: Sequence[str], searched: Endpoint) -> list[Found]:
    """The names one search response (``body``, after the header) says the server has."""
    at = PVA_GUID_BYTES
    (sequence,) = struct.unpack_from(order + "I", body, at)
    at += 4
    host = _pva_host(body[at : at + PVA_ADDRESS_BYTES], searched[0])
    at += PVA_ADDRESS_BYTES
    (tcp_port,) = struct.unpack_from(order + "H", body, at)
    at += 2
    at += 1 + body[at]  # protocol name
    has_them = body[at]
    (count,) = struct.unpack_from(order + "H", body, at + 1)
    cids = struct.unpack_from(f"{order}{count}I", body, at + 3)
    if sequence != PVA_SEARCH_SEQUENCE or not has_them:
        return []
    return [
        Found("PVA", names[cid], searched, (host, tcp_port)) for cid in cids if cid < len(names)
    ]


class _Asker:
    """One connected UDP socket asking one address."""

    def __init__(self, protocol: str, target: Endpoint, names: Sequence[str]) -> None:
        self.protocol = protocol
        self.target = target
        self.names = names
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect(target)
        except OSError:
            self.sock.close()
            raise
        if protocol == "CA":
            self.request = ca_request(names)
        else:
            self.request = pva_request(names, self.sock.getsockname()[1])

    def send(self) -> bool:
        """False once the address refused (nothing listens there)."""
        try:
            self.sock.send(self.request)
        except OSError:
            return False
        return True

    def receive(self) -> tuple[bool, list[Found]]:
        """(still worth waiting for, what the reply says)."""
        try:
            datagram = self.sock.recv(65536)
        except BlockingIOError:
            return True, []
        except OSError:
            return False, []
        if self.protocol == "CA":
            return True, ca_answers(datagram, self.names, self.target)
        return True, pva_answers(datagram, self.names, self.target)


def _asker(protocol: str, target: Endpoint, names: Sequence[str]) -> _Asker | None:
    """None for an address a connected socket cannot ask (a broadcast address: its
    answers come from the servers' own addresses)."""
    try:
        return _Asker(protocol, target, names)
    except OSError:
        return None


def first_found(
    ca: Iterable[Endpoint], pva: Iterable[Endpoint], names: Sequence[str], timeout: float
) -> Found | None:
    """The first server at the ``ca`` or ``pva`` UDP addresses that has one of ``names``.

    Returns at the first answer, once every address refused, or after ``timeout``.
    """
    everyone = [
        asker
        for protocol, targets in (("CA", ca), ("PVA", pva))
        for target in dict.fromkeys(targets)
        if (asker := _asker(protocol, target, names)) is not None
    ]
    askers = list(everyone)
    try:
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while askers:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                askers = [asker for asker in askers if asker.send()]
                next_send = now + RESEND_S
                continue  # none left to wait for ends the loop
            wait = max(0.0, min(deadline, next_send) - time.monotonic())
            readable, _, _ = select.select([a.sock for a in askers], [], [], wait)
            for asker in [a for a in askers if a.sock in readable]:
                alive, found = asker.receive()
                if found:
                    return found[0]
                if not alive:
                    askers.remove(asker)
        return None
    finally:
        for asker in everyone:
            asker.sock.close()

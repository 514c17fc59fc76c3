"""Recordings made by hand for the replay tests: packets and GEB records written from spec 04.

Packets are packed literally from the spec's tables (not with the project's
own packing code), so the replay is checked against the format, not against
itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MARKER = 0xAAAAAAAA
TRIGGER_MARKER = 0x0000AAAA


@dataclass(frozen=True)
class Packet:
    """One recorded packet: its bytes as in the FIFO, and whose it is."""

    data: bytes
    board: int
    channel: int  # 16 for trigger packets
    timestamp: int
    trigger: bool = False


def digitizer(board: int, channel: int, timestamp: int, trace_words: int = 4,
              slot: int = 3, header_type: int = 7) -> Packet:
    n = 13 + trace_words
    words = [
        MARKER,
        slot << 27 | n << 16 | board << 4 | channel,
        timestamp & 0xFFFFFFFF,
        13 << 26 | header_type << 16 | timestamp >> 32,
        *[(0x100 * channel + i) & 0xFFFFFFFF for i in range(n - 3)],
    ]
    return Packet(struct.pack(f">{len(words)}I", *words), board, channel, timestamp)


def type_f(board: int, channel: int, timestamp: int, slot: int = 3) -> Packet:
    words = [MARKER, slot << 27 | 3 << 16 | board << 4 | channel, timestamp & 0xFFFFFFFF,
             3 << 26 | 0xF << 16 | timestamp >> 32]
    return Packet(struct.pack(">4I", *words), board, channel, timestamp)


def trigger(board: int, timestamp: int, kind: int = 1) -> Packet:
    values = [kind, timestamp >> 32 & 0xFFFF, timestamp >> 16 & 0xFFFF, timestamp & 0xFFFF,
              *[(0x1111 * i) & 0xFFFF for i in range(5, 16)]]
    return Packet(struct.pack(">16I", TRIGGER_MARKER, *values), board, 16, timestamp, True)


def geb_record(packet: Packet) -> bytes:
    """Spec 04 "GEB records", literally."""
    if not packet.trigger:
        body = packet.data[4:]
        status = (struct.unpack(">I", packet.data[12:16])[0] >> 16) & 0xF == 0xF
        kind = 15 if status and packet.channel == 16 else 14
        return struct.pack("<iiQ", kind, len(body), packet.timestamp) + body
    w = struct.unpack(">16I", packet.data)
    ts = packet.timestamp
    words = [MARKER, (10 << 16) | (packet.board << 4), ts & 0xFFFFFFFF,
             (3 << 26) | (0xE << 16) | (ts >> 32), (w[1] << 16) | w[5], (w[6] << 16) | w[7],
             (w[8] << 16) | w[9], (w[10] << 16) | w[11], (w[12] << 16) | w[13],
             (w[14] << 16) | w[15]]
    return struct.pack("<iiQ", 15, 40, ts) + struct.pack("<10I", *words)


def write_geb(path: Path, packets: Iterable[Packet]) -> Path:
    path.write_bytes(b"".join(geb_record(p) for p in packets))
    return path


def write_raw(path: Path, replies: Iterable[list[Packet]]) -> Path:
    """Replies as ``dgs-receiver --save-raw`` keeps them: a 16-byte header, then the payload."""
    chunks = []
    for reply in replies:
        payload = b"".join(p.data for p in reply)
        chunks.append(struct.pack(">iiii", 4, len(payload), 0, 1) + payload)
    path.write_bytes(b"".join(chunks))
    return path


def crate_packets(boards: Iterable[int], trigger_board: int | None, seconds: float,
                  rate_hz: float) -> list[Packet]:
    """Every board's packets over ``seconds``, interleaved in time (10 channels each)."""
    step = int(1e8 / rate_hz)
    count = int(seconds * rate_hz)
    found = []
    for index in range(count):
        timestamp = 1_000_000 + index * step
        for board in boards:
            found.append(digitizer(board, index % 10, timestamp + board))
        if trigger_board is not None:
            found.append(trigger(trigger_board, timestamp + 7))
    return found


def write_board_layout(run_dir: Path, packets: list[Packet], run: str = "run00001") -> None:
    """One file per board (``<run>.gtd_000_<board>``, triggers ``..._trig_<board>``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    boards: dict[tuple[int, bool], list[Packet]] = {}
    for packet in packets:
        boards.setdefault((packet.board, packet.trigger), []).append(packet)
    for (board, is_trigger), rows in boards.items():
        name = f"{run}.gtd_000_trig_{board:04d}" if is_trigger else f"{run}.gtd_000_{board:04d}"
        write_geb(run_dir / name, rows)

"""GEB records and run directories made by hand from spec 04's tables (for builder tests).

Fields are packed here from the spec's bit positions, not with the project's
packing code, so the tests check the decoders against the spec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from receiver.geb import read_records

FILTER_LENGTH = 256
BASELINE_SUM = 1000 * FILTER_LENGTH


@dataclass(frozen=True)
class Hit:
    board: int
    channel: int
    timestamp: int
    energy: int  # ADC counts: (post − pre) / M
    header_type: int = 7
    flags: int = 0
    samples: tuple[int, ...] = ()


def event_record(hit: Hit, slot: int = 3) -> bytes:
    """A digitizer event's GEB record: header (type 14) and packet words 1..N big-endian."""
    n = 13 + len(hit.samples) // 2
    pre = BASELINE_SUM + (hit.timestamp % 50)
    post = pre + hit.energy * FILTER_LENGTH
    words = [
        slot << 27 | n << 16 | hit.board << 4 | hit.channel,  # word 1
        hit.timestamp & 0xFFFFFFFF,  # word 2
        13 << 26 | hit.header_type << 16 | hit.timestamp >> 32,  # word 3
        hit.flags,  # word 4
        0, 1000, 0,  # words 5..7
        (post & 0xFF) << 24 | pre,  # word 8
        (post >> 8) & 0xFFFF,  # word 9
        0, post & 0xFF, 0, 0,  # words 10..13
    ]
    pairs = zip(hit.samples[0::2], hit.samples[1::2])
    words += [later << 16 | earlier for earlier, later in pairs]
    payload = struct.pack(f">{len(words)}I", *words)
    return struct.pack("<iiQ", 14, len(payload), hit.timestamp) + payload


def status_record(board: int, channel: int, timestamp: int, slot: int = 3) -> bytes:
    """A type-F header's record (channel 0xD end of data, 0xE empty)."""
    payload = struct.pack(">3I", slot << 27 | 3 << 16 | board << 4 | channel,
                          timestamp & 0xFFFFFFFF, 3 << 26 | 0xF << 16 | timestamp >> 32)
    return struct.pack("<iiQ", 14, 12, timestamp) + payload


def trigger_record(board: int, timestamp: int) -> bytes:
    """A master-trigger record (10 little-endian words, GEB type 15)."""
    words = [0xAAAAAAAA, 10 << 16 | board << 4, timestamp & 0xFFFFFFFF,
             3 << 26 | 0xE << 16 | timestamp >> 32, 1 << 16 | 2, 3, 4, 5, 6, 7]
    return struct.pack("<iiQ", 15, 40, timestamp) + struct.pack("<10I", *words)


def random_hits(rng: np.random.Generator, count: int, boards: tuple[int, ...],
                span_ticks: int, samples: int = 0) -> list[Hit]:
    """Hits at random times (sorted) on random boards and channels."""
    stamps = np.sort(rng.integers(1_000, 1_000 + span_ticks, count))
    return [
        Hit(int(rng.choice(boards)), int(rng.integers(0, 10)), int(ts),
            int(rng.integers(0, 8000)), int(rng.choice([7, 8])),
            int(rng.choice([0, 1 << 15, 1 << 11])),
            tuple(int(s) for s in rng.integers(0, 1 << 14, samples)))
        for ts in stamps
    ]


def write_file(path: Path, records: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))
    return path


def many_records(timestamps: np.ndarray, board: int, samples: int) -> bytes:
    """Digitizer records of one board at ``timestamps``: a template, its time fields set."""
    template = np.frombuffer(event_record(Hit(board, 1, 0, 100, samples=(7,) * samples)), np.uint8)
    table = np.tile(template, (timestamps.size, 1))
    stamps = timestamps.astype(np.uint64)
    table[:, 8:16] = stamps.astype("<u8")[:, None].view(np.uint8)
    table[:, 20:24] = (stamps & np.uint64(0xFFFFFFFF)).astype(">u4")[:, None].view(np.uint8)
    word3 = np.uint64(13 << 26 | 7 << 16) | stamps >> np.uint64(32)
    table[:, 24:28] = word3.astype(">u4")[:, None].view(np.uint8)
    return table.tobytes()


def records_of_files(paths: list[Path]) -> list[tuple[int, bytes]]:
    """(timestamp, bytes) of every record, files in order, positions in order."""
    found = []
    for path in paths:
        data = path.read_bytes()
        for record in read_records(data):
            start = int(record["offset"])
            found.append((int(record["timestamp"]),
                          data[start : start + 16 + int(record["length"])]))
    return found


def reference_merge(paths: list[Path], drop_status: bool = False) -> bytes:
    """The documented order, independently: a stable sort by timestamp of all records."""
    records = records_of_files(paths)
    if drop_status:
        records = [r for r in records if not is_status(r[1])]
    return b"".join(data for _, data in sorted(records, key=lambda r: r[0]))


def is_status(record: bytes) -> bool:
    length = struct.unpack_from("<i", record, 4)[0]
    return length == 12 and (struct.unpack_from(">I", record, 24)[0] >> 16) & 0xF == 0xF


def brute_force_multiplicity(stamps: list[int], window: int) -> list[int]:
    """Multiplicity of each event by the documented rule, one hit at a time."""
    sizes: list[int] = []
    opened = None
    for stamp in stamps:
        if opened is not None and stamp <= opened + window:
            sizes[-1] += 1
        else:
            opened = stamp
            sizes.append(1)
    return sizes

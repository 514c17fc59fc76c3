"""Recorded packets put back the way a board FIFO holds them, a block at a time.

A GEB record's payload is a digitizer packet without its 0xAAAAAAAA word, or a
trigger packet repacked to 10 little-endian words (spec 04, `receiver.geb`); a
``--save-raw`` reply holds the packets exactly as the IOC read them. Both are
turned back into FIFO words here with a few array operations per block, never
per packet in Python, so a replay can feed the IOC at its full rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ioc import packets
from ioc.decoder import KIND_EVENT, KIND_TRIGGER
from ioc.hardware import WORD
from receiver import geb

#: Trigger records of these board ids belong to the configured trigger board whatever
#: its package data: the classic receivers wrote 15 or 99, ours 0 before it knew the id.
PLACEHOLDER_TRIGGER_IDS = frozenset({0, 15, 99})
_MARKER_BYTES = np.frombuffer(b"\xaa" * 4, dtype=np.uint32)[0]
_TRIGGER_PAYLOAD_BYTES = geb.TRIGGER_RECORD_WORDS * 4


class RecordingError(Exception):
    """A file that is not a readable recording; the message names it and the byte."""


@dataclass
class Packets:
    """Whole packets back to back as FIFO words, with their pacing keys.

    ``bounds`` holds the word offset of each packet and the end; ``keys`` are the
    packets' timestamps made non-decreasing (a later packet never plays earlier).
    """

    words: np.ndarray
    bounds: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return self.keys.size

    @classmethod
    def empty(cls) -> Packets:
        return cls(np.empty(0, WORD), np.zeros(1, np.int64), np.empty(0, np.int64))

    @property
    def nwords(self) -> int:
        return int(self.bounds[-1] - self.bounds[0])

    def part(self, first: int, stop: int) -> Packets:
        """Packets ``first..stop`` (a view)."""
        base = int(self.bounds[0])
        bounds = self.bounds[first : stop + 1]
        words = self.words[int(bounds[0]) - base : int(bounds[-1]) - base]
        return Packets(words, bounds - bounds[0], self.keys[first:stop])

    def take(self, order: np.ndarray) -> Packets:
        """The packets in ``order`` (a copy)."""
        sizes = np.diff(self.bounds)[order]
        return _gather(self.words, self.bounds[order] - self.bounds[0], sizes, self.keys[order])

    @staticmethod
    def concat(parts: list[Packets]) -> Packets:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Packets.empty()
        if len(parts) == 1:
            return parts[0]
        sizes = [np.diff(p.bounds) for p in parts]
        bounds = np.zeros(sum(len(p) for p in parts) + 1, np.int64)
        np.cumsum(np.concatenate(sizes), out=bounds[1:])
        return Packets(
            np.concatenate([p.words for p in parts]).astype(WORD, copy=False),
            bounds,
            np.concatenate([p.keys for p in parts]),
        )


def _gather(source: np.ndarray, starts: np.ndarray, sizes: np.ndarray, keys) -> Packets:
    """Packets of ``sizes`` words copied from word offsets ``starts`` of ``source``."""
    bounds = np.zeros(sizes.size + 1, np.int64)
    np.cumsum(sizes, out=bounds[1:])
    total = int(bounds[-1])
    index = np.repeat(starts - bounds[:-1], sizes) + np.arange(total, dtype=np.int64)
    words = source.view(np.uint32)[index].view(WORD)
    return Packets(words, bounds, np.asarray(keys, np.int64))


def running_keys(stamps: np.ndarray, floor: int) -> tuple[np.ndarray, int]:
    """Pacing keys of timestamps: never below ``floor`` nor a predecessor; and the new floor."""
    keys = np.maximum.accumulate(np.maximum(stamps.astype(np.int64), floor))
    return keys, int(keys[-1]) if keys.size else floor


# ------------------------------------------------------------------ GEB records


@dataclass
class GebBlock:
    """The records of one block of a GEB file, classified."""

    data: np.ndarray  # the block's bytes (uint8), records back to back
    records: np.ndarray  # geb.RECORD_DTYPE
    board: np.ndarray  # int32 board id (package data) per record
    trigger: np.ndarray  # bool: a repacked trigger packet
    status: np.ndarray  # bool: a type-F header (the IOC's own, never replayed)


def classify_geb(data: np.ndarray, records: np.ndarray, where: str, offset: int) -> GebBlock:
    """Check and classify records found by `receiver.geb.scan_records` in ``data``.

    ``where`` names the file and ``offset`` is the block's byte offset in it (messages).
    """
    lengths = records["length"].astype(np.int64)
    starts = records["offset"] + geb.GEB_HEADER_BYTES
    bad = (lengths % 4 != 0) | (lengths < 12) | (lengths > 4 * packets.MAX_PACKET_LENGTH)
    if bad.any():
        _refuse(where, offset + int(records["offset"][np.argmax(bad)]), "record length")
    big = data[: (data.size // 4) * 4]
    be, le, native = big.view(">u4"), big.view("<u4"), big.view(np.uint32)
    first_word = starts // 4
    trigger = (lengths == _TRIGGER_PAYLOAD_BYTES) & (native[first_word] == _MARKER_BYTES)
    w1 = be[first_word].astype(np.int64)
    w3 = be[first_word + 2].astype(np.int64)
    digitizer = ~trigger
    wrong_length = digitizer & (packets.packet_length(w1) * 4 != lengths)
    if wrong_length.any():
        _refuse(where, offset + int(records["offset"][np.argmax(wrong_length)]), "packet length")
    board = np.where(trigger, packets.board_id(le[first_word + 1].astype(np.int64)),
                     packets.board_id(w1)).astype(np.int32)
    status = digitizer & (packets.header_type(w3) == packets.HEADER_TYPE_F)
    return GebBlock(data, records, board, trigger, status)


def _refuse(where: str, byte: int, what: str) -> None:
    raise RecordingError(f"{where}: the record at byte {byte} is not a DGS packet ({what})")


def geb_packets(
    block: GebBlock, chosen: np.ndarray, trigger: bool, floor: int
) -> tuple[Packets, int]:
    """FIFO words of the ``chosen`` records (all of one kind) and the new key floor."""
    records = block.records[chosen]
    keys, floor = running_keys(records["timestamp"], floor)
    first_word = (records["offset"] + geb.GEB_HEADER_BYTES) // 4
    whole = block.data[: (block.data.size // 4) * 4]
    if not trigger:
        # Word 0 of the packet comes from the header's last word, then overwritten.
        sizes = records["length"].astype(np.int64) // 4 + 1
        found = _gather(whole.view(np.uint32), first_word - 1, sizes, keys)
        found.words.view(np.uint32)[found.bounds[:-1]] = _MARKER_BYTES
        return found, floor
    index = first_word[:, None] + np.arange(geb.TRIGGER_RECORD_WORDS)
    values = whole.view("<u4")[index].astype(np.uint32)
    bounds = _even_bounds(len(records), packets.TRIGGER_WORDS)
    return Packets(_trigger_words(values), bounds, keys), floor


def _trigger_words(p: np.ndarray) -> np.ndarray:
    """The 16 trigger words of repacked records (``(k, 10)`` values): spec 04 backwards."""
    ts = (p[:, 3].astype(np.uint64) & np.uint64(0xFFFF)) << np.uint64(32) | p[:, 2]
    out = np.zeros((p.shape[0], packets.TRIGGER_WORDS), dtype=np.uint32)
    out[:, 0] = packets.TRIGGER_MARKER
    out[:, 1] = p[:, 4] >> 16
    out[:, 2] = (ts >> np.uint64(32)).astype(np.uint32) & 0xFFFF
    out[:, 3] = (ts >> np.uint64(16)).astype(np.uint32) & 0xFFFF
    out[:, 4] = ts.astype(np.uint32) & 0xFFFF
    out[:, 5] = p[:, 4] & 0xFFFF
    for column, record_word in enumerate(range(5, 10)):
        out[:, 6 + 2 * column] = p[:, record_word] >> 16
        out[:, 7 + 2 * column] = p[:, record_word] & 0xFFFF
    return out.astype(WORD).reshape(-1)


def _even_bounds(count: int, size: int) -> np.ndarray:
    return np.arange(count + 1, dtype=np.int64) * size


# ------------------------------------------------------------------ raw replies


def reply_packets(words: np.ndarray, events: np.ndarray, chosen: np.ndarray,
                  floor: int) -> tuple[Packets, int]:
    """The ``chosen`` decoded packets of one reply's ``words``, as they were in the FIFO."""
    picked = events[chosen]
    keys, floor = running_keys(picked["timestamp"], floor)
    sizes = picked["length"].astype(np.int64) + 1
    return _gather(words, picked["offset"].astype(np.int64), sizes, keys), floor


def reply_kinds(events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which decoded packets are digitizer events and which trigger packets."""
    return events["kind"] == KIND_EVENT, events["kind"] == KIND_TRIGGER

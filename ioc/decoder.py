"""Packet decoder shared by the checker, the receiver and the tests (spec 04).

A buffer holds one board's packets back to back. Walking it one word at a time
in Python is far too slow for 1 MiB buffers (06-quality.md), so the walk is
vectorised: every start marker is found in one numpy pass, the chain of
lengths (next start = offset + N + 1) is verified for all of them at once, and
Python only steps in where the chain breaks. A marker value can also occur
inside trace data; such candidates are simply not on the chain and are ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ioc import packets
from ioc.hardware import WORD

#: ``Decoded.events["kind"]`` values.
KIND_EVENT = 0
KIND_TYPE_F = 1
KIND_TRIGGER = 2

#: One decoded packet. ``length`` is N, the words after word 0.
EVENT_DTYPE = np.dtype(
    [
        ("offset", np.int64),
        ("length", np.int32),
        ("slot", np.uint8),
        ("board", np.uint16),
        ("channel", np.uint8),
        ("header_type", np.uint8),
        ("event_type", np.uint16),
        ("timestamp", np.uint64),
        ("kind", np.uint8),
    ]
)

#: Marker values as they read through a native ``uint32`` view of big-endian
#: words; comparing that view avoids byte-swapping the whole buffer.
NATIVE_MARKER = int(np.array(packets.MARKER, dtype=WORD).view(np.uint32))
NATIVE_TRIGGER_MARKER = int(np.array(packets.TRIGGER_MARKER, dtype=WORD).view(np.uint32))
#: Whether a native view of big-endian words holds byte-swapped values on this host.
_NATIVE_IS_SWAPPED = sys.byteorder == "little"


def as_words(words: np.ndarray) -> np.ndarray:
    """The buffer as a 1-D big-endian word array (converting other integer arrays)."""
    words = np.asarray(words)
    if words.dtype != WORD:
        words = words.astype(WORD)
    return words.reshape(-1)


def native_view(words: np.ndarray) -> np.ndarray:
    """Native-order ``uint32`` view of ``>u4`` words, without a copy.

    On a little-endian host its values are the words byte-swapped: fine for
    comparing with the NATIVE_* markers, use `gather` for field values.
    """
    return words.view(np.uint32)


def gather(native: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Word values at ``index`` (clipped to the buffer) as native ``uint32``.

    Clipping keeps reads near the end of a buffer in bounds; callers reject
    packets that do not fit, so clipped values are never used. ``out`` (a
    ``uint32`` array of ``index.size``) lets hot paths reuse memory.
    """
    picked = np.take(native, index, mode="clip", out=out)
    if _NATIVE_IS_SWAPPED:
        picked.byteswap(inplace=True)
    return picked


class Break(NamedTuple):
    """Where the chain of packets is interrupted.

    ``bad`` False: the word at ``offset`` is not a start marker (it should
    have been). ``bad`` True: a marker at ``offset`` starts a packet that is
    not acceptable. ``resume`` is the candidate index where the walk went on,
    or -1 when it ended there.
    """

    offset: int
    resume: int
    bad: bool


@dataclass
class Chain:
    """The result of following the chain of lengths over the marker candidates."""

    #: ``(first, stop)`` candidate-index ranges accepted, in buffer order.
    runs: list[tuple[int, int]]
    breaks: list[Break]
    candidates: int

    def accepted(self) -> slice | np.ndarray:
        """Indices of accepted candidates: a slice when they are all of them."""
        if len(self.runs) == 1 and self.runs[0] == (0, self.candidates):
            return slice(None)
        if not self.runs:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.runs])


def follow_chain(
    positions: np.ndarray,
    next_positions: np.ndarray,
    acceptable: np.ndarray,
    nwords: int,
    *,
    stop_at_bad: bool,
) -> Chain:
    """Follow packets from word 0 through the sorted marker ``positions``.

    ``next_positions`` is where the packet at each candidate says the next one
    starts; ``acceptable`` says whether that packet may be taken (it fits, its
    fields are sane). Python iterates once per break in the chain, never per
    packet. With ``stop_at_bad`` the walk ends at the first unacceptable
    packet (the checker's fatal errors); otherwise it resumes at the next
    acceptable candidate (the decoder skipping garbage).
    """
    count = positions.size
    linked = acceptable[:-1] & (next_positions[:-1] == positions[1:])
    link_breaks = np.flatnonzero(~linked)
    acceptable_index: np.ndarray | None = None
    runs: list[tuple[int, int]] = []
    breaks: list[Break] = []
    position = 0
    while position < nwords:
        index = int(np.searchsorted(positions, position))
        if index == count or positions[index] != position:
            breaks.append(Break(position, index if index < count else -1, False))
            if index == count:
                break
        if not acceptable[index]:
            if stop_at_bad:
                breaks.append(Break(int(positions[index]), -1, True))
                break
            if acceptable_index is None:
                acceptable_index = np.flatnonzero(acceptable)
            following = int(np.searchsorted(acceptable_index, index + 1))
            resume = int(acceptable_index[following]) if following < acceptable_index.size else -1
            breaks.append(Break(int(positions[index]), resume, True))
            if resume < 0:
                break
            index = resume
        nearest = int(np.searchsorted(link_breaks, index))
        last = int(link_breaks[nearest]) if nearest < link_breaks.size else count - 1
        if acceptable[last]:
            runs.append((index, last + 1))
            position = int(next_positions[last])
        else:
            runs.append((index, last))
            position = int(positions[last])
    return Chain(runs, breaks, count)


@dataclass
class Decoded:
    """Packets of one buffer, in buffer order, and the spans nothing could parse."""

    events: np.ndarray
    #: ``(offset, nwords)`` of garbage spans, in buffer order.
    unknown: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.events.size

    @property
    def unknown_words(self) -> int:
        return sum(nwords for _, nwords in self.unknown)


def decode(words: np.ndarray, *, trigger: bool = False) -> Decoded:
    """Decode a buffer of one board into packets.

    Digitizer buffers hold digitizer events and type-F headers (0xAAAAAAAA,
    3 <= N <= 510, fitting in the buffer). Trigger buffers hold 16-word
    trigger packets (0x0000AAAA) and may also hold type-F headers of the
    trigger board. Everything else is reported in ``unknown``. Field sanity
    (channel ids, header types) is the checker's business, not the decoder's.
    """
    words = as_words(words)
    native = native_view(words)
    nwords = words.size
    positions = np.flatnonzero(native == NATIVE_MARKER)
    w1 = gather(native, positions + 1)
    w3 = gather(native, positions + 3)
    lengths = packets.packet_length(w1).astype(np.int64)
    fits = positions + 4 <= nwords
    if trigger:
        acceptable = fits & (lengths == packets.TYPE_F_HEADER_LENGTH)
        acceptable &= packets.header_type(w3) == packets.HEADER_TYPE_F
        trigger_positions = np.flatnonzero(native == NATIVE_TRIGGER_MARKER)
        positions = np.concatenate([positions, trigger_positions])
        lengths = np.concatenate(
            [lengths, np.full(trigger_positions.size, packets.TRIGGER_WORDS - 1, np.int64)]
        )
        acceptable = np.concatenate(
            [acceptable, trigger_positions + packets.TRIGGER_WORDS <= nwords]
        )
        order = np.argsort(positions, kind="stable")
        positions, lengths, acceptable = positions[order], lengths[order], acceptable[order]
    else:
        acceptable = fits & (lengths >= packets.TYPE_F_HEADER_LENGTH)
        acceptable &= lengths <= packets.MAX_PACKET_LENGTH
    next_positions = positions + lengths + 1
    acceptable &= next_positions <= nwords
    chain = follow_chain(positions, next_positions, acceptable, nwords, stop_at_bad=False)
    offsets = positions[chain.accepted()]
    events = _fields(native, offsets, trigger)
    return Decoded(events, _garbage_spans(chain, positions, nwords))


def _fields(native: np.ndarray, offsets: np.ndarray, trigger: bool) -> np.ndarray:
    """Fill the event records of the accepted packets starting at ``offsets``."""
    events = np.zeros(offsets.size, dtype=EVENT_DTYPE)
    events["offset"] = offsets
    if offsets.size == 0:
        return events
    is_trigger = np.zeros(offsets.size, dtype=bool)
    if trigger:
        is_trigger = gather(native, offsets) == packets.TRIGGER_MARKER
    w1 = gather(native, offsets + 1)
    w2 = gather(native, offsets + 2)
    w3 = gather(native, offsets + 3)
    htype = packets.header_type(w3)
    events["length"] = packets.packet_length(w1)
    events["slot"] = packets.geographic_address(w1)
    events["board"] = packets.board_id(w1)
    events["channel"] = packets.channel_id(w1)
    events["header_type"] = htype
    events["event_type"] = packets.event_type(w3)
    events["timestamp"] = packets.timestamp(w2, w3)
    events["kind"] = np.where(htype == packets.HEADER_TYPE_F, KIND_TYPE_F, KIND_EVENT)
    if is_trigger.any():
        where = np.flatnonzero(is_trigger)
        w4 = gather(native, offsets[where] + 4)
        for name in ("slot", "board", "channel", "header_type"):
            events[name][where] = 0
        events["length"][where] = packets.TRIGGER_WORDS - 1
        events["event_type"][where] = w1[where] & 0xFFFF
        events["timestamp"][where] = (
            (w2[where].astype(np.uint64) & 0xFFFF) << np.uint64(32)
            | (w3[where].astype(np.uint64) & 0xFFFF) << np.uint64(16)
            | w4.astype(np.uint64) & 0xFFFF
        )
        events["kind"][where] = KIND_TRIGGER
    return events


def _garbage_spans(chain: Chain, positions: np.ndarray, nwords: int) -> list[tuple[int, int]]:
    """Turn the chain's breaks into merged ``(offset, nwords)`` garbage spans."""
    spans: list[tuple[int, int]] = []
    for brk in chain.breaks:
        end = int(positions[brk.resume]) if brk.resume >= 0 else nwords
        if spans and spans[-1][0] + spans[-1][1] == brk.offset:
            start = spans[-1][0]
            spans[-1] = (start, end - start)
        else:
            spans.append((brk.offset, end - brk.offset))
    return spans


EventLike = np.void | tuple[int, int]


def _span(event: EventLike) -> tuple[int, int]:
    """``(offset, N)`` of a decoded record or of an ``(offset, N)`` pair."""
    if isinstance(event, np.void):
        return int(event["offset"]), int(event["length"])
    offset, length = event
    return int(offset), int(length)


def event_words(words: np.ndarray, event: EventLike) -> np.ndarray:
    """The whole packet, words 0..N (a view into ``words``)."""
    offset, length = _span(event)
    return words[offset : offset + length + 1]


def payload_words(words: np.ndarray, event: EventLike) -> np.ndarray:
    """Words 1..N of a packet: what a GEB record carries after its header."""
    offset, length = _span(event)
    return words[offset + 1 : offset + length + 1]


def trace_words(words: np.ndarray, event: EventLike) -> np.ndarray:
    """Trace words 14..N of a digitizer event (empty for type-F and trigger packets)."""
    if isinstance(event, np.void) and int(event["kind"]) != KIND_EVENT:
        return words[:0]
    offset, length = _span(event)
    if length < packets.HEADER_WORDS:
        return words[:0]
    return words[offset + packets.HEADER_WORDS : offset + length + 1]


def trace_of(words: np.ndarray, event: EventLike, raw: bool = False) -> np.ndarray:
    """Trace samples of a digitizer event in time order ((N − 13) × 2 of them).

    14-bit ADC values, or with ``raw`` the 16-bit halves including the timing
    and down-sampling marks.
    """
    return packets.trace_samples(trace_words(words, event), raw=raw)

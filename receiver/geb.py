"""GEB records, built for a whole reply at once with numpy (spec 04 "GEB records").

A record is a 16-byte little-endian header (type int32, payload length int32,
48-bit timestamp as uint64) followed by its payload:

- digitizer and type-F packets: words 1..N exactly as received (big-endian
  bytes unchanged; the 0xAAAAAAAA word is what the header replaces);
- master-trigger packets: repacked to 10 little-endian words that carry the
  trigger board's real package data.

Per-event Python would cap the receiver far below the wire rate (06-quality.md
P3), so a reply is turned into records with a handful of array operations: one
row copy when every packet has the same length and they tile the reply (the
usual case: one board, one trace length), one gather otherwise.

`make_batch` also orders the records for the file layout (grouped per board and
channel, per board, or not at all, arrival order kept inside each group) and
sums what the end-of-run summary needs per board and channel. `decode_reply` is
the shared decoder with a shortcut for such tiled replies; `read_records` walks
a written file.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from ioc import packets
from ioc.decoder import (
    EVENT_DTYPE,
    KIND_EVENT,
    KIND_TRIGGER,
    KIND_TYPE_F,
    NATIVE_MARKER,
    Decoded,
    as_words,
    decode,
    gather,
    native_view,
)

#: Default GEB types (spec 04); both are configurable.
GEB_TYPE_DIGITIZER = 14
GEB_TYPE_TRIGGER = 15
GEB_HEADER_BYTES = 16
GEB_HEADER_WORDS = GEB_HEADER_BYTES // 4
#: A trigger packet becomes a 10-word (40-byte) payload.
TRIGGER_RECORD_WORDS = 10
#: The ``channel`` given to every record of a trigger board (its packets and its type-F).
TRIGGER_CHANNEL = packets.TRIGGER_CHANNEL
#: The GEB header as numpy sees it (for readers of the files).
GEB_HEADER_DTYPE = np.dtype([("type", "<i4"), ("length", "<i4"), ("timestamp", "<u8")])

#: How `make_batch` groups records: the file layouts of `receiver.files`.
GROUP_CHANNEL = "channel"  # one group per (board, channel): the classic layout
GROUP_BOARD = "board"  # one group per board
GROUP_NONE = "none"  # one group, arrival order: the single-file layout
GROUPINGS = (GROUP_CHANNEL, GROUP_BOARD, GROUP_NONE)

_LITTLE = np.dtype("<u4")


@dataclass(frozen=True)
class GebTypes:
    """The GEB header types written for digitizer and trigger-board records."""

    digitizer: int = GEB_TYPE_DIGITIZER
    trigger: int = GEB_TYPE_TRIGGER


class Group(NamedTuple):
    """Consecutive records of a batch that go to the same file.

    ``channel`` is -1 when the grouping does not split by channel; ``board``
    is -1 for the single group of `GROUP_NONE`.
    """

    board: int
    channel: int
    trigger: bool
    first: int  # record index range [first, stop) in batch order
    stop: int


class ChannelStats(NamedTuple):
    """Per (board, channel) sums of one batch, for the end-of-run summary."""

    board: np.ndarray
    channel: np.ndarray
    records: np.ndarray
    nbytes: np.ndarray
    first_timestamp: np.ndarray
    last_timestamp: np.ndarray


@dataclass
class Batch:
    """All records of one reply, back to back, in file order."""

    #: The records' bytes (uint8).
    data: np.ndarray
    #: Byte offset of each record in ``data``, plus the end: ``records + 1`` entries.
    bounds: np.ndarray
    #: Per record, in batch order.
    board: np.ndarray
    channel: np.ndarray
    timestamp: np.ndarray
    groups: list[Group]
    stats: ChannelStats

    def __len__(self) -> int:
        return self.bounds.size - 1


def trigger_record_words(packet_words: np.ndarray, board: int) -> np.ndarray:
    """The 10 repacked words (values) of 16-word trigger packets, spec 04 literally.

    ``packet_words`` is a ``(k, 16)`` integer array of word values; returns a
    ``(k, 10)`` ``uint32`` array of values (stored little-endian in files).
    """
    w = np.asarray(packet_words, dtype=np.uint32) & np.uint32(0xFFFF)
    ts = (
        w[:, 2].astype(np.uint64) << np.uint64(32)
        | w[:, 3].astype(np.uint64) << np.uint64(16)
        | w[:, 4].astype(np.uint64)
    )
    out = np.empty((w.shape[0], TRIGGER_RECORD_WORDS), dtype=np.uint32)
    out[:, 0] = packets.MARKER
    out[:, 1] = (TRIGGER_RECORD_WORDS << 16) | ((board & 0xFFF) << 4)
    out[:, 2] = (ts & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    out[:, 3] = (3 << 26) | (0xE << 16) | (ts >> np.uint64(32)).astype(np.uint32)
    for column, (high, low) in enumerate(((1, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15))):
        out[:, 4 + column] = w[:, high] << np.uint32(16) | w[:, low]
    return out


def sources(
    events: np.ndarray, trigger_board: int, trigger_boards: Collection[int] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(board, channel, from_trigger)`` of each decoded packet.

    Trigger packets belong to ``trigger_board``; a type-F header whose board id
    is in ``trigger_boards`` (or equals ``trigger_board``) is the trigger
    board's too. Every record of a trigger board gets `TRIGGER_CHANNEL`.
    """
    kinds = events["kind"]
    board = events["board"].astype(np.int32)
    channel = events["channel"].astype(np.int32)
    from_trigger = kinds == KIND_TRIGGER
    if from_trigger.any():
        board[from_trigger] = trigger_board
    known = {int(b) for b in trigger_boards}
    if trigger_board >= 0:
        known.add(int(trigger_board))
    type_f = kinds == KIND_TYPE_F
    if known and type_f.any():
        from_trigger |= type_f & np.isin(board, list(known))
    channel[from_trigger] = TRIGGER_CHANNEL
    return board, channel, from_trigger


def decode_reply(words: np.ndarray) -> Decoded:
    """`ioc.decoder.decode` of one reply, with a shortcut for the usual one.

    A digitizer reply is nearly always equal-length packets back to back (one
    board, one trace length). Then the chain of lengths is just every (N + 1)-th
    word, checked on a ``(count, N + 1)`` table view without scanning the trace
    words for markers; anything else goes to the full decoder. The result is
    the same either way (the tests compare them).
    """
    words = as_words(words)
    native = native_view(words)
    nwords = words.size
    if nwords >= packets.TYPE_F_WORDS and int(native[0]) == NATIVE_MARKER:
        length = int(packets.packet_length(int(words[1])))
        stride = length + 1
        if packets.TYPE_F_HEADER_LENGTH <= length <= packets.MAX_PACKET_LENGTH and (
            nwords % stride == 0
        ):
            table = words.reshape(-1, stride)
            if bool((native.reshape(-1, stride)[:, 0] == NATIVE_MARKER).all()):
                w1 = table[:, 1].astype(np.uint32)
                if bool((packets.packet_length(w1) == length).all()):
                    return Decoded(_table_events(table, w1, stride))
    return decode(words, trigger=nwords > 0 and int(words[0]) == packets.TRIGGER_MARKER)


def _table_events(table: np.ndarray, w1: np.ndarray, stride: int) -> np.ndarray:
    """Decoded records of a table of equal-length digitizer packets (one per row)."""
    count = table.shape[0]
    w3 = table[:, 3].astype(np.uint32)
    htype = packets.header_type(w3)
    events = np.empty(count, dtype=EVENT_DTYPE)
    events["offset"] = np.arange(0, count * stride, stride)
    events["length"] = stride - 1
    events["slot"] = packets.geographic_address(w1)
    events["board"] = packets.board_id(w1)
    events["channel"] = packets.channel_id(w1)
    events["header_type"] = htype
    events["event_type"] = packets.event_type(w3)
    events["timestamp"] = packets.timestamp(table[:, 2].astype(np.uint32), w3)
    events["kind"] = np.where(htype == packets.HEADER_TYPE_F, KIND_TYPE_F, KIND_EVENT)
    return events


class Scratch:
    """Output memory reused from reply to reply.

    A fresh array per reply costs page faults on every first touch (a third of
    the build time here); a `Batch` built in it is valid until the next build.
    """

    def __init__(self) -> None:
        self._words = np.empty(0, dtype=np.uint32)

    def words(self, count: int) -> np.ndarray:
        if self._words.size < count:
            self._words = np.empty(max(count, 2 * self._words.size), dtype=np.uint32)
        return self._words[:count]


def make_batch(
    words: np.ndarray,
    events: np.ndarray,
    *,
    trigger_board: int = -1,
    trigger_boards: Collection[int] = (),
    grouping: str = GROUP_CHANNEL,
    types: GebTypes = GebTypes(),
    scratch: Scratch | None = None,
) -> Batch:
    """Build the GEB records of the decoded ``events`` of one reply's ``words``.

    ``words`` is the reply as ``>u4`` words, ``events`` its decoded packets
    (`ioc.decoder.EVENT_DTYPE`, buffer order). Trigger packets are repacked
    with ``trigger_board`` as package data (see `sources`). With ``scratch``
    the records are built in its memory (valid until its next use).
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
    if events.size == 0:
        nothing = np.empty(0, dtype=np.int64)
        stats = ChannelStats(nothing, nothing, nothing, nothing, nothing, nothing)
        return Batch(np.empty(0, np.uint8), np.zeros(1, np.int64), nothing, nothing, nothing,
                     [], stats)
    board, channel, from_trigger = sources(events, trigger_board, trigger_boards)
    classic_key = board.astype(np.int64) * 32 + channel
    file_key = {GROUP_CHANNEL: classic_key, GROUP_BOARD: board, GROUP_NONE: None}[grouping]
    order = None if file_key is None else _stable_order(file_key)
    tiled_length = _tiled(events, words.size)
    offsets, lengths = events["offset"], events["length"]
    kinds, timestamp = events["kind"], events["timestamp"]
    if order is not None:
        offsets, lengths, kinds = offsets[order], lengths[order], kinds[order]
        timestamp = timestamp[order]
        board, channel, from_trigger = board[order], channel[order], from_trigger[order]
        classic_key = classic_key[order]
        file_key = file_key[order]
    layout = _Fields(offsets, lengths, kinds == KIND_TRIGGER, timestamp, from_trigger)
    data, bounds = _records(words, layout, order, tiled_length, trigger_board, types, scratch)
    cuts = _cuts(file_key)
    groups = _groups(grouping, cuts, board, channel, from_trigger)
    if grouping == GROUP_CHANNEL:
        stats = _stats(cuts, board, channel, bounds, timestamp)
    else:
        stats = _stats_unsorted(classic_key, board, channel, bounds, timestamp)
    return Batch(data, bounds, board, channel, timestamp, groups, stats)


class _Fields(NamedTuple):
    """Per-record fields `_records` needs, already in file order."""

    offsets: np.ndarray
    lengths: np.ndarray
    is_trigger: np.ndarray
    timestamp: np.ndarray
    from_trigger: np.ndarray


def _stable_order(key: np.ndarray) -> np.ndarray | None:
    """The stable sort of ``key``, or None when it is already sorted (the usual board key)."""
    if key.size < 2 or bool((key[1:] >= key[:-1]).all()):
        return None
    return np.argsort(key, kind="stable")


def _tiled(events: np.ndarray, nwords: int) -> int:
    """N when the packets (buffer order) all have length N and sit back to back from
    word 0, so the reply is a ``(count, N + 1)`` table; else -1."""
    count = events.size
    if count == 0 or (events["kind"] == KIND_TRIGGER).any():
        return -1
    lengths = events["length"]
    length = int(lengths[0])
    stride = length + 1
    if count * stride > nwords or not bool((lengths == length).all()):
        return -1
    if not bool((events["offset"] == np.arange(0, count * stride, stride)).all()):
        return -1
    return length


_ramps = [np.arange(0, dtype=np.int32)]


def _ramp(count: int) -> np.ndarray:
    """``arange(count)`` as int32 from a cached array (made once, grown when needed)."""
    ramp = _ramps[0]
    if ramp.size < count:
        ramp = _ramps[0] = np.arange(max(count, 2 * ramp.size), dtype=np.int32)
    return ramp[:count]


def _records(
    words: np.ndarray,
    fields: _Fields,
    order: np.ndarray | None,
    tiled_length: int,
    trigger_board: int,
    types: GebTypes,
    scratch: Scratch | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The records' bytes and byte bounds, in file order (``order`` of buffer order)."""
    count = fields.offsets.size
    native = native_view(as_words(words))
    payload_words = np.where(
        fields.is_trigger, TRIGGER_RECORD_WORDS, fields.lengths.astype(np.int64)
    )
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(payload_words + GEB_HEADER_WORDS, out=starts[1:])
    total = int(starts[-1])
    out = scratch.words(total) if scratch is not None else np.empty(total, dtype=np.uint32)
    record_types = types.digitizer
    if fields.from_trigger.any():
        record_types = np.where(fields.from_trigger, types.trigger, types.digitizer)
    if tiled_length >= 0:
        # Each packet moves as one opaque item (a memcpy, not 113 word copies), its
        # marker word included: that lands on header word 3, written below.
        packet = np.dtype((np.void, (tiled_length + 1) * 4))
        table = out.reshape(count, tiled_length + GEB_HEADER_WORDS)
        source = native[: packet.itemsize // 4 * count].view(packet)
        target = table[:, GEB_HEADER_WORDS - 1 :].view(packet)[:, 0]
        target[...] = source if order is None else source[order]
        header = table.view(_LITTLE)[:, :GEB_HEADER_WORDS]
    else:
        # Output word i of a record starting at output word s comes from input word
        # offset + 1 + (i - s - 4): one shift per record, repeated, plus a ramp.
        shift = fields.offsets + 1 - starts[:-1] - GEB_HEADER_WORDS
        source = np.repeat(shift.astype(np.int32), payload_words + GEB_HEADER_WORDS)
        source += _ramp(total)
        np.take(native, source, mode="clip", out=out)
        header = out.view(_LITTLE)[starts[:-1, None] + np.arange(GEB_HEADER_WORDS)]
    header[:, 0] = record_types
    header[:, 1] = payload_words * 4
    header[:, 2] = fields.timestamp & np.uint64(0xFFFFFFFF)
    header[:, 3] = fields.timestamp >> np.uint64(32)
    little = out.view(_LITTLE)
    if tiled_length < 0:
        little[starts[:-1, None] + np.arange(GEB_HEADER_WORDS)] = header
    if fields.is_trigger.any():
        where = np.flatnonzero(fields.is_trigger)
        picked = fields.offsets[where][:, None] + np.arange(packets.TRIGGER_WORDS)
        values = gather(native, picked.reshape(-1)).reshape(-1, packets.TRIGGER_WORDS)
        slots = starts[where][:, None] + GEB_HEADER_WORDS + np.arange(TRIGGER_RECORD_WORDS)
        little[slots] = trigger_record_words(values, trigger_board)
    return out.view(np.uint8), starts * 4


def _cuts(key: np.ndarray | None) -> np.ndarray:
    """Start index of each run of equal ``key`` values (``[0]`` for no key)."""
    if key is None:
        return np.zeros(1, dtype=np.int64)
    starts = np.empty(key.size, dtype=bool)
    starts[:1] = True
    np.not_equal(key[1:], key[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def _groups(
    grouping: str,
    cuts: np.ndarray,
    board: np.ndarray,
    channel: np.ndarray,
    from_trigger: np.ndarray,
) -> list[Group]:
    """Runs of records bound for the same file (the batch is already in file order)."""
    count = board.size
    if count == 0:
        return []
    if grouping == GROUP_NONE:
        return [Group(-1, -1, False, 0, count)]
    groups = []
    for first, stop in pairwise([*cuts.tolist(), count]):
        trigger = bool(from_trigger[first])
        split = grouping == GROUP_CHANNEL and not trigger
        groups.append(
            Group(int(board[first]), int(channel[first]) if split else -1, trigger, first, stop)
        )
    return groups


def _stats(
    cuts: np.ndarray,
    board: np.ndarray,
    channel: np.ndarray,
    bounds: np.ndarray,
    timestamp: np.ndarray,
) -> ChannelStats:
    """Per (board, channel) sums of records already grouped by (board, channel)."""
    stop = np.append(cuts[1:], board.size).astype(np.int64)
    return ChannelStats(
        board=board[cuts],
        channel=channel[cuts],
        records=stop - cuts,
        nbytes=bounds[stop] - bounds[cuts],
        first_timestamp=timestamp[cuts],
        last_timestamp=timestamp[stop - 1],
    )


def _stats_unsorted(
    classic_key: np.ndarray,
    board: np.ndarray,
    channel: np.ndarray,
    bounds: np.ndarray,
    timestamp: np.ndarray,
) -> ChannelStats:
    """`_stats` for records in another order: grouped first, arrival order kept."""
    order = _stable_order(classic_key)
    if order is None:
        return _stats(_cuts(classic_key), board, channel, bounds, timestamp)
    sizes = np.diff(bounds)[order]
    regrouped = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=regrouped[1:])
    return _stats(_cuts(classic_key[order]), board[order], channel[order], regrouped,
                  timestamp[order])


# --------------------------------------------------------------- reading


#: What `read_records` returns per record; ``offset`` is where its header starts.
RECORD_DTYPE = np.dtype(
    [("offset", np.int64), ("type", np.int32), ("length", np.int32), ("timestamp", np.uint64)]
)


def scan_records(data: bytes | bytearray | memoryview) -> tuple[np.ndarray, int]:
    """The complete records at the start of ``data`` (`RECORD_DTYPE`) and the byte
    offset where they stop: the start of a record cut off by the end of the data,
    or the end of the data. A stream is read block by block with it.

    Files are mostly runs of equal-length records, so the walk guesses that the
    next records have the current length and checks a growing block of them at
    once, stepping record by record only where the length changes. Raises
    ValueError for a negative record length (not a GEB file).
    """
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    size = raw.size
    field = np.arange(4, 8)
    found: list[np.ndarray] = []
    position, block = 0, 16
    while position + GEB_HEADER_BYTES <= size:
        length = int(raw[position + field].view("<i4")[0])
        if length < 0:
            raise ValueError(f"negative record length at byte {position}")
        step = GEB_HEADER_BYTES + length
        count = min(block, (size - position) // step)
        if count == 0:
            break
        starts = position + step * np.arange(count, dtype=np.int64)
        same = raw[starts[:, None] + field].copy().view("<i4")[:, 0] == length
        run = count if bool(same.all()) else max(1, int(np.argmin(same)))
        found.append(starts[:run])
        position += run * step
        block = block * 2 if run == count else 16
    offsets = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    records = np.zeros(offsets.size, dtype=RECORD_DTYPE)
    records["offset"] = offsets
    if offsets.size:
        heads = raw[offsets[:, None] + np.arange(GEB_HEADER_BYTES)].view(GEB_HEADER_DTYPE)[:, 0]
        for name in ("type", "length", "timestamp"):
            records[name] = heads[name]
    return records, position


def read_records(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Walk the records of a GEB file's bytes (`RECORD_DTYPE`, file order).

    Raises ValueError when the chain of lengths does not end exactly at the end
    of the data (a truncated or corrupt file).
    """
    records, end = scan_records(data)
    size = memoryview(data).nbytes
    if end != size:
        if size - end < GEB_HEADER_BYTES:
            raise ValueError(f"a partial record header at byte {end}")
        raise ValueError(
            f"records do not end at the end of the data (the record at byte {end} "
            f"needs more than the {size - end} bytes left)"
        )
    return records


def payload_of(data: bytes | bytearray | memoryview, record: np.void) -> bytes:
    """The payload bytes of one record found by `read_records`."""
    start = int(record["offset"]) + GEB_HEADER_BYTES
    return bytes(memoryview(data)[start : start + int(record["length"])])

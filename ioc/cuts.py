"""Where a buffer's payload may be cut: whole packets, one board, bounded size.

A reply of the data protocol (spec 05) carries whole packets only, and so does
every piece of a buffer that retention moves into another buffer. A board's
events mostly share one size, so the chain of packet lengths is first followed
in runs of equal-size packets, reading only the words on the chain; payloads of
many sizes or with garbage fall back to the decoder's walk over every marker.
"""

from __future__ import annotations

import sys

import numpy as np

from ioc import decoder, packets
from ioc.pool import Buffer

#: A buffer of master-trigger data is cut at whole 16-word packets.
TRIGGER_BOARD_TYPE = 4
TRIGGER_PACKET_BYTES = packets.TRIGGER_WORDS * 4

#: Runs of equal-size packets followed before falling back to a scan of every marker.
MAX_EQUAL_RUNS = 16


def _native(word: int) -> int:
    """How a big-endian word reads through a native ``uint32`` view."""
    return int.from_bytes(word.to_bytes(4, "big"), sys.byteorder)


_NATIVE_LENGTH_MASK = _native(0x7FF << 16)


def _acceptable_length(length: int) -> bool:
    """A packet length N the decoder accepts (type-F header up to the largest event)."""
    return packets.TYPE_F_HEADER_LENGTH <= length <= packets.MAX_PACKET_LENGTH


def uniform_packet_words(words: np.ndarray) -> int:
    """Size in words of every packet when the payload is one chain of equal-size packets, else 0.

    The usual digitizer buffer (one trace length per board) is checked with two
    strided comparisons of the words on the chain, without reading the traces.
    """
    nwords = words.size
    if nwords < packets.TYPE_F_WORDS:
        return 0
    native = decoder.native_view(words)
    if native[0] != decoder.NATIVE_MARKER:
        return 0
    length = int(packets.packet_length(int(words[1])))
    stride = length + 1
    if not _acceptable_length(length) or nwords % stride:
        return 0
    if not (native[::stride] == decoder.NATIVE_MARKER).all():
        return 0
    if not ((native[1::stride] & _NATIVE_LENGTH_MASK) == _native(length << 16)).all():
        return 0
    return stride


def event_boundaries(words: np.ndarray) -> np.ndarray:
    """Word offsets where a reply may be cut in a digitizer payload, ending with its size.

    Follows the chain of packet lengths from word 0. A board's events mostly
    share one size, so the chain is first followed in runs of equal-size
    packets, checking only the words on the chain (strided views, no scan of
    the trace words). Payloads with many sizes or garbage fall back to the
    decoder's walk over every marker. Where the chain breaks (garbage), the
    end of the last whole packet and the next packet start found by the walk
    are boundaries; garbage in between is cut at word boundaries by the caller.
    """
    native = decoder.native_view(words)
    chained = _chain_in_equal_runs(words, native)
    if chained is not None:
        return chained
    return _chain_over_markers(words, native)


def _chain_in_equal_runs(words: np.ndarray, native: np.ndarray) -> np.ndarray | None:
    """Packet starts (and the end) when the chain is a few runs of equal-size packets, else None."""
    nwords = words.size
    pieces: list[np.ndarray] = []
    position = 0
    for _ in range(MAX_EQUAL_RUNS):
        if position == nwords:
            pieces.append(np.array([nwords], dtype=np.int64))
            return np.concatenate(pieces)
        if position + packets.TYPE_F_WORDS > nwords or native[position] != decoder.NATIVE_MARKER:
            return None
        length = int(packets.packet_length(int(words[position + 1])))
        stride = length + 1
        count = (nwords - position) // stride
        if not _acceptable_length(length) or count == 0:
            return None
        stop = position + count * stride
        on_chain = native[position:stop:stride] == decoder.NATIVE_MARKER
        on_chain &= packets.packet_length(words[position + 1 : stop : stride]) == length
        broken = np.flatnonzero(~on_chain)
        good = count if broken.size == 0 else int(broken[0])
        pieces.append(np.arange(position, position + good * stride, stride, dtype=np.int64))
        position += good * stride
    return None


def _chain_over_markers(words: np.ndarray, native: np.ndarray) -> np.ndarray:
    """Packet starts by finding every marker and following the chain over them (any content)."""
    nwords = words.size
    positions = np.flatnonzero(native == decoder.NATIVE_MARKER)
    if positions.size == 0:
        return np.array([0, nwords], dtype=np.int64)
    lengths = packets.packet_length(decoder.gather(native, positions + 1)).astype(np.int64)
    next_positions = positions + lengths + 1
    acceptable = (positions + packets.TYPE_F_WORDS <= nwords) & (next_positions <= nwords)
    acceptable &= (lengths >= packets.TYPE_F_HEADER_LENGTH) & (lengths <= packets.MAX_PACKET_LENGTH)
    chain = decoder.follow_chain(positions, next_positions, acceptable, nwords, stop_at_bad=False)
    pieces = [np.array([0, nwords], dtype=np.int64)]
    for first, stop in chain.runs:
        if stop > first:
            pieces.append(positions[first:stop])
            pieces.append(next_positions[stop - 1 : stop])
    return np.unique(np.concatenate(pieces))


def reply_ends(buf: Buffer, limit: int) -> list[int]:
    """Byte offsets where the successive replies of ``buf`` end, from ``buf.sent_bytes``.

    Each reply holds whole packets and at most ``limit`` bytes; boundaries are
    only computed when the rest does not fit in one reply. Garbage longer than
    ``limit`` is cut at word boundaries.
    """
    start, end = buf.sent_bytes, buf.nbytes
    if end - start <= limit:
        return [end]
    word_limit = limit - limit % 4
    if buf.board_type == TRIGGER_BOARD_TYPE and not buf.is_type_f:
        step = limit - limit % TRIGGER_PACKET_BYTES or word_limit
        return [*range(start + step, end, step), end]
    words = buf.words[start // 4 : end // 4]
    stride = (buf.packet_words or uniform_packet_words(words)) * 4
    if 0 < stride <= limit:
        step = limit - limit % stride
        return [*range(start + step, end, step), end]
    bounds = event_boundaries(words) * 4 + start
    ends: list[int] = []
    cut = start
    while end - cut > limit:
        best = int(bounds[int(np.searchsorted(bounds, cut + limit, side="right")) - 1])
        cut = best if best > cut else cut + word_limit
        ends.append(cut)
    ends.append(end)
    return ends


def packet_prefix(buf: Buffer, room: int) -> int:
    """Bytes of the largest run of whole packets at the start of ``buf``'s payload that fits
    in ``room`` bytes (0 when not even one does). Retention moves such a run into another
    buffer, so unlike `reply_ends` it never cuts inside a packet."""
    size = buf.nbytes - buf.sent_bytes
    if size <= room:
        return size
    if buf.board_type == TRIGGER_BOARD_TYPE and not buf.is_type_f:
        return room - room % TRIGGER_PACKET_BYTES
    words = buf.words[buf.sent_bytes // 4 : buf.nbytes // 4]
    stride = (buf.packet_words or uniform_packet_words(words)) * 4
    if stride:
        return room - room % stride
    bounds = event_boundaries(words) * 4
    return int(bounds[int(np.searchsorted(bounds, room, side="right")) - 1])

"""outLoop's per-buffer check of digitizer data (spec 02 §3, codes 1..8).

The original walked at most 128 events per buffer in C to save CPU; here every
event is checked, which only stays affordable because the packet chain is
followed vectorised (ioc.decoder.follow_chain) and the walk over the accepted
headers, for the per-channel timestamp order, the first event of each channel
and the live spectra, is one compiled pass (``ioc/_headerwalk.c``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ioc import _headerwalk, packets
from ioc.decoder import (
    NATIVE_MARKER,
    Break,
    as_words,
    follow_chain,
    gather,
    native_view,
)

CODE_EMPTY = 1
CODE_NO_MARKER = 2
CODE_SHORT_HEADER = 3
CODE_PAST_END = 4
CODE_TOO_LONG = 5
CODE_TYPE_F_CHANNEL = 6
CODE_CHANNEL = 7
CODE_TIMESTAMP_ORDER = 8

#: The original's cap (DeepCheckEnable = 0 walks only this many events).
SHALLOW_EVENTS = 128

#: Channel ids a packet can carry (4 bits), for the per-card timestamp memory.
_CHANNEL_IDS = 16
_UNKNOWN = -1


@dataclass(frozen=True)
class CheckError:
    """One error found in a buffer; ``offset`` is in words from the buffer start."""

    code: int
    offset: int
    extra1: int
    extra2: int
    fatal: bool

    def record(self) -> tuple[int, int, int, int]:
        """The first-error record [code, offset, extra1, extra2] of spec 02 §3."""
        return (self.code, self.offset, self.extra1, self.extra2)


@dataclass
class CheckResult:
    """What the walk of one buffer found."""

    #: Packets walked (digitizer events and type-F headers).
    events: int = 0
    #: In buffer order; at most one fatal error, the last (the walk stops there).
    errors: list[CheckError] = field(default_factory=list)
    fatal: bool = False
    #: channel -> (offset, N) of the first non-type-F event walked, for trace
    #: capture. Filled for fatal buffers too; such buffers are discarded, so
    #: callers capturing traces of delivered data skip them.
    first_event_by_channel: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Words per packet when the walk found one unbroken chain of equal-size packets
    #: over the whole buffer, else 0: the sender then cuts replies without a walk of its own.
    packet_words: int = 0
    #: Events counted into the live spectra's histogram (`Checker.check`'s ``histogram``).
    counted: int = 0


def _uniform_packet_words(offsets: np.ndarray, lengths: np.ndarray, nwords: int) -> int:
    """Words per packet if the unbroken chain at ``offsets`` is equal-size packets to the end."""
    stride = int(lengths[0]) + 1
    if offsets.size * stride != nwords or int(offsets[-1]) + stride != nwords:
        return 0
    return stride if int(lengths.min()) == int(lengths.max()) else 0


class _Scratch:
    """Arrays reused from buffer to buffer.

    A fresh temporary of ~100 KiB per step costs page faults when the
    allocator hands memory back to the system between buffers; measured
    here, that tripled the time of a header-only buffer.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type) -> np.ndarray:
        """``size`` elements of the array ``name`` (contents undefined)."""
        array = self._arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            array = np.empty(max(size, 1024), dtype=dtype)
            self._arrays[name] = array
        return array[:size]

    def bools(self, size: int) -> np.ndarray:
        return self.get("bools", size, np.bool_)


class Checker:
    """Checks digitizer buffers and remembers each (card, channel)'s last timestamp.

    Not thread-safe: one outLoop thread calls `check`, `forget` and `forget_all`.
    """

    def __init__(self, cards: int = 7) -> None:
        self._last = np.full((cards, _CHANNEL_IDS), _UNKNOWN, dtype=np.int64)
        self._scratch = _Scratch()

    def forget(self, card: int) -> None:
        """Forget a card's timestamps (its FIFO was reset)."""
        self._last[card] = _UNKNOWN

    def forget_all(self) -> None:
        """Forget every card's timestamps (run start)."""
        self._last[:] = _UNKNOWN

    def last_timestamp(self, card: int, channel: int) -> int | None:
        """The remembered 48-bit timestamp of (card, channel), if any."""
        value = int(self._last[card, channel])
        return None if value == _UNKNOWN else value

    def check(
        self,
        words: np.ndarray,
        card: int,
        *,
        timestamps: bool = True,
        max_events: int | None = None,
        histogram: np.ndarray | None = None,
    ) -> CheckResult:
        """Walk one digitizer buffer (``>u4`` words) of ``card``.

        ``timestamps`` False skips code 8 (and leaves the remembered
        timestamps alone); ``max_events`` stops the walk after that many
        packets, as the original did with 128. ``histogram`` (a card's live
        spectra, `ioc.spectra`) counts the walked events, unless the buffer has
        a fatal error.
        """
        words = as_words(words)
        nwords = words.size
        if nwords == 0:
            return CheckResult(errors=[CheckError(CODE_EMPTY, 0, 0, 0, True)], fatal=True)
        scratch = self._scratch
        native = native_view(words)
        positions = np.flatnonzero(np.equal(native, NATIVE_MARKER, out=scratch.bools(nwords)))
        count = positions.size
        w1 = self._gather(native, positions, 1, "w1")
        w3 = self._gather(native, positions, 3, "w3")
        lengths = np.right_shift(w1, 16, out=scratch.get("lengths", count, np.uint32))
        np.bitwise_and(lengths, 0x7FF, out=lengths)
        channels = np.bitwise_and(
            w1, 0xF, out=scratch.get("channels", count, np.uint8), casting="unsafe"
        )
        next_positions = np.add(positions, lengths, out=scratch.get("next", count, np.intp))
        np.add(next_positions, 1, out=next_positions)
        acceptable = self._acceptable(positions, lengths, next_positions, channels, w3, nwords)
        chain = follow_chain(positions, next_positions, acceptable, nwords, stop_at_bad=True)

        accepted = chain.accepted()
        offsets = positions[accepted]
        breaks = chain.breaks
        if max_events is not None and offsets.size >= max_events:
            # The walk ends right after the last allowed packet: nothing later is seen.
            offsets = offsets[:max_events]
            accepted = (
                slice(0, max_events) if isinstance(accepted, slice) else accepted[:max_events]
            )
            walked_to = int(offsets[-1]) if max_events > 0 else -1
            breaks = [brk for brk in breaks if brk.offset <= walked_to]

        errors = [self._break_error(words, brk) for brk in breaks]
        # At most one break is fatal, the last (the walk stops there); order errors never
        # are. A buffer with a fatal error is discarded: its events are not counted.
        fatal = any(error.fatal for error in errors)
        result = CheckResult(events=int(offsets.size), fatal=fatal)
        if offsets.size:
            order_errors, result.first_event_by_channel, result.counted = _headerwalk.walk(
                words,
                np.ascontiguousarray(offsets, dtype=np.int64),
                self._last[card] if timestamps else None,
                None if fatal else histogram,
            )
            errors += [
                CheckError(CODE_TIMESTAMP_ORDER, offset, previous, stamp, False)
                for offset, previous, stamp in order_errors
            ]
            if not breaks:
                result.packet_words = _uniform_packet_words(offsets, lengths[accepted], nwords)
        if len(errors) > 1:
            errors.sort(key=lambda error: error.offset)
        result.errors = errors
        return result

    def _gather(self, native: np.ndarray, positions: np.ndarray, word: int, name: str):
        """Word ``word`` of every packet starting at ``positions``, into scratch ``name``."""
        index = np.add(positions, word, out=self._scratch.get("index", positions.size, np.intp))
        return gather(native, index, out=self._scratch.get(name, positions.size, np.uint32))

    def _acceptable(
        self,
        positions: np.ndarray,
        lengths: np.ndarray,
        next_positions: np.ndarray,
        channels: np.ndarray,
        w3: np.ndarray,
        nwords: int,
    ) -> np.ndarray:
        """Which candidates start a packet without error codes 3..7."""
        scratch = self._scratch
        count = positions.size
        ok = np.less(channels, packets.DIGITIZER_CHANNELS, out=scratch.get("ok", count, np.bool_))
        test = scratch.get("test", count, np.bool_)
        header_types = np.right_shift(w3, 16, out=scratch.get("htype", count, np.uint32))
        np.bitwise_and(header_types, 0xF, out=header_types)
        is_type_f = np.equal(
            header_types, packets.HEADER_TYPE_F, out=scratch.get("is_f", count, np.bool_)
        )
        if is_type_f.any():
            np.greater_equal(channels, packets.CH_END_OF_RUN, out=test)
            np.copyto(ok, test, where=is_type_f)
        ok &= np.less_equal(positions, nwords - 4, out=test)
        ok &= np.less_equal(lengths, packets.MAX_PACKET_LENGTH, out=test)
        ok &= np.less_equal(next_positions, nwords, out=test)
        return ok

    @staticmethod
    def _break_error(words: np.ndarray, brk: Break) -> CheckError:
        """The error of a place where the chain broke (codes 2..7)."""
        nwords = words.size
        offset = brk.offset
        if not brk.bad:
            return CheckError(CODE_NO_MARKER, offset, nwords, int(words[offset]), brk.resume < 0)
        left = nwords - offset
        if left < 4:
            return CheckError(CODE_SHORT_HEADER, offset, nwords, left, True)
        w1, w3 = int(words[offset + 1]), int(words[offset + 3])
        length = packets.packet_length(w1)
        channel = packets.channel_id(w1)
        htype = packets.header_type(w3)
        if length > packets.MAX_PACKET_LENGTH:
            return CheckError(CODE_TOO_LONG, offset, nwords, length, True)
        if offset + length + 1 > nwords:
            return CheckError(CODE_PAST_END, offset, nwords, length, True)
        if htype == packets.HEADER_TYPE_F:
            return CheckError(CODE_TYPE_F_CHANNEL, offset, channel, length, True)
        return CheckError(CODE_CHANNEL, offset, channel, htype, True)

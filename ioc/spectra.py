"""Live per-channel energy histograms, event counts and pile-up counts of a run (issue 17).

outLoop hands every buffer it checked to `Spectra.add` with the packets the
check walked, so no packet is decoded twice. The energy of an event in
digitizer units is the amplitude (post-rise sum − pre-rise sum) / M of spec 04
with M = `FILTER_LENGTH` = 256, taken as the difference of the sums' upper 16
bits, post // 256 − pre // 256: exact when the sums' low bytes agree (as the
simulator's do), else within one unit either way and unbiased, and one numpy
pass cheaper than the floor of the quotient. It is histogrammed at full
resolution (one bin per digitizer unit) and turned into a calibrated keV
spectrum only when published (`rebin`), so a new calibration applies to the
whole run at once and the check path never sees it.

Cost matters here (P12 asks at most 5 % of the check): when the check found
equal-size packets (the usual case) the fields are read through one structured
view of the buffer instead of gathered event by event, and what remains per
buffer is a handful of numpy passes and one ``np.add.at``: 11-18 % of the P2b
check as measured (README, Benchmarks), over the target.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

from ioc import packets
from ioc.decoder import gather, native_view

CHANNELS = packets.DIGITIZER_CHANNELS
#: M of spec 04: samples in each energy sum (the simulator's filter length). Another M
#: only scales the digitizer units, which the channel's CalGain takes up.
FILTER_LENGTH = 256
#: Full-resolution bins per channel: amplitudes 0..16383 digitizer units (a 14-bit ADC).
RAW_BINS = 1 << 14
#: Each channel's row holds every amplitude modulo 2**16: 0..RAW_BINS-1 are shown, the
#: rest (higher ones, and negative ones, which wrap to the top) only counted. Wrapping
#: in 16-bit arithmetic costs no pass, where clamping to a bin would cost one; the
#: pages of the rows no event reaches are never touched, so they take no memory.
_ROW = 1 << 16
#: A card's histogram holds the rows of events without pile-up, then those with it:
#: the pile-up flag becomes part of the index, which costs less than counting apart.
_PILED = CHANNELS * _ROW
#: Start of each channel id's row (ids 10..15 never reach `Spectra.add`'s index).
_CHANNEL_ROWS = np.arange(16, dtype=np.intp) * _ROW
#: Bins of a published spectrum (the Spectrum<n> waveform length) unless the crate's
#: ``spectrum_bins`` says otherwise; at most 64 KiB of LONG values per waveform.
SPECTRUM_BINS = 4096
MAX_SPECTRUM_BINS = 16384
DEFAULT_KEV_PER_BIN = 1.0

# Byte positions, within a packet, of the fields the energy needs (big-endian words).
_PRE_MIDDLE = 8 * 4 + 1  # word 8 bits 23:8: pre-rise sum bits 23:8 (16 bits)
_POST_HIGH = 9 * 4 + 2  # word 9 bits 15:0: post-rise sum bits 23:8
_FLAGS_HIGH_BYTE = 4 * 4 + 2  # word 4 bits 15:8; bit 15 is pile-up
_ONE = np.uint32(1)  # of the histogram's type: np.add.at's fast path
_PILE_UP_BIT = 0x80  # bit 15 of the word is the top bit of this byte


@dataclass(frozen=True)
class ChannelCounts:
    """One card's figures at one moment (copies: the caller may keep them)."""

    #: (CHANNELS, RAW_BINS) events per amplitude 0..RAW_BINS-1.
    histogram: np.ndarray
    #: Events per channel since the last reset (all of them, inside the bins or not).
    events: np.ndarray
    pile_ups: np.ndarray
    #: Bumped by every add or reset of the card: unchanged means nothing to publish.
    serial: int
    #: Bumped by every reset of the card: a rate must not be taken across one.
    resets: int


@functools.cache
def _layout(packet_words: int) -> np.dtype:
    """One packet of ``packet_words`` words as a record of the fields the spectra read."""
    return np.dtype(
        {
            "names": ["flags_high", "pre_middle", "post_high"],
            "formats": ["u1", ">u2", ">u2"],
            "offsets": [_FLAGS_HIGH_BYTE, _PRE_MIDDLE, _POST_HIGH],
            "itemsize": packet_words * 4,
        }
    )


def _header_fields(words: np.ndarray, count: int, packet_words: int) -> np.ndarray:
    """The energy and flag fields of ``count`` equal-size packets filling ``words``,
    as one structured view of the buffer (no copy)."""
    return words.view(np.uint8)[: count * packet_words * 4].view(_layout(packet_words))


def amplitudes_uniform(fields: np.ndarray) -> np.ndarray:
    """Amplitudes (digitizer units, modulo 2**16) of the packets of `_header_fields`.

    post // 256 − pre // 256, read straight from the big-endian buffer: no gather.
    """
    return np.subtract(fields["post_high"], fields["pre_middle"], dtype=np.uint16)


def amplitudes_at(words: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Amplitudes (digitizer units, modulo 2**16) of the packets starting at ``offsets``."""
    native = native_view(words)
    w8 = gather(native, offsets + 8).astype(np.intp)
    w9 = gather(native, offsets + 9).astype(np.intp)
    return ((w9 & 0xFFFF) - (w8 >> 8 & 0xFFFF)).astype(np.uint16)


def pile_up_flags_at(words: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    """Whether each packet at ``offsets`` carries the pile-up flag (word 4 bit 15);
    None if none does."""
    piled = (gather(native_view(words), offsets + 4) & 0x8000) != 0
    return piled if piled.any() else None


class Spectra:
    """Histograms and counters of every card; outLoop adds, the publisher reads.

    The lock is held for one buffer's ``np.add.at`` or one card's copy, never longer.
    """

    def __init__(self, cards: int) -> None:
        self._histograms = [self._empty() for _ in range(cards)]
        self._serials = [0] * cards
        self._resets = [0] * cards
        self._lock = threading.Lock()

    def add(
        self,
        words: np.ndarray,
        card: int,
        offsets: np.ndarray,
        channels: np.ndarray,
        lengths: np.ndarray,
        packet_words: int,
    ) -> None:
        """Count the walked packets of one checked buffer (type-F headers are skipped)."""
        count = offsets.size
        if count == 0:
            return
        if packet_words >= packets.HEADER_WORDS and count * packet_words == words.size:
            fields = _header_fields(words, count, packet_words)
            amplitude = amplitudes_uniform(fields)
            flags = fields["flags_high"]
            piled = flags >= _PILE_UP_BIT if flags.max() >= _PILE_UP_BIT else None
        else:
            events = (channels < CHANNELS) & (lengths >= packets.DIGITIZER_HEADER_LENGTH)
            offsets, channels = offsets[events], channels[events]
            if offsets.size == 0:
                return
            amplitude = amplitudes_at(words, offsets)
            piled = pile_up_flags_at(words, offsets)
        index = np.take(_CHANNEL_ROWS, channels)
        index += amplitude
        if piled is not None:  # rare: the extra passes are paid only by buffers with one
            index += np.multiply(piled, _PILED, dtype=np.intp)
        with self._lock:
            np.add.at(self._histograms[card], index, _ONE)
            self._serials[card] += 1

    @staticmethod
    def _empty() -> np.ndarray:
        """A card's zeroed histogram. Fresh pages rather than zeros written into the old
        ones: untouched pages take no memory, and most of the rows stay untouched.
        32-bit counts: half the cache misses of 64-bit ones in np.add.at."""
        return np.zeros(2 * _PILED, dtype=np.uint32)

    def reset(self, card: int | None = None) -> None:
        """Zero one card (a SpectrumReset put) or every card (run start)."""
        cards = range(len(self._serials)) if card is None else (card,)
        with self._lock:
            for each in cards:
                self._histograms[each] = self._empty()
                self._serials[each] += 1
                self._resets[each] += 1

    def serial(self, card: int) -> int:
        return self._serials[card]

    def counts(self, card: int) -> ChannelCounts:
        with self._lock:
            rows = self._histograms[card].reshape(2, CHANNELS, _ROW)
            shown = rows[:, :, :RAW_BINS].astype(np.int64)
            totals = rows.sum(axis=2, dtype=np.int64)
            serial, resets = self._serials[card], self._resets[card]
        return ChannelCounts(shown[0] + shown[1], totals.sum(axis=0), totals[1], serial, resets)


def rebin(
    histogram: np.ndarray, gain: float, offset: float, kev_per_bin: float,
    bins: int = SPECTRUM_BINS,
) -> np.ndarray:
    """One channel's full-resolution ``histogram`` as a keV spectrum of ``bins`` bins.

    A digitizer-unit bin u counts at E = gain × u + offset keV, into spectrum bin
    floor(E / kev_per_bin);
    events outside 0..bins × kev_per_bin keV are not shown.
    """
    energy = gain * np.arange(RAW_BINS) + offset
    target = np.floor(energy / kev_per_bin)
    inside = (target >= 0) & (target < bins)
    return np.bincount(
        target[inside].astype(np.intp), weights=histogram[inside], minlength=bins
    ).astype(np.int32)

"""Live per-channel energy histograms, event counts and pile-up counts of a run (issue 17).

outLoop's check counts every event it walks into its card's histogram, in the
same compiled pass over the headers that checks their timestamp order
(``ioc/_headerwalk.c``), so the spectra add only their increments to what the
check reads anyway (P12 asks them to cost at most 5 % of the check). The energy
of an event in digitizer units is the amplitude (post-rise sum − pre-rise sum) / M
of spec 04 with M = 256, taken as the difference of the sums' upper 16 bits,
post // 256 − pre // 256: exact when the sums' low bytes agree (as the
simulator's do), else within one unit either way and unbiased. It is
histogrammed at full resolution (one bin per digitizer unit) and turned into a
calibrated keV spectrum only when published (`rebin`), so a new calibration
applies to the whole run at once and the check path never sees it.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass

import numpy as np

from ioc import packets

CHANNELS = packets.DIGITIZER_CHANNELS
#: M of spec 04: samples in each energy sum (the simulator's filter length), the 256 the
#: compiled count divides by (as the sums' upper 16 bits). Another M only scales the
#: digitizer units, which the channel's CalGain takes up.
FILTER_LENGTH = 256
#: Full-resolution bins per channel: amplitudes 0..16383 digitizer units (a 14-bit ADC).
RAW_BINS = 1 << 14
#: Each channel's row holds every amplitude modulo 2**16: 0..RAW_BINS-1 are shown, the
#: rest (higher ones, and negative ones, which wrap to the top) only counted. The pages
#: of the rows no event reaches are never touched, so they take no memory.
_ROW = 1 << 16
#: A card's histogram holds the rows of events without pile-up, then those with it
#: (the layout `_headerwalk.walk` fills).
_PILED = CHANNELS * _ROW
#: Bins of a published spectrum (the Spectrum<n> waveform length) unless the crate's
#: ``spectrum_bins`` says otherwise; at most 64 KiB of LONG values per waveform.
SPECTRUM_BINS = 4096
MAX_SPECTRUM_BINS = 16384
DEFAULT_KEV_PER_BIN = 1.0


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


class Spectra:
    """Histograms and counters of every card; outLoop adds, the publisher reads.

    outLoop never waits for a reader: it counts into the card's table without a
    lock (a lock around each buffer's count cost about 1 % of the check, and a
    reader's copy of a card, milliseconds, would have held the check up). A copy
    taken while a buffer is being counted holds part of it, and the next copy
    the rest: counts only grow, so rates and spectra come out right from one
    publication to the next. A reset puts a fresh table in place (one reference,
    swapped at once); a buffer being counted just then goes into the old one,
    as if the reset had come a moment later.
    """

    def __init__(self, cards: int) -> None:
        self._histograms = [self._empty() for _ in range(cards)]
        #: Buffers that added events, per card: written by the counting thread only.
        self._added = [0] * cards
        #: Resets per card, written under the lock (they come from several threads), which
        #: readers hold too, so that a copy's table and reset count agree; outLoop never takes it.
        self._resets = [0] * cards
        self._reset_lock = threading.Lock()

    def table(self, card: int) -> np.ndarray:
        """The card's histogram to count one checked buffer into (`Checker.check`'s
        ``histogram``); then say how many events it added (`added`). One thread counts."""
        return self._histograms[card]

    def added(self, card: int, events: int) -> None:
        """``events`` were counted into the card's table: only a buffer that added some
        makes the card's spectra change (and be published again)."""
        if events:
            self._added[card] += 1

    @staticmethod
    def _empty() -> np.ndarray:
        """A card's zeroed histogram. Fresh pages rather than zeros written into the old
        ones: untouched pages take no memory, and most of the rows stay untouched. Mapped
        here (private: reading a hole costs no page) rather than by numpy, which asks for
        huge pages on arrays this large, so that one count made 2 MiB resident and a
        used card's 5 MiB table whole (P7: 40 MB less after runs at load).
        32-bit counts: half the cache misses of 64-bit ones."""
        table = mmap.mmap(-1, 2 * _PILED * 4, flags=mmap.MAP_PRIVATE)
        return np.frombuffer(table, dtype=np.uint32)

    def reset(self, card: int | None = None) -> None:
        """Zero one card (a SpectrumReset put) or every card (run start)."""
        cards = range(len(self._resets)) if card is None else (card,)
        with self._reset_lock:
            for each in cards:
                self._histograms[each] = self._empty()
                self._resets[each] += 1

    def serial(self, card: int) -> int:
        """Grows with every change of the card's counts (a count or a reset)."""
        return self._added[card] + self._resets[card]

    def counts(self, card: int) -> ChannelCounts:
        with self._reset_lock:  # the table and its reset count belong together
            # The serial before the copy: a count landing during it makes the next newer.
            serial, resets = self.serial(card), self._resets[card]
            rows = self._histograms[card].reshape(2, CHANNELS, _ROW)
            shown = rows[:, :, :RAW_BINS].astype(np.int64)
            totals = rows.sum(axis=2, dtype=np.int64)
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

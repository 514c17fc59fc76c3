"""Publishes the live per-channel monitoring PVs once a second (issue 17).

Spectrum<n>, Rate<n> and PileUp<n> of every digitizer board come from
`ioc.spectra.Spectra`, which outLoop fills. A spectrum is rebinned into keV
with the channel's CalGain/CalOffset and the board's SpectrumKeVPerBin as the
records hold them at that moment, and only when the counts or the calibration
changed: 4096-element arrays at 1 Hz keep Channel Access and PV Access load
low, and an idle crate publishes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ioc.config import BoardConfig
from ioc.packets import DIGITIZER_CHANNELS
from ioc.records import Records
from ioc.spectra import FILTER_LENGTH, ChannelCounts, Spectra, rebin
from sim.spectrum import ADC_PER_KEV
from sim.spectrum import FILTER_LENGTH as SIM_FILTER_LENGTH

PERIOD_S = 1.0
#: The statistics thread ticks every 0.5 s: a tick this close to a second counts as one.
_EARLY_S = 0.1
#: The simulator's true scale: keV per digitizer unit ((post − pre) / M).
SIM_KEV_PER_UNIT = SIM_FILTER_LENGTH / (FILTER_LENGTH * ADC_PER_KEV)


def default_calibration(
    board: BoardConfig, *, simulated: bool
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CalGain0..9 and CalOffset0..9 at boot: the configuration's, else the backend's
    default: the simulator's true scale for simulated boards, digitizer units (1, 0) else."""
    gain = SIM_KEV_PER_UNIT if simulated else 1.0
    gains = board.cal_gain or (gain,) * DIGITIZER_CHANNELS
    offsets = board.cal_offset or (0.0,) * DIGITIZER_CHANNELS
    return gains, offsets


@dataclass
class _BoardState:
    """What was last published for one board."""

    card: int
    serial: int = -1
    resets: int = 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(DIGITIZER_CHANNELS, np.int64))
    time: float | None = None
    #: (gain, offset, keV/bin) of each channel's published spectrum.
    calibration: list[tuple[float, float, float]] = field(default_factory=list)


class MonitorPublisher:
    """Called by the statistics thread every tick; publishes at most once a second."""

    def __init__(
        self, records: Records, spectra: Spectra, cards: dict[str, int], bins: int
    ) -> None:
        self.records = records
        self.spectra = spectra
        self.bins = bins
        self._boards = {name: _BoardState(card) for name, card in cards.items()}
        self._last: float | None = None

    def publish(self, now: float) -> None:
        if self._last is not None and now - self._last < PERIOD_S - _EARLY_S:
            return
        self._last = now
        for name, state in self._boards.items():
            self._publish_board(name, state, now)

    def _publish_board(self, name: str, state: _BoardState, now: float) -> None:
        r = self.records
        serial = self.spectra.serial(state.card)
        counts = None if serial == state.serial else self.spectra.counts(state.card)
        if counts is not None and counts.resets != state.resets:
            state.events = np.zeros(DIGITIZER_CHANNELS, np.int64)  # the rate starts anew
        if state.time is not None and now > state.time:
            new = (
                counts.events - state.events if counts is not None
                else np.zeros(DIGITIZER_CHANNELS, np.int64)
            )
            for n in range(DIGITIZER_CHANNELS):
                rate = round(float(new[n]) / (now - state.time), 1)
                r.publish("Rate", rate, index=n, board=name)
        state.time = now
        if counts is not None:
            state.serial, state.resets, state.events = counts.serial, counts.resets, counts.events
            for n in range(DIGITIZER_CHANNELS):
                r.publish("PileUp", int(counts.pile_ups[n]), index=n, board=name)
        self._publish_spectra(name, state, counts)

    def _publish_spectra(
        self, name: str, state: _BoardState, counts: ChannelCounts | None
    ) -> None:
        r = self.records
        kev_per_bin = float(r.get("SpectrumKeVPerBin", board=name))
        wanted = [
            (
                float(r.get("CalGain", index=n, board=name)),
                float(r.get("CalOffset", index=n, board=name)),
                kev_per_bin,
            )
            for n in range(DIGITIZER_CHANNELS)
        ]
        if counts is None:
            if wanted == state.calibration:
                return
            counts = self.spectra.counts(state.card)  # a new calibration: same counts
        for n, calibration in enumerate(wanted):
            spectrum = rebin(counts.histogram[n], *calibration, bins=self.bins)
            r.publish("Spectrum", spectrum, index=n, board=name)
        state.calibration = wanted

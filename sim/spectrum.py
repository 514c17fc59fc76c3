"""The energy spectrum the simulated digitizers measure: a 60Co source on HPGe.

Two sharp lines (1173.2 and 1332.5 keV) on their Compton continua
(Klein-Nishina shape up to each Compton edge), a low-energy background, all
smeared with detector resolution. Energies are drawn by inverse CDF from a
precomputed table of amplitude quantiles, one fancy index per event.

Energies are expressed as pulse amplitudes in ADC counts above the baseline
(`ADC_PER_KEV`); the header carries them as pre-rise and post-rise sums over
`FILTER_LENGTH` samples, so (post - pre) / M is the amplitude.
"""

from __future__ import annotations

import functools

import numpy as np

#: ADC counts of pulse amplitude per keV of deposited energy.
ADC_PER_KEV = 4.0
#: Filter length M: samples summed by the pre-rise and post-rise energy sums.
FILTER_LENGTH = 256
#: Baseline of every channel in ADC counts (14-bit ADC, 0..16383).
BASELINE = 1000
#: Largest amplitude the ADC can show above the baseline.
MAX_AMPLITUDE = 0x3FFF - BASELINE
#: The 60Co gamma lines, keV.
LINES_KEV = (1173.228, 1332.492)
#: Number of entries of the quantile table (indexed by 16 random bits).
QUANTILES = 1 << 16

_ELECTRON_MASS_KEV = 510.999
_FWHM_KEV = 2.5
_THRESHOLD_KEV = 30.0
_LINE_SHARE = 0.20
_BACKGROUND_SHARE = 0.15
_BACKGROUND_SLOPE_KEV = 150.0


def compton_edge_kev(line_kev: float) -> float:
    """Largest energy a single Compton scatter of a ``line_kev`` gamma deposits."""
    return line_kev * 2 * line_kev / (_ELECTRON_MASS_KEV + 2 * line_kev)


def _klein_nishina(energy_kev: np.ndarray, line_kev: float) -> np.ndarray:
    """Relative Compton recoil-electron spectrum of one line (zero above its edge)."""
    eps = line_kev / _ELECTRON_MASS_KEV
    s = np.clip(energy_kev / line_kev, 0.0, compton_edge_kev(line_kev) / line_kev)
    shape = 2 + s**2 / (eps**2 * (1 - s) ** 2) + s / (1 - s) * (s - 2 / eps)
    return np.where(energy_kev <= compton_edge_kev(line_kev), shape, 0.0)


@functools.cache
def model_density() -> np.ndarray:
    """Probability of each amplitude 0..MAX_AMPLITUDE (ADC counts); sums to 1."""
    energy = np.arange(MAX_AMPLITUDE + 1) / ADC_PER_KEV
    above_threshold = energy >= _THRESHOLD_KEV
    density = np.zeros_like(energy)
    compton_share = 1.0 - _BACKGROUND_SHARE - _LINE_SHARE * len(LINES_KEV)
    for line in LINES_KEV:
        continuum = _klein_nishina(energy, line) * above_threshold
        density += compton_share / len(LINES_KEV) * continuum / continuum.sum()
        density[round(line * ADC_PER_KEV)] += _LINE_SHARE
    background = np.exp(-energy / _BACKGROUND_SLOPE_KEV) * above_threshold
    density += _BACKGROUND_SHARE * background / background.sum()
    sigma = _FWHM_KEV / 2.3548 * ADC_PER_KEV
    offsets = np.arange(-int(6 * sigma), int(6 * sigma) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    density = np.convolve(density, kernel / kernel.sum(), mode="same")
    density /= density.sum()
    density.flags.writeable = False
    return density


@functools.cache
def amplitude_quantiles() -> np.ndarray:
    """Amplitudes (int32, ADC counts) at `QUANTILES` evenly spaced probabilities."""
    cdf = np.cumsum(model_density())
    probabilities = (np.arange(QUANTILES) + 0.5) / QUANTILES
    table = np.searchsorted(cdf, probabilities).astype(np.int32)
    np.minimum(table, MAX_AMPLITUDE, out=table)
    table.flags.writeable = False
    return table

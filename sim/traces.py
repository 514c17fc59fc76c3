"""A bank of precomputed digitizer traces, so events copy a trace instead of making one.

Each entry is a preamplifier pulse (fast rise, slow decay) on the baseline with
noise, already packed two 14-bit samples per word (bits 13:0 the earlier) and
stored big-endian. Entries are indexed by amplitude bin and noise variant; an
event takes the entry of its amplitude's bin, so the pulse height follows the
energy to within one bin (`AMPLITUDE_BIN` ADC counts).
"""

from __future__ import annotations

import functools

import numpy as np

from ioc.hardware import WORD
from ioc.packets import MAX_TRACE_SAMPLES
from sim.spectrum import BASELINE

#: log2 of the width of one amplitude bin in ADC counts.
AMPLITUDE_BIN_SHIFT = 4
AMPLITUDE_BIN = 1 << AMPLITUDE_BIN_SHIFT
AMPLITUDE_BINS = (1 << 14) >> AMPLITUDE_BIN_SHIFT
#: Noise variants per amplitude bin (a power of two: chosen by random bits).
NOISE_VARIANTS = 4
#: Noise of the ADC, counts RMS.
NOISE_RMS = 3.0
_RISE_SAMPLES = 3.0
_DECAY_SAMPLES = 5000.0
_BANK_SEED = 0x7ACE


def validate_trace_samples(samples: int) -> int:
    """Trace lengths the packet format allows: even, 0..992."""
    if not 0 <= samples <= MAX_TRACE_SAMPLES or samples % 2:
        raise ValueError(f"trace length must be even and 0..{MAX_TRACE_SAMPLES}, not {samples}")
    return samples


def trigger_sample(samples: int) -> int:
    """Sample index where the pulse starts: a quarter of the trace is pre-trigger baseline."""
    return samples // 4


def pulse_shape(samples: int) -> np.ndarray:
    """The pulse without baseline or noise, peak 1, as floats over ``samples`` samples."""
    after = np.maximum(np.arange(samples) - trigger_sample(samples), 0)
    shape = (1 - np.exp(-after / _RISE_SAMPLES)) * np.exp(-after / _DECAY_SAMPLES)
    return shape / shape.max() if shape.any() else shape


def pack_samples(samples: np.ndarray) -> np.ndarray:
    """Pack samples in time order two per word, the earlier in bits 13:0 (native uint32)."""
    s = samples.astype(np.uint32) & 0x3FFF
    return s[..., 0::2] | s[..., 1::2] << 16


@functools.lru_cache(maxsize=4)
def trace_bank(samples: int) -> np.ndarray:
    """Packed traces, shape (AMPLITUDE_BINS * NOISE_VARIANTS, samples // 2), dtype >u4.

    Row ``bin * NOISE_VARIANTS + variant``. Shared read-only by every board.
    """
    validate_trace_samples(samples)
    rng = np.random.default_rng(_BANK_SEED)
    noise = rng.normal(0.0, NOISE_RMS, size=(NOISE_VARIANTS, samples))
    centres = np.arange(AMPLITUDE_BINS) * AMPLITUDE_BIN + AMPLITUDE_BIN // 2
    shape = pulse_shape(samples)
    values = BASELINE + centres[:, None, None] * shape[None, None, :] + noise[None, :, :]
    values = np.clip(np.rint(values), 0, 0x3FFF).astype(np.uint16)
    bank = pack_samples(values).reshape(AMPLITUDE_BINS * NOISE_VARIANTS, samples // 2)
    bank = bank.astype(WORD)
    bank.flags.writeable = False
    return bank

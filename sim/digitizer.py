"""A simulated ANL digitizer (board types 12 master / 13 slave): 10 channels, types 7 and 8.

Events are built a batch at a time straight into the FIFO's big-endian
memory: header words by column from a few random bits per event, traces
copied from the shared trace bank. No Python code runs per event.
"""

from __future__ import annotations

import numpy as np

from ioc.packets import (
    DIGITIZER_CHANNELS,
    DIGITIZER_HEADER_LENGTH,
    HEADER_TYPE_CFD,
    HEADER_TYPE_LED,
    HEADER_WORDS,
    MARKER,
    word1,
    word3,
)
from sim.board import SimBoard, SimBoardSpec
from sim.clock import CrateClock
from sim.faults import BAD_MARKER_WORD, BAD_PACKET_LENGTH, REGRESSION_TICKS, Fault
from sim.spectrum import BASELINE, FILTER_LENGTH, amplitude_quantiles
from sim.traces import AMPLITUDE_BIN_SHIFT, NOISE_VARIANTS, trace_bank, validate_trace_samples

#: Word 4 flag bit "CFD valid", set on every type-8 event.
CFD_VALID_FLAG = 1 << 11
#: Ticks from the event timestamp to the peak timestamp (word 9).
PEAK_DELAY_TICKS = 60
#: Events written per pass, so a pass's temporaries stay in cache.
_PASS_EVENTS = 4096

# Bit fields of the 64 random bits drawn per event.
_CHANNEL_BITS = 0  # 16 bits -> channel 0..9
_QUANTILE_BITS = 16  # 16 bits -> energy quantile
_NOISE_BITS = 32  # 6 bits -> noise of the pre-rise sum
_VARIANT_BITS = 38  # 2 bits -> trace noise variant
_CFD_FRACTION_BITS = 40  # 8 bits -> where the CFD zero crossing falls between samples


def _validate_header_type(value: int) -> int:
    if value not in (HEADER_TYPE_LED, HEADER_TYPE_CFD):
        raise ValueError(f"header type must be 7 (LED) or 8 (CFD), not {value}")
    return value


def cfd_samples(amplitude: np.ndarray, fraction: np.ndarray) -> tuple[np.ndarray, ...]:
    """CFD samples 0, 1, 2 (14-bit two's complement) around the zero crossing.

    Sample 0 is on the negative lobe, 1 the last before the crossing, 2 the
    first after; ``fraction`` (0..255) places the crossing between 1 and 2.
    """
    lobe = amplitude.astype(np.uint32) >> 3
    before = (lobe * fraction.astype(np.uint32)) >> 8
    return ((0x4000 - (lobe >> 1)) & 0x3FFF, (0x4000 - before) & 0x3FFF, lobe - before)


def _prepare(samples: int) -> None:
    """Build the shared trace bank and energy table now, not in the first FIFO read.

    Built on first use they cost about 50 ms, and inside the reader's first pass of a
    run (every FIFO filling meanwhile) they overflowed FIFOs at 2000 events/s/channel.
    """
    trace_bank(samples)
    amplitude_quantiles()


class SimDigitizer(SimBoard):
    """An ANL digitizer whose events follow `sim.spectrum` and `sim.traces`."""

    CHANNELS = DIGITIZER_CHANNELS
    FIFOS = 1

    def __init__(self, spec: SimBoardSpec, clock: CrateClock, crate_seed: int) -> None:
        if spec.kind.is_trigger:
            raise ValueError(f"{spec.name} is a trigger board, not a digitizer")
        self._trace_samples = validate_trace_samples(spec.trace_samples)
        self._header_type = _validate_header_type(spec.header_type)
        self._last_tick_channel0: int | None = None
        _prepare(self._trace_samples)
        super().__init__(spec, clock, crate_seed)

    @property
    def trace_samples(self) -> int:
        with self._lock:
            return self._trace_samples

    @property
    def header_type(self) -> int:
        with self._lock:
            return self._header_type

    def set_trace_length(self, samples: int) -> None:
        """Trace samples of the events arriving from now on (even, 0..992)."""
        samples = validate_trace_samples(int(samples))
        _prepare(samples)
        with self._lock:
            self._catch_up()
            self._trace_samples = samples

    def set_header_type(self, value: int) -> None:
        """Header type of the events arriving from now on: 7 LED or 8 CFD."""
        value = _validate_header_type(int(value))
        with self._lock:
            self._catch_up()
            self._header_type = value

    def _event_words(self) -> int:
        return HEADER_WORDS + self._trace_samples // 2

    def _write_events(self, block: np.ndarray, ticks: np.ndarray) -> np.ndarray:
        count = ticks.size
        channels = np.empty(count, dtype=np.uint8)
        bits = self._content_bits.random_raw(count)
        for first in range(0, count, _PASS_EVENTS):
            last = min(first + _PASS_EVENTS, count)
            channels[first:last] = self._write_pass(block[first:last], ticks[first:last],
                                                    bits[first:last])
        return channels

    def _write_pass(self, block: np.ndarray, ticks: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """Build events for one cache-sized slice; returns their channels."""
        channels = (((bits >> _CHANNEL_BITS) & 0xFFFF) * DIGITIZER_CHANNELS >> 16).astype(
            np.uint32
        )
        amplitude = amplitude_quantiles()[(bits >> _QUANTILE_BITS) & 0xFFFF].view(np.uint32)
        pre = (((bits >> _NOISE_BITS) & 0x3F) + BASELINE * FILTER_LENGTH).astype(np.uint32)
        post = pre + amplitude * FILTER_LENGTH
        ts_low = ticks.astype(np.uint32)
        ts_high = (ticks >> 32).astype(np.uint32) & 0xFFFF
        packet_length = self._event_words() - 1
        is_cfd = self._header_type == HEADER_TYPE_CFD

        block[:, 0] = MARKER
        block[:, 1] = channels | word1(self.identity.slot, packet_length, self._package_data, 0)
        block[:, 2] = ts_low
        block[:, 3] = ts_high | word3(DIGITIZER_HEADER_LENGTH, 0, self._header_type, 0)
        block[:, 4] = CFD_VALID_FLAG if is_cfd else 0
        block[:, 6] = BASELINE
        if is_cfd:
            fraction = (bits >> _CFD_FRACTION_BITS) & 0xFF
            sample0, sample1, sample2 = cfd_samples(amplitude, fraction)
            block[:, 5] = sample0 << 16
            block[:, 7] = sample2 << 16 | sample1
        else:
            block[:, 5] = 0
            block[:, 7] = 0
        post_low = (post & 0xFF) << 24
        block[:, 8] = post_low | pre
        block[:, 9] = ((ts_low + PEAK_DELAY_TICKS) & 0xFFFF) << 16 | post >> 8
        block[:, 10] = ts_low << 16
        block[:, 11] = post_low
        block[:, 12] = (post >> 8 & 0xFF) << 24 | pre
        block[:, 13] = (post >> 16) << 24 | (ts_low & 0x3FF) << 14
        if self._trace_samples:
            rows = (amplitude >> AMPLITUDE_BIN_SHIFT) * NOISE_VARIANTS
            rows += ((bits >> _VARIANT_BITS) & (NOISE_VARIANTS - 1)).astype(np.uint32)
            block[:, HEADER_WORDS:] = trace_bank(self._trace_samples)[rows]
        return channels.astype(np.uint8)

    def _corrupt(self, block: np.ndarray, ticks: np.ndarray, channels: np.ndarray) -> None:
        pending = self._pending
        if Fault.BAD_MARKER in pending:
            pending.discard(Fault.BAD_MARKER)
            block[0, 0] = BAD_MARKER_WORD
        if Fault.BAD_LENGTH in pending:
            pending.discard(Fault.BAD_LENGTH)
            block[0, 1] = (int(block[0, 1]) & ~(0x7FF << 16)) | BAD_PACKET_LENGTH << 16
        on_channel0 = np.flatnonzero(channels == 0)
        if on_channel0.size == 0:
            return
        if Fault.TIMESTAMP_REGRESSION in pending and self._last_tick_channel0 is not None:
            pending.discard(Fault.TIMESTAMP_REGRESSION)
            regressed = max(0, self._last_tick_channel0 - REGRESSION_TICKS)
            first = on_channel0[0]
            block[first, 2] = regressed & 0xFFFFFFFF
            block[first, 3] = (int(block[first, 3]) & ~0xFFFF) | regressed >> 32
        self._last_tick_channel0 = int(ticks[on_channel0[-1]])

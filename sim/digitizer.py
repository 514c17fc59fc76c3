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
    MAX_TRACE_SAMPLES,
    TIMESTAMP_MASK,
    word1,
    word3,
)
from sim import registers
from sim.board import SimBoard, SimBoardSpec
from sim.clock import CrateClock
from sim.faults import BAD_MARKER_WORD, BAD_PACKET_LENGTH, REGRESSION_TICKS, Fault
from sim.registers import channel_register
from sim.spectrum import BASELINE, FILTER_LENGTH, QUANTILES, amplitude_quantiles
from sim.traces import AMPLITUDE_BIN_SHIFT, NOISE_VARIANTS, trace_bank, validate_trace_samples

#: Word 4 flag bit "CFD valid", set on every type-8 event.
CFD_VALID_FLAG = 1 << 11
#: Word 10 bit "P2 mode" (spec 04).
P2_MODE_BIT = 14
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
_DRAW_BITS = 16  # width of the channel and quantile draws
_DRAW_MASK = (1 << _DRAW_BITS) - 1
_ALL_DRAWS = np.arange(1 << _DRAW_BITS, dtype=np.uint64)


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
    PACKAGE_DATA_REGISTER = registers.DIGITIZER_PACKAGE_DATA
    LOGIC_REGISTER = registers.MASTER_LOGIC_STATUS

    def __init__(self, spec: SimBoardSpec, clock: CrateClock, crate_seed: int) -> None:
        if spec.kind.is_trigger:
            raise ValueError(f"{spec.name} is a trigger board, not a digitizer")
        validate_trace_samples(spec.trace_samples)
        _validate_header_type(spec.header_type)
        self._trace_samples = -1
        self._header_type = spec.header_type
        self._last_tick_channel0: int | None = None
        # How the 16-bit draws pick a channel and an energy; None while every event passes.
        self._channel_of_draw: np.ndarray | None = None
        self._quantile_floor: np.ndarray | None = None
        self._quantile_span: np.ndarray | None = None
        # Per-channel mode flags ORed into header words 3 and 10; None while all are 0.
        self._word3_flags: np.ndarray | None = None
        self._word10_flags: np.ndarray | None = None
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
        """Trace samples of the events arriving from now on (even, 0..992).

        The same state as the raw-data-length registers: this writes all ten.
        """
        samples = validate_trace_samples(int(samples))
        _prepare(samples)
        with self._lock:
            self._catch_up()
            first = channel_register(registers.RAW_DATA_LENGTH, 0)
            self._store(first, registers.RAW_DATA_SAMPLES.put(self._registers[first], samples))

    def set_header_type(self, value: int) -> None:
        """Header type of the events arriving from now on: 7 LED or 8 CFD (the cfd_mode bit)."""
        value = _validate_header_type(int(value))
        with self._lock:
            self._catch_up()
            status = self._registers[registers.MASTER_LOGIC_STATUS]
            cfd = value == HEADER_TYPE_CFD
            self._store(registers.MASTER_LOGIC_STATUS, registers.CFD_MODE.put(status, cfd))

    # The register file.

    def _power_on(self, spec: SimBoardSpec, package_data: int) -> dict[str, int]:
        values = registers.power_on(spec.kind, package_data, spec.trace_samples,
                                    cfd=spec.header_type == HEADER_TYPE_CFD)
        values[registers.BOARD_ID] = spec.kind.board_type << 16 | spec.slot
        return values

    def _store(self, register: str, value: int) -> None:
        """The simulated board has one trace window: a raw-data length sets all ten channels."""
        if register.startswith(registers.RAW_DATA_LENGTH):
            samples = registers.RAW_DATA_SAMPLES.get(value)
            for channel in range(DIGITIZER_CHANNELS):
                name = channel_register(registers.RAW_DATA_LENGTH, channel)
                self._registers[name] = registers.RAW_DATA_SAMPLES.put(self._registers[name],
                                                                       samples)
        super()._store(register, value)

    def _decode_registers(self) -> None:
        """Trace length, header type, and which events each channel produces."""
        super()._decode_registers()
        reg = self._registers
        length = registers.RAW_DATA_SAMPLES.get(reg[channel_register(registers.RAW_DATA_LENGTH, 0)])
        samples = min(length & ~1, MAX_TRACE_SAMPLES)
        if samples != self._trace_samples:
            _prepare(samples)
            self._trace_samples = samples
        cfd = registers.CFD_MODE.get(reg[registers.MASTER_LOGIC_STATUS])
        self._header_type = HEADER_TYPE_CFD if cfd else HEADER_TYPE_LED
        self._decode_header_flags()
        floor, weights = self._event_selection()
        if np.array_equal(weights, self._channel_shares * QUANTILES):
            return
        self._channel_shares = weights / QUANTILES
        self._channel_of_draw = self._quantile_floor = self._quantile_span = None
        bounds = np.cumsum(weights)
        if not bounds[-1]:
            return  # nothing arrives; a forced fill (overflow fault) draws as at power-on
        if floor.any():
            self._quantile_floor, self._quantile_span = floor, QUANTILES - floor
        if (weights != QUANTILES).any():
            targets = (_ALL_DRAWS * bounds[-1]) >> _DRAW_BITS
            self._channel_of_draw = np.searchsorted(bounds, targets, side="right").astype(np.uint32)

    def _decode_header_flags(self) -> None:
        """The channel-control mode bits the header reports (the simulated sums do not change)."""
        controls = [self._registers[channel_register(registers.CHANNEL_CONTROL, channel)]
                    for channel in range(DIGITIZER_CHANNELS)]
        word3_flags = np.array([
            word3(0, 0, 0, 0, cfd_sum_mode=bool(registers.CFD_ESUM_MODE.get(control)),
                  trigger_ts_mode=bool(registers.TRIG_TS_MODE.get(control)))
            for control in controls
        ], dtype=np.uint32)
        word10_flags = np.array([registers.P2_MODE.get(control) << P2_MODE_BIT
                                 for control in controls], dtype=np.uint32)
        self._word3_flags = word3_flags if word3_flags.any() else None
        self._word10_flags = word10_flags if word10_flags.any() else None

    def _event_selection(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel: the first energy quantile produced, and how many of the table's are.

        A channel produces events while enabled with a rising-edge trigger (the simulated
        pulses rise), and only those whose pulse height above the baseline, in ADC counts,
        reaches its LED threshold. Events are drawn from what passes: the quantile draw is
        confined to the table's entries at or above the threshold and the channel draw is
        weighted by their number, so nothing is made and then thrown away.
        """
        reg = self._registers
        producing = []
        thresholds = []
        for channel in range(DIGITIZER_CHANNELS):
            control = reg[channel_register(registers.CHANNEL_CONTROL, channel)]
            polarity = registers.TRIGGER_POLARITY.get(control)
            producing.append(registers.CHANNEL_ENABLE.get(control) == 1
                             and polarity in registers.POLARITIES_SEEING_RISING_PULSES)
            threshold = reg[channel_register(registers.LED_THRESHOLD, channel)]
            thresholds.append(registers.LED_THRESHOLD_ADC.get(threshold))
        floor = np.searchsorted(amplitude_quantiles(), thresholds).astype(np.uint64)
        return floor, (QUANTILES - floor) * np.array(producing)

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
        draw = (bits >> _CHANNEL_BITS) & _DRAW_MASK
        if self._channel_of_draw is None:
            channels = (draw * DIGITIZER_CHANNELS >> _DRAW_BITS).astype(np.uint32)
        else:
            channels = self._channel_of_draw[draw]
        quantile = (bits >> _QUANTILE_BITS) & _DRAW_MASK
        if self._quantile_floor is not None:
            quantile = self._quantile_floor[channels] + (
                quantile * self._quantile_span[channels] >> _DRAW_BITS)
        amplitude = amplitude_quantiles()[quantile].view(np.uint32)
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
        if self._word3_flags is not None:
            block[:, 3] |= self._word3_flags[channels]
        if self._word10_flags is not None:
            block[:, 10] |= self._word10_flags[channels]
        block[:, 11] = post_low
        block[:, 12] = (post >> 8 & 0xFF) << 24 | pre
        block[:, 13] = (post >> 16) << 24 | (ts_low & 0x3FF) << 14
        if self._trace_samples:
            rows = (amplitude >> AMPLITUDE_BIN_SHIFT) * NOISE_VARIANTS
            rows += ((bits >> _VARIANT_BITS) & (NOISE_VARIANTS - 1)).astype(np.uint32)
            block[:, HEADER_WORDS:] = trace_bank(self._trace_samples)[rows]
        return channels.astype(np.uint8)

    def _live_register(self, register: str, caught_up: bool = False) -> int | None:
        if register in registers.LIVE_TIMESTAMP:
            now = self._clock.now_ticks() & TIMESTAMP_MASK
            return now & 0xFFFFFFFF if register == registers.LIVE_TIMESTAMP[0] else now >> 32
        for prefix, counts in ((registers.ACCEPTED_EVENT_COUNT, self._generated),
                               (registers.DROPPED_EVENT_COUNT, self._dropped)):
            if register.startswith(prefix):
                if not caught_up:
                    self._catch_up()
                return int(counts[int(register[len(prefix):])]) & registers.REGISTER_MASK
        return None

    def reinit_pipeline(self) -> None:
        """A new run: a timestamp regression is made against this run's events only
        (the IOC forgets the previous run's timestamps at Start too)."""
        with self._lock:
            self._last_tick_channel0 = None

    def _latched(self, timestamp: int) -> None:
        low, high = registers.LATCHED_TIMESTAMP
        self._registers[low] = timestamp & 0xFFFFFFFF
        self._registers[high] = timestamp >> 32

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

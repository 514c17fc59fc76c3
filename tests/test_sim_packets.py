"""The simulated digitizer's packets decode, field by field, to what it generated (spec 04).

The decoder here is a deliberately plain word-by-word walk written from the
spec's table, independent of the simulator's packing code and of ioc.packets.
"""

from __future__ import annotations

import numpy as np
import pytest

from ioc.hardware import WORD, BoardKind
from sim import ManualClock, SimBoardSpec, SimCrate
from sim.spectrum import (
    ADC_PER_KEV,
    BASELINE,
    FILTER_LENGTH,
    LINES_KEV,
    MAX_AMPLITUDE,
    compton_edge_kev,
)
from sim.traces import AMPLITUDE_BIN, NOISE_RMS, pulse_shape, trigger_sample

SLOT = 3
PACKAGE_DATA = 101


def walk(words: np.ndarray) -> list[dict]:
    """Decode a FIFO read of digitizer events into one dict of fields per event."""
    events = []
    offset = 0
    while offset < words.size:
        w = [int(x) for x in words[offset : offset + 14]]
        assert w[0] == 0xAAAAAAAA, f"no marker at word {offset}"
        length = (w[1] >> 16) & 0x7FF
        trace_words = [int(x) for x in words[offset + 14 : offset + length + 1]]
        samples = []
        for word in trace_words:
            samples += [word & 0xFFFF, (word >> 16) & 0xFFFF]
        events.append(
            {
                "slot": w[1] >> 27,
                "length": length,
                "board_id": (w[1] >> 4) & 0xFFF,
                "channel": w[1] & 0xF,
                "timestamp": (w[3] & 0xFFFF) << 32 | w[2],
                "header_length": w[3] >> 26,
                "event_type": (w[3] >> 23) & 0x7,
                "mode_bits": (w[3] >> 20) & 0x7,
                "header_type": (w[3] >> 16) & 0xF,
                "flags": w[4],
                "cfd0": (w[5] >> 16) & 0x3FFF,
                "word5_rest": w[5] & ~(0x3FFF << 16),
                "pileup_count": (w[6] >> 24) & 0xF,
                "baseline": w[6] & 0xFFFFFF,
                "cfd2": (w[7] >> 16) & 0x3FFF,
                "cfd1": w[7] & 0x3FFF,
                "pre": w[8] & 0xFFFFFF,
                "post": (w[8] >> 24) | (w[9] & 0xFFFF) << 8,
                "peak_ts": w[9] >> 16,
                "trigger_ts": w[10] >> 16,
                "p2": w[10] & 0xFFFF,
                "msum": (w[11] >> 24) | (w[12] >> 24) << 8 | (w[13] >> 24) << 16,
                "multiplex": w[11] & 0xFFFFFF,
                "early_pre": w[12] & 0xFFFFFF,
                "coarse_ts": (w[13] >> 14) & 0x3FF,
                "word13_low": w[13] & 0x3FFF,
                "samples": samples,
            }
        )
        offset += length + 1
    assert offset == words.size, "the last event runs past the read"
    return events


def signed14(value: int) -> int:
    return value - 0x4000 if value & 0x2000 else value


def digitizer(clock: ManualClock, seed: int = 1, **sim) -> SimCrate:
    spec = SimBoardSpec("MDIG1", BoardKind.DIGITIZER_MASTER, SLOT, 0, PACKAGE_DATA, **sim)
    return SimCrate([spec], seed=seed, clock=clock)


def read_all(board) -> np.ndarray:
    depth = board.status().depth_words
    out = np.zeros(depth, dtype=WORD)
    board.read(out, depth)
    return out


def collect(board, clock: ManualClock, steps: int, step_ticks: int) -> list[tuple[int, dict]]:
    """Events read after each of ``steps`` clock steps, with the tick of that read."""
    events = []
    for _ in range(steps):
        now = clock.advance(step_ticks)
        events += [(now, event) for event in walk(read_all(board))]
    return events


@pytest.mark.parametrize("header_type", [7, 8])
@pytest.mark.parametrize("trace_samples", [0, 2, 200, 992])
def test_every_header_field_decodes_to_the_generated_event(header_type, trace_samples):
    clock = ManualClock()
    board = digitizer(
        clock, event_rate_hz=2000, trace_samples=trace_samples, header_type=header_type
    ).board(0)
    board.set_master_logic(True)
    steps = collect(board, clock, steps=20, step_ticks=100_000)  # 20 x 1 ms
    assert len(steps) == board.generated > 200
    last_by_channel: dict[int, int] = {}
    for read_tick, event in steps:
        assert event["slot"] == SLOT
        assert event["length"] == 13 + trace_samples // 2
        assert event["board_id"] == PACKAGE_DATA
        assert 0 <= event["channel"] <= 9
        assert event["header_length"] == 13
        assert event["event_type"] == 0 and event["mode_bits"] == 0
        assert event["header_type"] == header_type
        ts = event["timestamp"]
        assert read_tick - 100_000 < ts <= read_tick  # arrived since the previous read
        assert ts > last_by_channel.get(event["channel"], -1)
        last_by_channel[event["channel"]] = ts
        assert event["peak_ts"] == (ts + 60) & 0xFFFF
        assert event["trigger_ts"] == ts & 0xFFFF
        assert event["coarse_ts"] == ts & 0x3FF
        assert event["p2"] == 0 and event["word13_low"] == 0 and event["multiplex"] == 0
        assert event["pileup_count"] == 0
        assert event["baseline"] == BASELINE
        assert BASELINE * FILTER_LENGTH <= event["pre"] < BASELINE * FILTER_LENGTH + 64
        assert event["early_pre"] == event["pre"]
        assert event["msum"] == event["post"]
        energy_sum = event["post"] - event["pre"]
        assert energy_sum % FILTER_LENGTH == 0
        assert 0 <= energy_sum // FILTER_LENGTH <= MAX_AMPLITUDE
        assert event["word5_rest"] == 0
        if header_type == 8:
            assert event["flags"] == 1 << 11  # CFD valid
            if energy_sum // FILTER_LENGTH >= 64:
                assert signed14(event["cfd0"]) < 0  # negative lobe
            assert signed14(event["cfd1"]) <= 0 <= signed14(event["cfd2"])  # zero crossing
        else:
            assert event["flags"] == 0
            assert event["cfd0"] == event["cfd1"] == event["cfd2"] == 0
    assert set(last_by_channel) == set(range(10))


@pytest.mark.parametrize("trace_samples", [200, 992])
def test_traces_are_the_pulse_of_the_event_energy_in_time_order(trace_samples):
    clock = ManualClock()
    board = digitizer(clock, event_rate_hz=2000, trace_samples=trace_samples).board(0)
    board.set_master_logic(True)
    events = [event for _, event in collect(board, clock, steps=5, step_ticks=100_000)]
    assert len(events) > 50
    start = trigger_sample(trace_samples)
    shape = pulse_shape(trace_samples)
    for event in events:
        samples = np.array(event["samples"])
        assert samples.size == trace_samples
        assert (samples >> 14 == 0).all()  # no timing or down-sampling marks
        amplitude = (event["post"] - event["pre"]) // FILTER_LENGTH
        expected = BASELINE + amplitude * shape
        tolerance = AMPLITUDE_BIN * shape + 6 * NOISE_RMS
        assert (np.abs(samples - expected) <= tolerance).all()
        # Time order: the pre-trigger quarter is flat baseline, the next sample has risen.
        assert (np.abs(samples[: start + 1] - BASELINE) <= 6 * NOISE_RMS).all()
        if amplitude > 100:
            assert samples[start + 1] > BASELINE + 0.2 * amplitude
            assert abs(samples.max() - BASELINE - amplitude) <= AMPLITUDE_BIN + 6 * NOISE_RMS


def test_energies_form_a_cobalt_60_spectrum():
    clock = ManualClock()
    board = digitizer(clock, event_rate_hz=100_000, trace_samples=0, fifo_words=1 << 20).board(0)
    board.set_master_logic(True)
    clock.advance(4_000_000)  # 40 ms at 1 MHz per board: about 40 000 events
    words = read_all(board).reshape(-1, 14)
    pre = (words[:, 8] & 0xFFFFFF).astype(np.int64)
    post = (words[:, 8] >> 24).astype(np.int64) | (words[:, 9] & 0xFFFF).astype(np.int64) << 8
    energy_kev = (post - pre) / FILTER_LENGTH / ADC_PER_KEV
    assert energy_kev.size > 35_000
    counts, edges = np.histogram(energy_kev, bins=np.arange(0, 1500, 2.0))
    two_highest = sorted(edges[np.argsort(counts)[-2:]] + 1.0)
    assert two_highest == pytest.approx([1173.2, 1332.5], abs=2.0)  # the 60Co lines
    for line in LINES_KEV:
        in_peak = np.mean(np.abs(energy_kev - line) < 4)
        assert 0.15 < in_peak < 0.25
        continuum = np.mean((energy_kev > 300) & (energy_kev < compton_edge_kev(line)))
        assert continuum > 0.2
    assert np.mean((energy_kev > 1140) & (energy_kev < 1160)) < 0.005  # between edge and line


def test_words_on_the_wire_match_the_golden_example():
    """Spec 04's golden words 0..3 (slot 3, board 101, channel 3, ts bits 47:32 = 1)."""
    clock = ManualClock(start_ticks=0x0001_2345_6789)
    board = digitizer(clock, event_rate_hz=20_000, trace_samples=0, header_type=7).board(0)
    board.set_master_logic(True)
    clock.advance(100_000)
    words = read_all(board).reshape(-1, 14)
    on_channel3 = words[(words[:, 1] & 0xF) == 3]
    assert on_channel3.shape[0] > 0
    for event in on_channel3:
        wire = event.tobytes()
        assert wire[:8] == bytes.fromhex("AAAAAAAA 180D0653")
        assert wire[12:16] == bytes.fromhex("34070001")
        timestamp = int.from_bytes(wire[14:16] + wire[8:12], "big")
        assert 0x0001_2345_6789 < timestamp <= clock.now_ticks()


def test_live_settings_apply_to_events_arriving_afterwards():
    clock = ManualClock()
    board = digitizer(clock, event_rate_hz=5000, trace_samples=200, header_type=7).board(0)
    board.set_master_logic(True)
    clock.advance(100_000)
    board.set_trace_length(0)
    board.set_header_type(8)
    board.set_package_data(202)
    switch_tick = clock.now_ticks()
    clock.advance(100_000)
    events = walk(read_all(board))
    before = [e for e in events if e["timestamp"] <= switch_tick]
    after = [e for e in events if e["timestamp"] > switch_tick]
    assert before and after
    assert {(e["length"], e["header_type"], e["board_id"]) for e in before} == {(113, 7, 101)}
    assert {(e["length"], e["header_type"], e["board_id"]) for e in after} == {(13, 8, 202)}
    assert (board.trace_samples, board.header_type, board.package_data) == (0, 8, 202)


@pytest.mark.parametrize(
    ("setter", "value"),
    [
        ("set_trace_length", 3),
        ("set_trace_length", 994),
        ("set_trace_length", -2),
        ("set_header_type", 9),
        ("set_event_rate", -1.0),
        ("set_event_rate", float("nan")),
        ("set_package_data", 4096),
    ],
)
def test_out_of_range_settings_are_refused_and_change_nothing(setter, value):
    board = digitizer(ManualClock()).board(0)
    before = (board.trace_samples, board.header_type, board.event_rate_hz, board.package_data)
    with pytest.raises(ValueError):
        getattr(board, setter)(value)
    assert (board.trace_samples, board.header_type, board.event_rate_hz,
            board.package_data) == before

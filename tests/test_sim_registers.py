"""The simulated boards' register files: what is written reads back, and the registers that
shape the data change the events produced after the write (thresholds, enables, trace
window, header type, package data)."""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_packets import PACKAGE_DATA, digitizer, read_all, walk
from test_sim_trigger import make_trigger

from ioc import registermap
from ioc.hardware import BoardKind
from ioc.registermap import BOARD_MAPS
from sim import Fault, ManualClock, SimBoardSpec, SimCrate
from sim.registers import DIGITIZER_REGISTERS, TRIGGER_REGISTERS
from sim.spectrum import FILTER_LENGTH, amplitude_quantiles

#: Per-channel rate and run length of the rate tests: about 5000 events per channel.
RATE_HZ = 5000.0
RUN_TICKS = 100_000_000  # 1 s
FIFO_WORDS = 1 << 21  # room for a whole run of header-only events
#: Above every simulated pulse height (the spectrum ends near 6000 ADC counts).
THRESHOLD_ABOVE_SPECTRUM = 10_000
THRESHOLD_MASK = 0x3FFF  # reg_led_thresholdN bits 13:0
CHANNEL_ENABLE = 0x1  # reg_channel_controlN bit 0
CFD_MODE = 0x8000  # reg_master_logic_status bit 15
RAW_DATA_LENGTH_MASK = 0x3FF  # reg_raw_data_lengthN bits 9:0


def running_digitizer(clock: ManualClock, **sim):
    board = digitizer(clock, event_rate_hz=RATE_HZ, trace_samples=0, fifo_words=FIFO_WORDS,
                      **sim).board(0)
    board.set_master_logic(True)
    return board


def events_per_channel(events: list[dict]) -> np.ndarray:
    return np.bincount([e["channel"] for e in events], minlength=10)


def amplitude(event: dict) -> float:
    return (event["post"] - event["pre"]) / FILTER_LENGTH


def set_field(board, register: str, mask: int, value: int) -> None:
    """Read, modify, write, as the IOC's register records do."""
    board.write_register(register, (board.read_register(register) & ~mask) | (value & mask))


def test_a_threshold_above_every_energy_silences_its_channel_only():
    clock = ManualClock()
    board = running_digitizer(clock)
    set_field(board, "reg_led_threshold3", THRESHOLD_MASK, THRESHOLD_ABOVE_SPECTRUM)
    clock.advance(RUN_TICKS)
    counts = events_per_channel(walk(read_all(board)))
    assert counts[3] == 0
    others = np.delete(counts, 3)
    expected = RATE_HZ * RUN_TICKS / 1e8
    assert (np.abs(others - expected) < 5 * np.sqrt(expected)).all(), counts
    assert board.read_register("reg_led_threshold3") & THRESHOLD_MASK == THRESHOLD_ABOVE_SPECTRUM


def test_a_threshold_within_the_spectrum_cuts_the_events_below_it():
    clock = ManualClock()
    board = running_digitizer(clock)
    threshold = 2000  # ADC counts above baseline = 500 keV
    set_field(board, "reg_led_threshold5", THRESHOLD_MASK, threshold)
    clock.advance(RUN_TICKS)
    events = walk(read_all(board))
    on_channel5 = [e for e in events if e["channel"] == 5]
    assert min(amplitude(e) for e in on_channel5) >= threshold
    share_above = np.mean(amplitude_quantiles() >= threshold)
    expected = RATE_HZ * RUN_TICKS / 1e8 * share_above
    assert abs(len(on_channel5) - expected) < 5 * np.sqrt(expected)
    below_elsewhere = [e for e in events if e["channel"] != 5 and amplitude(e) < threshold]
    assert below_elsewhere


def test_a_disabled_channel_gives_no_events_and_reenabling_brings_them_back():
    clock = ManualClock()
    board = running_digitizer(clock)
    set_field(board, "reg_channel_control7", CHANNEL_ENABLE, 0)
    clock.advance(RUN_TICKS // 10)
    counts = events_per_channel(walk(read_all(board)))
    assert counts[7] == 0 and (np.delete(counts, 7) > 0).all()
    set_field(board, "reg_channel_control7", CHANNEL_ENABLE, 1)
    clock.advance(RUN_TICKS // 10)
    assert events_per_channel(walk(read_all(board)))[7] > 0


def test_every_channel_off_means_no_events_at_all():
    clock = ManualClock()
    board = running_digitizer(clock)
    for channel in range(10):
        set_field(board, f"reg_channel_control{channel}", CHANNEL_ENABLE, 0)
    clock.advance(RUN_TICKS // 10)
    assert board.status().depth_words == 0


def test_an_overflow_fault_still_fills_the_fifo_when_every_channel_is_silenced():
    board = running_digitizer(ManualClock())
    for channel in range(10):
        set_field(board, f"reg_led_threshold{channel}", THRESHOLD_MASK, THRESHOLD_ABOVE_SPECTRUM)
    board.inject(Fault.FIFO_OVERFLOW)
    assert board.status().full and len(walk(read_all(board))) == board.generated > 0


def test_a_trace_length_register_changes_the_traces_of_later_events():
    clock = ManualClock()
    board = running_digitizer(clock)
    clock.advance(1_000_000)
    set_field(board, "reg_raw_data_length4", RAW_DATA_LENGTH_MASK, 300)
    switch_tick = clock.now_ticks()
    clock.advance(1_000_000)
    events = walk(read_all(board))
    before = {len(e["samples"]) for e in events if e["timestamp"] <= switch_tick}
    after = {len(e["samples"]) for e in events if e["timestamp"] > switch_tick}
    assert (before, after) == ({0}, {300})
    assert board.trace_samples == 300
    lengths = {board.read_register(f"reg_raw_data_length{c}") for c in range(10)}
    assert lengths == {300}, "one trace window per simulated board: all channels show it"


def test_an_odd_or_too_long_window_gives_the_nearest_trace_the_format_allows():
    board = running_digitizer(ManualClock())
    board.write_register("reg_raw_data_length0", 301)
    assert (board.trace_samples, board.read_register("reg_raw_data_length0")) == (300, 301)
    board.write_register("reg_raw_data_length0", 1023)
    assert board.trace_samples == 992


def test_sim_controls_and_registers_are_one_state():
    board = running_digitizer(ManualClock())
    board.set_trace_length(120)
    board.set_header_type(8)
    board.set_package_data(202)
    assert board.read_register("reg_raw_data_length9") & RAW_DATA_LENGTH_MASK == 120
    assert board.read_register("reg_master_logic_status") & CFD_MODE
    assert board.read_register("reg_user_package_data") & 0xFFF == 202
    set_field(board, "reg_master_logic_status", CFD_MODE, 0)
    board.write_register("reg_user_package_data", 303)
    assert (board.header_type, board.package_data) == (7, 303)


def test_header_type_and_package_data_registers_shape_later_packets():
    clock = ManualClock()
    board = running_digitizer(clock)
    clock.advance(1_000_000)
    set_field(board, "reg_master_logic_status", CFD_MODE, CFD_MODE)
    set_field(board, "reg_user_package_data", 0xFFF, 404)
    switch_tick = clock.now_ticks()
    clock.advance(1_000_000)
    events = walk(read_all(board))
    before = {(e["header_type"], e["board_id"]) for e in events if e["timestamp"] <= switch_tick}
    after = {(e["header_type"], e["board_id"]) for e in events if e["timestamp"] > switch_tick}
    assert (before, after) == ({(7, PACKAGE_DATA)}, {(8, 404)})


def test_header_mode_flags_follow_each_channels_control_bits():
    clock = ManualClock()
    board = running_digitizer(clock)
    set_field(board, "reg_channel_control2", 0x80000000, 0x80000000)  # cfd_esum_mode: LED+d
    set_field(board, "reg_channel_control4", 0x00000002, 0x00000002)  # trig_ts_mode: TrigMsg
    set_field(board, "reg_channel_control6", 0x00000010, 0x00000010)  # P2_mode: Span
    clock.advance(RUN_TICKS // 10)
    flags = {(e["channel"], e["mode_bits"], e["p2"] & 0x4000) for e in walk(read_all(board))}
    expected = {(c, 0, 0) for c in range(10)} - {(2, 0, 0), (4, 0, 0), (6, 0, 0)}
    assert flags == expected | {(2, 0b100, 0), (4, 0b010, 0), (6, 0, 0x4000)}


def test_configuration_sets_the_power_on_registers():
    board = digitizer(ManualClock(), trace_samples=64, header_type=8).board(0)
    assert board.read_register("reg_raw_data_length0") == 64
    assert board.read_register("reg_master_logic_status") == CFD_MODE
    assert board.read_register("reg_user_package_data") == PACKAGE_DATA
    assert board.read_register("reg_channel_control2") & CHANNEL_ENABLE
    assert board.read_register("regin_board_id") & 0x1F == 3  # the slot


def test_master_logic_enable_is_the_register_bit():
    clock = ManualClock()
    board = digitizer(clock, event_rate_hz=RATE_HZ).board(0)
    assert board.read_register("reg_master_logic_status") & 1 == 0
    set_field(board, "reg_master_logic_status", 1, 1)
    assert board.master_logic
    clock.advance(1_000_000)
    assert board.status().depth_words > 0
    board.set_master_logic(False)
    assert board.read_register("reg_master_logic_status") & 1 == 0


def test_live_registers_report_counts_and_timestamps():
    clock = ManualClock(start_ticks=0x1234_5678_9ABC)
    board = running_digitizer(clock)
    clock.advance(1_000_000)
    counts = [board.read_register(f"regin_accepted_event_count{c}") for c in range(10)]
    assert counts == list(board.generated_by_channel) and sum(counts) > 0
    now = clock.now_ticks()
    live = board.read_register("regin_live_timestamp_msb") << 32
    assert live | board.read_register("regin_live_timestamp_lsb") == now
    latched = board.latch_timestamp()
    assert board.read_register("regin_lat_timestamp_msb") << 32 | board.read_register(
        "regin_lat_timestamp_lsb") == latched


@pytest.mark.parametrize("register", ["reg_d_window0", "reg_led_threshold9", "reg_sd_config"])
def test_a_digitizer_register_reads_back_what_was_written_cut_to_32_bits(register):
    board = digitizer(ManualClock()).board(0)
    board.write_register(register, 0x1_2345_6789)
    assert board.read_register(register) == 0x2345_6789


def test_a_trigger_register_reads_back_what_was_written():
    board = make_trigger(ManualClock())
    board.write_register("reg_TRIG_MASK", 0xFFFF_FFFF_1)
    assert board.read_register("reg_TRIG_MASK") == 0xFFFF_FFF1
    board.write_register("reg_USER_PACKAGE_DATA", 77)
    assert board.package_data == 77
    board.set_package_data(88)
    assert board.read_register("reg_USER_PACKAGE_DATA") == 88


@pytest.mark.parametrize(
    ("kind", "register"),
    [
        (BoardKind.DIGITIZER_MASTER, "reg_no_such_register"),
        (BoardKind.DIGITIZER_SLAVE, "reg_TRIG_MASK"),
        (BoardKind.TRIGGER_MASTER, "reg_led_threshold0"),
    ],
)
def test_a_register_the_board_does_not_have_is_a_key_error(kind, register):
    spec = SimBoardSpec("B", kind, slot=5, card=0, package_data=9)
    board = SimCrate([spec], clock=ManualClock()).board(0)
    with pytest.raises(KeyError):
        board.read_register(register)
    with pytest.raises(KeyError):
        board.write_register(register, 1)


def test_every_register_of_the_original_maps_reads():
    digitizer_board = digitizer(ManualClock()).board(0)
    trigger_board = make_trigger(ManualClock())
    assert (len(DIGITIZER_REGISTERS), len(TRIGGER_REGISTERS)) == (222, 367)
    for kind, names in ((BoardKind.DIGITIZER_MASTER, DIGITIZER_REGISTERS),
                        (BoardKind.DIGITIZER_SLAVE, DIGITIZER_REGISTERS),
                        (BoardKind.TRIGGER_MASTER, TRIGGER_REGISTERS)):
        bound = {r.binding.register for r in registermap.load(BOARD_MAPS[kind]) if r.binding}
        assert bound <= names, f"{kind.value}: the IOC's records name {sorted(bound - names)}"
    for register in DIGITIZER_REGISTERS:
        assert 0 <= digitizer_board.read_register(register) <= 0xFFFF_FFFF
    for register in TRIGGER_REGISTERS:
        assert 0 <= trigger_board.read_register(register) <= 0xFFFF_FFFF


def test_status_registers_refuse_writes():
    board = digitizer(ManualClock()).board(0)
    before = board.read_register("regin_board_id")
    with pytest.raises(ValueError):
        board.write_register("regin_board_id", 0)
    assert board.read_register("regin_board_id") == before

"""The spectra outLoop keeps: energies from the header words of spec 04, pile-up
counts, calibration into keV, and the per-board calibration keys of the configuration.

Packets are built here from the spec's bit layout, not with the simulator's packing.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ioc import _headerwalk
from ioc.checker import Checker
from ioc.config import ConfigError, dump_config, parse_config
from ioc.hardware import WORD
from ioc.monitoring import SIM_KEV_PER_UNIT, default_calibration
from ioc.spectra import RAW_BINS, Spectra, rebin

MARKER = 0xAAAAAAAA
PILE_UP = 1 << 15


def event(channel: int, pre: int, post: int, *, flags: int = 0, samples: int = 0,
          timestamp: int = 1000) -> list[int]:
    """One LED event (header type 7) of board 101 in slot 3, words 0..N."""
    length = 13 + samples // 2
    words = [0] * (length + 1)
    words[0] = MARKER
    words[1] = 3 << 27 | length << 16 | 101 << 4 | channel
    words[2] = timestamp & 0xFFFFFFFF
    words[3] = 13 << 26 | 7 << 16 | timestamp >> 32
    words[4] = flags
    words[8] = (post & 0xFF) << 24 | pre
    words[9] = 0x1234 << 16 | post >> 8
    return words


def type_f(channel: int = 0xD) -> list[int]:
    return [MARKER, 3 << 27 | 3 << 16 | 101 << 4 | channel, 0, 3 << 26 | 0xF << 16]


def check_and_add(spectra: Spectra, packets: list[list[int]], card: int = 0) -> None:
    words = np.array([w for packet in packets for w in packet], dtype=WORD)
    result = Checker().check(words, card, histogram=spectra.table(card))
    spectra.added(card, result.counted)
    assert not result.fatal


def raw_bin(spectra: Spectra, card: int, channel: int) -> dict[int, int]:
    histogram = spectra.counts(card).histogram[channel]
    return {int(b): int(histogram[b]) for b in np.flatnonzero(histogram)}


# (pre, post) -> the amplitude in digitizer units: post // 256 - pre // 256.
SUMS = [
    ((1000 * 256 + 7, 1000 * 256 + 7 + 4693 * 256), 4693),  # equal low bytes: exact
    ((0x00_12_34_FF, 0x00_12_34_FF + 300 * 256 - 1), 300),  # 299.996: within one unit
    ((0x00_12_34_01, 0x00_12_34_01 + 300 * 256 - 2), 299),  # 299.992: within one unit
    ((5, 5 + 255), 1),  # 0.996
    ((0xFFFFFF - 100 * 256, 0xFFFFFF), 100),  # 24-bit sums at their top
]


@pytest.mark.parametrize("samples", [0, 6])
def test_equal_size_events_give_the_amplitude_of_their_energy_sums(samples):
    spectra = Spectra(7)
    packets = [event(n, pre, post, samples=samples, timestamp=1000 + n)
               for n, ((pre, post), _) in enumerate(SUMS)]
    check_and_add(spectra, packets, card=2)
    for channel, (_, amplitude) in enumerate(SUMS):
        assert raw_bin(spectra, 2, channel) == {amplitude: 1}
    assert spectra.counts(0).events.sum() == 0


def test_mixed_packets_give_the_same_amplitudes_and_skip_status_headers():
    spectra = Spectra(7)
    packets = [event(n, pre, post, samples=2 * n, timestamp=1000 + n)
               for n, ((pre, post), _) in enumerate(SUMS)]
    check_and_add(spectra, [*packets, type_f()])
    for channel, (_, amplitude) in enumerate(SUMS):
        assert raw_bin(spectra, 0, channel) == {amplitude: 1}
    assert spectra.counts(0).events.tolist() == [1] * len(SUMS) + [0] * (10 - len(SUMS))


def test_pile_up_flags_are_counted_per_channel_and_the_events_still_show():
    spectra = Spectra(7)
    packets = [
        event(1, 0, 256 * 10, flags=PILE_UP, timestamp=1),
        event(1, 0, 256 * 10, timestamp=2),
        event(4, 0, 256 * 20, flags=PILE_UP | 1 << 14, timestamp=3),
    ]
    check_and_add(spectra, packets)
    counts = spectra.counts(0)
    assert counts.pile_ups.tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert counts.events.tolist() == [0, 2, 0, 0, 1, 0, 0, 0, 0, 0]
    assert raw_bin(spectra, 0, 1) == {10: 2}


def test_energies_outside_the_bins_count_as_events_but_not_in_the_spectrum():
    spectra = Spectra(7)
    packets = [event(0, 256 * 50, 0, timestamp=1), event(0, 0, 256 * RAW_BINS, timestamp=2)]
    check_and_add(spectra, packets)
    counts = spectra.counts(0)
    assert counts.events[0] == 2
    assert rebin(counts.histogram[0], 1.0, 0.0, 1.0).sum() == 0


def test_a_long_buffer_of_random_events_counts_each_event_in_its_own_bin():
    rng = np.random.default_rng(7)
    count = 3000
    channels = rng.integers(0, 10, count)
    pre = rng.integers(0, 1 << 24, count)
    amplitude = rng.integers(0, RAW_BINS, count)
    piled = rng.random(count) < 0.1
    packets = [
        event(int(c), int(p), (int(p) + int(a) * 256) & 0xFFFFFF,
              flags=PILE_UP if f else 0, samples=2 * (n % 3), timestamp=n)
        for n, (c, p, a, f) in enumerate(zip(channels, pre, amplitude, piled, strict=True))
    ]
    spectra = Spectra(7)
    check_and_add(spectra, [*packets, type_f(0xE)], card=5)
    counts = spectra.counts(5)
    for channel in range(10):
        mine = channels == channel
        # post // 256 - pre // 256 is the amplitude, or one less when the 24-bit post
        # sum wrapped (its low byte is pre's low byte, so the difference is exact).
        wrapped = (pre + amplitude * 256) > 0xFFFFFF
        expected = np.where(wrapped, (amplitude - 65536) % 65536, amplitude)[mine]
        shown = expected[expected < RAW_BINS]
        assert counts.histogram[channel].tolist() == np.bincount(shown, minlength=RAW_BINS).tolist()
        assert counts.events[channel] == mine.sum()
        assert counts.pile_ups[channel] == (mine & piled).sum()


def test_the_walk_refuses_offsets_outside_the_buffer_and_a_wrong_histogram():
    whole = len(event(0, 0, 256))
    words = np.array([*event(0, 0, 256), *type_f(), *event(1, 0, 256)[:5]], dtype=WORD)
    histogram = Spectra(7)._empty()
    # A packet start past the end, before the start, or a digitizer header cut off.
    for offsets in ([len(words) - 3], [-1], [whole + 4]):
        with pytest.raises(ValueError, match="starts outside the buffer or its header ends"):
            _headerwalk.walk(words, np.array(offsets, dtype=np.int64), None, histogram)
    assert histogram.sum() == 0
    walked = _headerwalk.walk(words, np.array([0, whole], dtype=np.int64), None, histogram)
    assert walked[2] == histogram.sum() == 1  # the event counted, not the type-F header
    with pytest.raises(ValueError, match="histogram must have 1310720 bins, got 16"):
        _headerwalk.walk(words, np.array([0], dtype=np.int64), None, histogram[:16])
    with pytest.raises(TypeError, match="offsets must hold 8-byte items"):
        _headerwalk.walk(words, np.array([0], dtype=np.int32), None, histogram)
    with pytest.raises(ValueError, match="last must hold 16 timestamps, got 10"):
        _headerwalk.walk(words, np.array([0], dtype=np.int64), np.zeros(10, np.int64), None)


def test_a_buffer_with_a_fatal_error_is_not_counted():
    spectra = Spectra(7)
    words = np.array([*event(0, 0, 256 * 9), *event(1, 0, 256)[:6]], dtype=WORD)
    serial = spectra.serial(0)
    result = Checker().check(words, 0, histogram=spectra.table(0))
    spectra.added(0, result.counted)
    assert result.fatal and result.events == 1 and result.counted == 0
    assert spectra.counts(0).events.sum() == 0
    assert spectra.serial(0) == serial, "nothing counted: nothing to publish again"


def test_a_buffer_of_status_headers_only_leaves_the_spectra_unchanged():
    """At idle the boards send empty-FIFO headers: they must not make the spectra be
    published again every second."""
    spectra = Spectra(7)
    serial = spectra.serial(0)
    check_and_add(spectra, [type_f(0xE)])
    assert spectra.serial(0) == serial
    check_and_add(spectra, [event(0, 0, 256)])
    assert spectra.serial(0) == serial + 1


def test_a_reset_zeroes_one_card_and_is_seen_by_readers():
    spectra = Spectra(7)
    check_and_add(spectra, [event(0, 0, 256, timestamp=1)], card=0)
    check_and_add(spectra, [event(0, 0, 256, timestamp=1)], card=1)
    before = spectra.counts(0)
    spectra.reset(0)
    after = spectra.counts(0)
    assert after.events.sum() == 0 and after.resets == before.resets + 1
    assert spectra.counts(1).events.sum() == 1
    spectra.reset()
    assert spectra.counts(1).events.sum() == 0



def test_readers_copying_while_buffers_are_counted_see_counts_only_grow_to_the_whole():
    """outLoop counts without waiting for readers: a copy may hold part of a buffer,
    never more than was counted, never less than before, and nothing is lost."""
    packets = [event(n % 10, 0, 256 * (1 + n), timestamp=n) for n in range(100)]
    words = np.array([w for packet in packets for w in packet], dtype=WORD)
    spectra = Spectra(7)
    buffers = 2000

    def count() -> None:
        checker = Checker()
        for _ in range(buffers):
            checker.forget_all()
            spectra.added(3, checker.check(words, 3, histogram=spectra.table(3)).counted)

    counter = threading.Thread(target=count)
    counter.start()
    seen, serials, deadline = [], [], time.monotonic() + 30
    while counter.is_alive() and time.monotonic() < deadline:
        counts = spectra.counts(3)
        seen.append(int(counts.events.sum()))
        serials.append(counts.serial)
        assert counts.histogram.sum() <= buffers * len(packets)
    counter.join(timeout=30)
    assert not counter.is_alive()
    assert len(seen) > 1, "the reader never ran beside the counting"
    assert seen == sorted(seen) and serials == sorted(serials)
    final = spectra.counts(3)
    assert final.events.tolist() == [buffers * 10] * 10
    assert final.serial == buffers
    assert raw_bin(spectra, 3, 0) == {1 + n: buffers for n in range(0, 100, 10)}

def test_rebinning_applies_gain_offset_and_bin_width():
    histogram = np.zeros(RAW_BINS, dtype=np.int64)
    histogram[4693] = 7  # the 1173.2 keV line at the simulator's 4 units per keV
    assert np.flatnonzero(rebin(histogram, 0.25, 0.0, 1.0)).tolist() == [1173]
    assert np.flatnonzero(rebin(histogram, 0.25, 10.0, 1.0)).tolist() == [1183]
    assert np.flatnonzero(rebin(histogram, 0.25, 0.0, 2.0)).tolist() == [586]
    assert rebin(histogram, 0.25, 0.0, 1.0, bins=1000).sum() == 0
    assert rebin(histogram, 0.25, 0.0, 1.0).sum() == 7


BOARD = """
[[crate]]
crate = "01"
[[crate.board]]
name = "MDIG1"
kind = "digitizer_master"
card = 0
slot = 3
package_data = 101
"""


def test_calibration_comes_from_the_configuration_or_the_backend():
    gains = [0.5 + n / 10 for n in range(10)]
    offsets = "cal_offset = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
    system = parse_config(f"{BOARD}cal_gain = {gains}\n{offsets}\n", "t.toml")
    board = system.crates[0].boards[0]
    assert default_calibration(board, simulated=True) == (tuple(gains), tuple(range(1, 11)))
    assert parse_config(dump_config(system), "again.toml") == system
    plain = parse_config(BOARD, "t.toml").crates[0].boards[0]
    assert default_calibration(plain, simulated=True)[0] == (SIM_KEV_PER_UNIT,) * 10
    assert SIM_KEV_PER_UNIT == 0.25
    assert default_calibration(plain, simulated=False) == ((1.0,) * 10, (0.0,) * 10)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cal_gain = [1, 2]", "cal_gain must be an array of 10 numbers"),
        ("cal_gain = [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, -1]",
         "cal_gain must hold numbers 1e-06..1000"),
        ('cal_offset = ["a", 0, 0, 0, 0, 0, 0, 0, 0, 0]', "cal_offset must be an array of 10"),
        ("cal_gain = 0.25", "cal_gain must be an array, got float 0.25"),
    ],
)
def test_a_bad_calibration_in_the_configuration_is_named(line, message):
    with pytest.raises(ConfigError, match="board MDIG1") as error:
        parse_config(BOARD + line + "\n", "t.toml")
    assert message in str(error.value)


def test_spectrum_bins_are_a_crate_key_with_limits():
    crate = BOARD.replace('crate = "01"', 'crate = "01"\nspectrum_bins = 8192')
    assert parse_config(crate, "t.toml").crates[0].spectrum_bins == 8192
    assert parse_config(BOARD, "t.toml").crates[0].spectrum_bins == 4096
    with pytest.raises(ConfigError, match=r"spectrum_bins must be 64\.\.16384, got 100000"):
        parse_config(BOARD.replace('crate = "01"', 'crate = "01"\nspectrum_bins = 100000'), "t")

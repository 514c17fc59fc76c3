"""outLoop's buffer check: codes 1..8, records, fatality, realign, switches, trace capture."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ioc import packets
from ioc.checker import SHALLOW_EVENTS, Checker, CheckError
from ioc.hardware import WORD


def pack_event(
    channel: int = 0,
    timestamp: int = 0,
    *,
    header_type: int = packets.HEADER_TYPE_LED,
    samples: int = 0,
) -> np.ndarray:
    """One digitizer event of board 101 in slot 3 with ``samples`` trace samples."""
    length = packets.DIGITIZER_HEADER_LENGTH + samples // 2
    words = np.zeros(length + 1, dtype=WORD)
    words[0] = packets.MARKER
    words[1] = packets.word1(3, length, 101, channel)
    words[2] = timestamp & 0xFFFFFFFF
    words[3] = packets.word3(packets.DIGITIZER_HEADER_LENGTH, 0, header_type, timestamp)
    words[packets.HEADER_WORDS :] = np.arange(samples // 2) | 0x1000_0000
    return words


def join(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=WORD) for part in parts])


def records(result) -> list[tuple[int, int, int, int]]:
    return [error.record() for error in result.errors]


def test_clean_buffer_has_no_errors_and_counts_every_event():
    buffer = join(*(pack_event(i % 10, i, samples=2 * (i % 3)) for i in range(300)))
    result = Checker().check(buffer, card=0)
    assert result.errors == []
    assert not result.fatal
    assert result.events == 300


def test_packet_words_only_for_one_unbroken_chain_of_equal_packets():
    uniform = join(*(pack_event(i % 10, i, samples=200) for i in range(50)))
    assert Checker().check(uniform, card=0).packet_words == packets.HEADER_WORDS + 100
    equal_total = join(pack_event(samples=20), pack_event(samples=18), pack_event(samples=22))
    assert equal_total.size == 3 * (packets.HEADER_WORDS + 10)
    assert Checker().check(equal_total, card=0).packet_words == 0
    junk_inside = join(uniform[:114], [7], uniform[114:-1])
    assert Checker().check(junk_inside, card=0).packet_words == 0
    longer = join(*(pack_event(i % 10, i) for i in range(SHALLOW_EVENTS + 1)))
    assert Checker().check(longer, card=0, max_events=SHALLOW_EVENTS).packet_words == 0
    assert Checker().check(longer, card=0).packet_words == 14


def test_code_1_empty_buffer():
    result = Checker().check(np.zeros(0, dtype=WORD), card=0)
    assert records(result) == [(1, 0, 0, 0)]
    assert result.fatal and result.errors[0].fatal
    assert result.events == 0


def test_code_2_realigns_once_per_junk_span_and_goes_on():
    buffer = join(
        pack_event(0, 1), [0x12345678, 5, 6], pack_event(1, 2), [0x9], pack_event(2, 3)
    )
    result = Checker().check(buffer, card=0)
    assert records(result) == [(2, 14, buffer.size, 0x12345678), (2, 31, buffer.size, 0x9)]
    assert not result.fatal
    assert [error.fatal for error in result.errors] == [False, False]
    assert result.events == 3


def test_code_2_at_word_0():
    buffer = join([0xCAFE], pack_event(0, 1))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(2, 0, 15, 0xCAFE)]
    assert result.events == 1


def test_code_2_is_fatal_when_no_marker_follows():
    buffer = join(pack_event(0, 1), [0xBAD, 0, 0, 0, 0, 0])
    result = Checker().check(buffer, card=0)
    assert records(result) == [(2, 14, 20, 0xBAD)]
    assert result.fatal and result.errors[0].fatal
    assert result.events == 1


def test_code_3_fewer_than_4_words_left():
    buffer = join(pack_event(0, 1), pack_event(1, 2)[:3])
    result = Checker().check(buffer, card=0)
    assert records(result) == [(3, 14, 17, 3)]
    assert result.fatal
    assert result.events == 1


def test_code_4_event_extends_past_the_end():
    buffer = join(pack_event(0, 1), pack_event(1, 2, samples=10)[:12])
    result = Checker().check(buffer, card=0)
    assert records(result) == [(4, 14, 26, 18)]
    assert result.fatal


def test_code_5_wins_over_code_4_for_the_bad_length_fault():
    bad = pack_event(1, 2)
    bad[1] = packets.word1(3, 600, 101, 1)
    buffer = join(pack_event(0, 1), bad, pack_event(2, 3))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(5, 14, buffer.size, 600)]
    assert result.fatal
    assert result.events == 1


def test_code_6_type_f_with_an_ordinary_channel_id():
    header = packets.type_f_words(3, 101, 3, 0, 5)
    result = Checker().check(join(pack_event(0, 1), header), card=0)
    assert records(result) == [(6, 14, 3, 3)]
    assert result.fatal


def test_code_7_ordinary_event_with_channel_above_9():
    buffer = join(pack_event(0, 1), pack_event(12, 2, header_type=packets.HEADER_TYPE_CFD))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(7, 14, 12, 8)]
    assert result.fatal


def test_type_f_headers_with_their_channel_ids_pass():
    checker = Checker()
    for channel, event_type in ((0xD, 0), (0xE, 0), (0xF, 1), (0xF, 2)):
        result = checker.check(packets.type_f_words(3, 101, channel, event_type, 9), card=1)
        assert result.errors == []
        assert result.events == 1
        assert result.first_event_by_channel == {}


def test_code_8_compares_within_a_channel_only():
    buffer = join(pack_event(2, 100), pack_event(5, 50), pack_event(2, 200), pack_event(2, 150))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(8, 42, 200, 150)]
    assert not result.fatal
    assert result.events == 4


def test_code_8_equal_timestamps_are_in_order():
    buffer = join(pack_event(1, 7), pack_event(1, 7))
    assert Checker().check(buffer, card=0).errors == []


def test_code_8_compares_all_48_bits():
    high, low = 0x1_0000_0000, 0x0_FFFF_FFFF
    result = Checker().check(join(pack_event(3, high), pack_event(3, low)), card=0)
    assert records(result) == [(8, 14, high, low)]


def test_code_8_compares_with_the_previous_event_not_the_maximum():
    buffer = join(pack_event(4, 100), pack_event(4, 50), pack_event(4, 60), pack_event(4, 10))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(8, 14, 100, 50), (8, 42, 60, 10)]


def test_code_8_across_buffers_until_forget():
    checker = Checker()
    assert checker.check(join(pack_event(1, 1000), pack_event(2, 5)), card=0).errors == []
    result = checker.check(join(pack_event(2, 6), pack_event(1, 500)), card=0)
    assert records(result) == [(8, 14, 1000, 500)]
    assert checker.check(pack_event(1, 400), card=0).errors[0].record() == (8, 0, 500, 400)
    checker.forget(0)
    assert checker.check(pack_event(1, 300), card=0).errors == []


def test_code_8_memory_is_per_card():
    checker = Checker(cards=3)
    checker.check(pack_event(1, 1000), card=0)
    checker.check(pack_event(1, 1000), card=2)
    assert checker.check(pack_event(1, 10), card=1).errors == []
    checker.forget(0)
    assert checker.check(pack_event(1, 10), card=0).errors == []
    assert checker.check(pack_event(1, 10), card=2).errors[0].code == 8
    checker.forget_all()
    assert checker.check(pack_event(1, 5), card=2).errors == []


def test_timestamps_off_skips_code_8_only():
    checker = Checker()
    backwards = join(pack_event(1, 10), pack_event(1, 5))
    assert checker.check(backwards, card=0, timestamps=False).errors == []
    bad = join(backwards, pack_event(11, 20))
    result = checker.check(bad, card=0, timestamps=False)
    assert records(result) == [(7, 28, 11, 7)]


def test_realign_then_continue_and_find_later_errors_in_order():
    buffer = join(pack_event(1, 50), [1, 2], pack_event(1, 40), pack_event(13, 60))
    result = Checker().check(buffer, card=0)
    assert records(result) == [(2, 14, buffer.size, 1), (8, 16, 50, 40), (7, 30, 13, 7)]
    assert [error.fatal for error in result.errors] == [False, False, True]
    assert result.fatal
    assert result.events == 2


def test_max_events_walks_only_the_first_events():
    good = [pack_event(i % 10, 1000 + i) for i in range(SHALLOW_EVENTS)]
    late_backwards = pack_event(0, 1)
    late_fatal = pack_event(12, 2000)
    buffer = join(*good, late_backwards, late_fatal)
    checker = Checker()
    capped = checker.check(buffer, card=0, max_events=SHALLOW_EVENTS)
    assert capped.events == SHALLOW_EVENTS
    assert capped.errors == []
    checker.forget_all()
    full = checker.check(buffer, card=0)
    assert [error.code for error in full.errors] == [8, 7]
    assert full.events == SHALLOW_EVENTS + 1


def test_first_event_by_channel_skips_type_f_headers():
    buffer = join(
        packets.type_f_words(3, 101, 0xE, 0, 1),
        pack_event(4, 10, samples=20),
        pack_event(7, 11),
        pack_event(4, 12, samples=40),
    )
    result = Checker().check(buffer, card=0)
    assert result.first_event_by_channel == {4: (4, 23), 7: (28, 13)}


def test_marker_words_in_traces_do_not_disturb_the_check():
    event = pack_event(1, 10, samples=20)
    event[packets.HEADER_WORDS : packets.HEADER_WORDS + 4] = packets.MARKER
    buffer = join(event, pack_event(2, 11), event, pack_event(1, 12))
    result = Checker().check(buffer, card=0)
    assert result.errors == []
    assert result.events == 4


def test_record_is_code_offset_extra1_extra2():
    error = CheckError(code=5, offset=14, extra1=40, extra2=600, fatal=True)
    assert error.record() == (5, 14, 40, 600)


def reference_check(words: list[int], last: dict[int, int]) -> list[tuple]:
    """Spec 02 §3 walked one word at a time, as the original C loop did."""
    size = len(words)
    if size == 0:
        return [(1, 0, 0, 0, True)]
    errors: list[tuple] = []
    offset = 0
    while offset < size:
        if words[offset] != packets.MARKER:
            junk = offset
            while offset < size and words[offset] != packets.MARKER:
                offset += 1
            errors.append((2, junk, size, words[junk], offset == size))
            if offset == size:
                return errors
        if size - offset < 4:
            return [*errors, (3, offset, size, size - offset, True)]
        w1, w2, w3 = words[offset + 1 : offset + 4]
        length, channel = (w1 >> 16) & 0x7FF, w1 & 0xF
        htype = (w3 >> 16) & 0xF
        if length > 510:
            return [*errors, (5, offset, size, length, True)]
        if offset + length + 1 > size:
            return [*errors, (4, offset, size, length, True)]
        if htype == 0xF and channel < 0xD:
            return [*errors, (6, offset, channel, length, True)]
        if htype != 0xF and channel > 9:
            return [*errors, (7, offset, channel, htype, True)]
        stamp = (w3 & 0xFFFF) << 32 | w2
        if channel in last and stamp < last[channel]:
            errors.append((8, offset, last[channel], stamp, False))
        last[channel] = stamp
        offset += length + 1
    return errors


mutations = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.sampled_from(["marker", "random", "truncate", "length", "channel", "junk"]),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), mutations)
def test_vectorised_check_agrees_with_a_word_by_word_walk(seed, nevents, changes):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(nevents):
        channel = int(rng.integers(0, 10))
        stamp = int(rng.integers(0, 1 << 48)) if rng.random() < 0.1 else int(rng.integers(0, 50))
        parts.append(pack_event(channel, stamp, samples=int(rng.choice([0, 2, 30]))))
        if rng.random() < 0.05:
            parts.append(packets.type_f_words(3, 101, int(rng.choice([0xD, 0xE, 0xF])), 0, 7))
    buffer = join(*parts)
    for where, how in changes:
        where %= buffer.size
        if how == "marker":
            buffer[where] = packets.MARKER
        elif how == "random":
            buffer[where] = int(rng.integers(0, 1 << 32))
        elif how == "truncate":
            buffer = buffer[:where]
        elif how == "length":
            buffer[where] = packets.word1(3, int(rng.integers(0, 2048)), 101, 0)
        elif how == "channel":
            starts = np.flatnonzero(buffer[: buffer.size - 1] == packets.MARKER)
            if starts.size:
                start = int(starts[where % starts.size]) + 1
                buffer[start] = (int(buffer[start]) & ~0xF) | int(rng.integers(0, 16))
        else:
            buffer = np.insert(buffer, where, rng.integers(0, 1 << 32, 3).astype(WORD))
        if buffer.size == 0:
            break
    expected = reference_check([int(word) for word in buffer], {})
    result = Checker().check(buffer, card=0)
    got = [(*error.record(), error.fatal) for error in result.errors]
    assert got == expected

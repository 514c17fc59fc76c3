"""The sampling tap's selection, modes and bounds, on buffers packed as spec 04 says."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ioc import packets
from ioc.hardware import WORD
from ioc.pool import Buffer
from ioc.sample_filter import FILTER_LENGTH, Mode, SampleFilter, Source
from ioc.sampling import KEEP_PERIOD_S, TRIGGER_BOARD_TYPE, SampleTap

BOARD = 101


def packed(channels, energies, flags=None, event_type=0, trace_words=0) -> np.ndarray:
    """Digitizer events of board 101 back to back: header words 0..13 and a trace."""
    n = packets.HEADER_WORDS - 1 + trace_words
    events = []
    for index, (channel, energy) in enumerate(zip(channels, energies, strict=True)):
        words = np.zeros(n + 1, dtype=np.int64)
        words[0] = packets.MARKER
        words[1] = packets.word1(3, n, BOARD, channel)
        words[2] = 1000 + index
        words[3] = packets.word3(13, event_type, packets.HEADER_TYPE_LED, 1000 + index)
        words[4] = 0 if flags is None else flags[index]
        pre = 5000
        post = pre + energy * FILTER_LENGTH
        words[8] = (post & 0xFF) << 24 | pre
        words[9] = post >> 8 & 0xFFFF
        words[14:] = np.arange(trace_words) | (np.arange(trace_words) + 1) << 16
        events.append(words)
    return np.concatenate(events).astype(WORD)


def buffer_of(words: np.ndarray, packet_words: int = 0) -> Buffer:
    buf = Buffer(1, words.nbytes)
    buf.words[: words.size] = words
    buf.nbytes = words.nbytes
    buf.card = 0
    buf.packet_words = packet_words
    return buf


@pytest.mark.parametrize("packet_words", [0, 14])  # found by the decoder / known from the check
def test_a_filter_takes_exactly_its_events_with_their_fields(packet_words):
    channels = [0, 1, 2, 3] * 25
    energies = list(range(100, 200))
    flags = [0x8000 if i % 2 else 0x0040 for i in range(100)]
    tap = SampleTap()
    consumer = tap.attach(SampleFilter.parse("board=101 ch=1-2 energy=120-179 flags_all=0x8000"))
    other_board = tap.attach(SampleFilter.parse("board=102"))
    tap.offer(buffer_of(packed(channels, energies, flags), packet_words))
    (chunk,) = consumer.take(1000, 0)
    expected = [i for i in range(100)
                if channels[i] in (1, 2) and 120 <= energies[i] <= 179 and flags[i] == 0x8000]
    assert chunk.events()["energy"].tolist() == [energies[i] for i in expected]
    assert chunk.events()["channel"].tolist() == [channels[i] for i in expected]
    assert set(chunk.events()["board"].tolist()) == {BOARD}
    assert chunk.events()["timestamp"].tolist() == [1000 + i for i in expected]
    for row, event in enumerate(chunk.events()):  # each packet copied whole
        words = chunk.words[event["offset"] : event["offset"] + event["length"] + 1]
        assert int(words[0]) == packets.MARKER and int(words[2]) == 1000 + expected[row]
    assert other_board.take(1000, 0) == []


def test_prescale_takes_one_in_n_across_buffers():
    tap = SampleTap()
    consumer = tap.attach(SampleFilter(mode=Mode.PRESCALE, count=7))
    for _ in range(10):
        tap.offer(buffer_of(packed([0] * 33, [500] * 33)))
    taken = sum(chunk.count for chunk in consumer.take(10_000, 0))
    assert taken == len(range(0, 330, 7))


def test_recent_and_ready_keep_only_the_newest_refreshed_at_most_every_period():
    tap = SampleTap()
    recent = tap.attach(SampleFilter.parse("recent"))
    ready = tap.attach(SampleFilter.parse("ready=5"))
    tap.offer(buffer_of(packed([0] * 40, list(range(1, 41)))))
    time.sleep(KEEP_PERIOD_S * 1.5)  # the refresh period is the point here
    second, third = (buffer_of(packed([0] * 40, list(range(a, a + 40)))) for a in (41, 81))
    tap.offer(second)
    tap.offer(third)  # within the period: kept out
    assert [c.events()["energy"].tolist() for c in recent.take(100, 0)] == [[80]]
    got = np.concatenate([c.events()["energy"] for c in ready.take(100, 0)]).tolist()
    assert got == [76, 77, 78, 79, 80]


def test_a_full_queue_drops_and_counts_only_for_its_consumer():
    tap = SampleTap(queue_events=50)
    slow = tap.attach(SampleFilter())
    fast = tap.attach(SampleFilter())
    for _ in range(3):
        tap.offer(buffer_of(packed([0] * 40, [300] * 40)))
        fast.take(1000, 0)
    assert (slow.queued, slow.lost, slow.delivered) == (50, 70, 0)
    assert (fast.lost, fast.delivered) == (0, 120)
    assert tap.totals() == (2, 120, 70)
    tap.detach(slow.id)
    assert tap.totals() == (1, 120, 70)


def test_only_consumers_of_the_classic_port_get_end_of_run_headers():
    tap = SampleTap()
    classic = tap.attach(SampleFilter.parse("board=999"), end_of_run=True)
    pva = tap.attach(SampleFilter())
    words = packets.type_f_words(3, BOARD, packets.CH_END_OF_RUN, 0, 1234)
    buf = buffer_of(words)
    buf.is_type_f = True
    tap.offer(buf)
    (chunk,) = classic.take(10, 0)
    assert chunk.end_of_run and chunk.words.tolist() == words.tolist()
    assert pva.take(10, 0) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [("ch=12", "channels are 0..9"), ("prescale=0", "at least 1"), ("colour=red", "unknown"),
     ("energy=abc", "energy=LOW-HIGH")],
)
def test_bad_filters_are_refused_with_the_reason(text, problem):
    with pytest.raises(ValueError, match=problem):
        SampleFilter.parse(text)


def test_a_filter_reads_back_as_written():
    text = "board=101,102 ch=0,1,2,3 header_type=7 flags_all=0x8000 energy=100-4000 prescale=100"
    assert SampleFilter.parse(text).text() == text
    assert SampleFilter.parse(SampleFilter.parse(text).text()) == SampleFilter.parse(text)


def trigger_packets(types, masks) -> np.ndarray:
    """Master-trigger packets (spec 04): 16-bit values in 16 words each."""
    rows = np.zeros((len(types), packets.TRIGGER_WORDS), dtype=np.int64)
    for index, (trigger_type, mask) in enumerate(zip(types, masks, strict=True)):
        timestamp = 0x0001_2345_0000 + index
        rows[index, :10] = [packets.TRIGGER_MARKER, trigger_type, timestamp >> 32,
                            timestamp >> 16 & 0xFFFF, timestamp & 0xFFFF, index, 1 + index % 8,
                            0, 0, mask]
    return rows.reshape(-1).astype(WORD)


def trigger_buffer(words: np.ndarray, card: int = 4) -> Buffer:
    buf = buffer_of(words)
    buf.card = card
    buf.board_type = TRIGGER_BOARD_TYPE
    return buf


def test_trigger_packets_are_sampled_by_type_and_bit_mask_and_name_their_board():
    types = [1, 2, 4] * 20
    masks = [0x1 | (0x4 if i % 3 == 0 else 0) for i in range(60)]
    tap = SampleTap()
    tap.set_run_boards({0: BOARD, 4: 110})
    wanted = tap.attach(SampleFilter.parse("trigger_type=1 trigger_all=0x4"))
    no_bit = tap.attach(SampleFilter.parse("trigger_none=0x4"))
    both = tap.attach(SampleFilter.parse("source=any"))
    digitizer_only = tap.attach(SampleFilter())
    other_board = tap.attach(SampleFilter.parse("board=111 trigger"))
    tap.offer(trigger_buffer(trigger_packets(types, masks)))
    tap.offer(buffer_of(packed([0, 1], [300, 400])))

    (chunk,) = wanted.take(1000, 0)
    events = chunk.events()
    expected = [i for i in range(60) if types[i] == 1 and masks[i] & 0x4]
    assert events["timestamp"].tolist() == [0x0001_2345_0000 + i for i in expected]
    assert set(events["trigger_type"].tolist()) == {1}
    assert events["multiplicity"].tolist() == [1 + i % 8 for i in expected]
    assert set(events["board"].tolist()) == {110}
    assert set(events["channel"].tolist()) == {packets.TRIGGER_CHANNEL}
    assert not events["energy"].any() and not events["header_type"].any()
    for row, event in enumerate(events):  # each 16-word packet copied whole
        words = chunk.words[event["offset"] : event["offset"] + event["length"] + 1]
        assert words.size == 16 and int(words[0]) == packets.TRIGGER_MARKER
        assert int(words[5]) == expected[row]
    assert sum(c.count for c in no_bit.take(1000, 0)) == sum(1 for m in masks if not m & 0x4)
    taken = both.take(1000, 0)
    assert [c.is_trigger for c in taken] == [True, False]
    assert [c.count for c in taken] == [60, 2]
    assert [c.is_trigger for c in digitizer_only.take(1000, 0)] == [False]
    assert other_board.take(1000, 0) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [("trigger ch=1", "ch select digitizer events"),
     ("source=digitizer trigger_type=2", "trigger_type select trigger packets"),
     ("source=triggers", "digitizer, trigger or any")],
)
def test_filters_mixing_digitizer_and_trigger_terms_are_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        SampleFilter.parse(text)


def test_trigger_filters_read_back_as_written():
    for text in ("board=110 source=trigger trigger_type=2 trigger_all=0x5 trigger_none=0x8",
                 "ch=0 source=any trigger_type=1 prescale=10"):
        assert SampleFilter.parse(text).text() == text
    assert SampleFilter.parse("trigger_type=4").source is Source.TRIGGER

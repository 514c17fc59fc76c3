"""The shared packet decoder: events, traces, type-F headers, trigger packets, garbage."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ioc import packets
from ioc.decoder import (
    EVENT_DTYPE,
    KIND_EVENT,
    KIND_TRIGGER,
    KIND_TYPE_F,
    decode,
    event_words,
    payload_words,
    trace_of,
)
from ioc.hardware import WORD


def pack_event(
    channel: int = 0,
    timestamp: int = 0,
    *,
    slot: int = 3,
    board: int = 101,
    header_type: int = packets.HEADER_TYPE_LED,
    event_type: int = 0,
    samples=(),
) -> np.ndarray:
    """One digitizer event; ``samples`` (an even count, 16-bit halves) become its trace."""
    samples = np.asarray(samples, dtype=np.uint32)
    length = packets.DIGITIZER_HEADER_LENGTH + samples.size // 2
    words = np.zeros(length + 1, dtype=WORD)
    words[0] = packets.MARKER
    words[1] = packets.word1(slot, length, board, channel)
    words[2] = timestamp & 0xFFFFFFFF
    words[3] = packets.word3(packets.DIGITIZER_HEADER_LENGTH, event_type, header_type, timestamp)
    words[packets.HEADER_WORDS :] = samples[0::2] | samples[1::2] << 16
    return words


def pack_trigger(trigger_type: int, timestamp: int, fill: int = 0) -> np.ndarray:
    """One 16-word master-trigger packet."""
    words = np.full(packets.TRIGGER_WORDS, fill, dtype=WORD)
    words[0] = packets.TRIGGER_MARKER
    words[1] = trigger_type
    words[2] = (timestamp >> 32) & 0xFFFF
    words[3] = (timestamp >> 16) & 0xFFFF
    words[4] = timestamp & 0xFFFF
    return words


def join(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=WORD) for part in parts])


def test_header_only_events_decode_every_field():
    parts = [pack_event(ch, 1000 + ch, event_type=ch % 8) for ch in range(10)]
    buffer = join(*parts)
    decoded = decode(buffer)
    assert decoded.unknown == []
    assert decoded.events.dtype == EVENT_DTYPE
    assert decoded.events["offset"].tolist() == [14 * i for i in range(10)]
    assert decoded.events["length"].tolist() == [13] * 10
    assert decoded.events["slot"].tolist() == [3] * 10
    assert decoded.events["board"].tolist() == [101] * 10
    assert decoded.events["channel"].tolist() == list(range(10))
    assert decoded.events["header_type"].tolist() == [7] * 10
    assert decoded.events["event_type"].tolist() == [ch % 8 for ch in range(10)]
    assert decoded.events["timestamp"].tolist() == [1000 + ch for ch in range(10)]
    assert decoded.events["kind"].tolist() == [KIND_EVENT] * 10


def test_timestamp_keeps_all_48_bits():
    stamp = 0xFFFF_FFFF_FFFF
    (event,) = decode(pack_event(timestamp=stamp)).events
    assert int(event["timestamp"]) == stamp


def test_trace_samples_come_back_in_time_order():
    samples = np.arange(200, dtype=np.uint32) * 7 + 11
    buffer = join(pack_event(1, 5), pack_event(2, 6, header_type=8, samples=samples))
    decoded = decode(buffer)
    first, second = decoded.events
    assert int(second["length"]) == 13 + 100
    assert int(second["header_type"]) == 8
    assert trace_of(buffer, second).tolist() == samples.tolist()
    assert trace_of(buffer, first).size == 0


def test_trace_marks_are_masked_unless_raw():
    samples = np.array([0x4001, 0x8002, 0xC003, 0x0004], dtype=np.uint32)
    buffer = pack_event(samples=samples)
    (event,) = decode(buffer).events
    assert trace_of(buffer, event).tolist() == [1, 2, 3, 4]
    assert trace_of(buffer, event, raw=True).tolist() == samples.tolist()
    assert trace_of(buffer, (0, int(event["length"])), raw=True).tolist() == samples.tolist()


def test_marker_words_inside_a_trace_are_ignored():
    # A trace word of 0xAAAAAAAA, and a fake packet inside a trace whose length
    # even lands exactly on the next real event.
    fake = pack_event(9, 1, board=7)[:4].tolist()
    trace = [0xAAAA, 0xAAAA] + [0, 0] * 3
    fake_halves = [half for word in fake for half in (word & 0xFFFF, word >> 16)]
    samples = trace + fake_halves + [0, 0] * 4
    first = pack_event(1, 10, samples=samples)
    # Point the fake packet's length at the start of the next real event.
    fake_at = packets.HEADER_WORDS + len(trace) // 2
    first[fake_at + 1] = packets.word1(3, first.size - fake_at - 1, 7, 9)
    buffer = join(first, pack_event(2, 20), pack_event(3, 30))
    decoded = decode(buffer)
    assert decoded.unknown == []
    assert decoded.events["channel"].tolist() == [1, 2, 3]
    assert decoded.events["board"].tolist() == [101, 101, 101]
    assert trace_of(buffer, decoded.events[0], raw=True)[:2].tolist() == [0xAAAA, 0xAAAA]


def test_garbage_before_between_and_after_events_is_reported():
    buffer = join(
        [1, 2, 3],
        pack_event(0, 1),
        [0xDEADBEEF] * 5,
        pack_event(1, 2),
        pack_event(2, 3),
        [7, 8],
    )
    decoded = decode(buffer)
    assert decoded.events["channel"].tolist() == [0, 1, 2]
    assert decoded.events["offset"].tolist() == [3, 3 + 14 + 5, 3 + 14 + 5 + 14]
    assert decoded.unknown == [(0, 3), (17, 5), (buffer.size - 2, 2)]
    assert decoded.unknown_words == 10


def test_a_truncated_last_event_is_garbage_not_an_event():
    buffer = join(pack_event(0, 1), pack_event(1, 2)[:9])
    decoded = decode(buffer)
    assert decoded.events["channel"].tolist() == [0]
    assert decoded.unknown == [(14, 9)]


def test_impossible_lengths_are_skipped_and_merged_into_one_span():
    too_long = pack_event(4, 1)
    too_long[1] = packets.word1(3, 600, 101, 4)
    too_short = pack_event(5, 1)
    too_short[1] = packets.word1(3, 1, 101, 5)
    buffer = join(pack_event(0, 1), too_long, too_short, [9], pack_event(1, 2))
    decoded = decode(buffer)
    assert decoded.events["channel"].tolist() == [0, 1]
    assert decoded.unknown == [(14, 14 + 14 + 1)]


def test_a_buffer_of_nothing_but_markers_is_one_garbage_span():
    buffer = np.full(1 << 18, packets.MARKER, dtype=WORD)
    decoded = decode(buffer)
    assert decoded.events.size == 0
    assert decoded.unknown == [(0, buffer.size)]


def test_empty_buffer_decodes_to_nothing():
    decoded = decode(np.zeros(0, dtype=WORD))
    assert decoded.events.size == 0
    assert decoded.unknown == []


def test_type_f_headers_decode_alone_and_mixed_with_events():
    overflow = packets.type_f_words(5, 222, packets.CH_ERROR, packets.EVENT_TYPE_OVERFLOW, 77)
    decoded = decode(overflow)
    (header,) = decoded.events
    assert int(header["kind"]) == KIND_TYPE_F
    assert (int(header["slot"]), int(header["board"]), int(header["channel"])) == (5, 222, 0xF)
    assert (int(header["event_type"]), int(header["timestamp"])) == (1, 77)

    buffer = join(pack_event(0, 1), overflow, pack_event(1, 2, samples=[1, 2]))
    decoded = decode(buffer)
    assert decoded.unknown == []
    assert decoded.events["kind"].tolist() == [KIND_EVENT, KIND_TYPE_F, KIND_EVENT]
    assert decoded.events["length"].tolist() == [13, 3, 14]
    assert trace_of(buffer, decoded.events[1]).size == 0


def test_trigger_packets_decode_with_type_and_timestamp():
    stamps = [0x0001_2345_6789, 0x0001_2345_678A, 0xFFFF_FFFF_FFFF]
    buffer = join(*(pack_trigger(i + 1, stamp) for i, stamp in enumerate(stamps)))
    decoded = decode(buffer, trigger=True)
    assert decoded.unknown == []
    events = decoded.events
    assert events["offset"].tolist() == [0, 16, 32]
    assert events["length"].tolist() == [15, 15, 15]
    assert events["kind"].tolist() == [KIND_TRIGGER] * 3
    assert events["event_type"].tolist() == [1, 2, 3]
    assert events["timestamp"].tolist() == stamps
    assert events["board"].tolist() == [0, 0, 0]


def test_trigger_marker_values_inside_trigger_data_are_ignored():
    buffer = join(pack_trigger(1, 10, fill=packets.TRIGGER_MARKER), pack_trigger(2, 11))
    decoded = decode(buffer, trigger=True)
    assert decoded.unknown == []
    assert decoded.events["event_type"].tolist() == [1, 2]


def test_trigger_buffer_with_its_type_f_header_and_a_partial_packet():
    header = packets.type_f_words(1, 99, packets.CH_EMPTY, 0, 1234)
    buffer = join(header, pack_trigger(4, 5), pack_trigger(6, 7)[:10])
    decoded = decode(buffer, trigger=True)
    assert decoded.events["kind"].tolist() == [KIND_TYPE_F, KIND_TRIGGER]
    assert int(decoded.events[0]["board"]) == 99
    assert decoded.unknown == [(20, 10)]


def test_digitizer_mode_does_not_take_trigger_packets():
    decoded = decode(pack_trigger(1, 2))
    assert decoded.events.size == 0
    assert decoded.unknown == [(0, 16)]


def test_slicing_helpers_return_the_packet_words():
    buffer = join(pack_event(0, 1), pack_event(1, 2, samples=[5, 6]))
    second = decode(buffer).events[1]
    assert event_words(buffer, second).tolist() == buffer[14:].tolist()
    assert payload_words(buffer, second).tolist() == buffer[15:].tolist()
    assert event_words(buffer, (0, 13)).tolist() == buffer[:14].tolist()


def test_native_uint32_input_is_taken_as_word_values():
    buffer = pack_event(4, 99).astype(np.uint32)
    (event,) = decode(buffer).events
    assert (int(event["channel"]), int(event["timestamp"])) == (4, 99)


event_specs = st.lists(
    st.tuples(
        st.integers(0, 9),
        st.integers(0, packets.TIMESTAMP_MASK),
        st.sampled_from([0, 2, 4, 200]),
        st.booleans(),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None, database=None)
@given(event_specs)
def test_any_sequence_of_events_round_trips(specs):
    rng = np.random.default_rng(len(specs))
    parts, traces = [], []
    for channel, stamp, nsamples, with_markers in specs:
        samples = rng.integers(0, 1 << 16, nsamples, dtype=np.uint32)
        if with_markers and nsamples:
            samples[: min(4, nsamples)] = 0xAAAA
        parts.append(pack_event(channel, stamp, samples=samples))
        traces.append(samples.tolist())
    buffer = join(*parts)
    decoded = decode(buffer)
    assert decoded.unknown == []
    assert decoded.events["channel"].tolist() == [spec[0] for spec in specs]
    assert decoded.events["timestamp"].tolist() == [spec[1] for spec in specs]
    assert [trace_of(buffer, e, raw=True).tolist() for e in decoded.events] == traces

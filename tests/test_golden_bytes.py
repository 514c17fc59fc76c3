"""The golden byte examples of spec 04, held literally, against packing and decoding."""

from __future__ import annotations

import numpy as np

from ioc import packets
from ioc.checker import Checker
from ioc.decoder import KIND_EVENT, KIND_TYPE_F, decode
from ioc.hardware import WORD

#: Digitizer event: board 101, slot 3, channel 3, timestamp 0x0001_2345_6789,
#: header type 7, event type 0, no trace (N = 13); words 0..3 on the wire.
GOLDEN_EVENT_HEAD = bytes.fromhex("AAAAAAAA 180D0653 23456789 34070001")
#: Type F end of data (0xD) of board 101 in slot 3 at timestamp 0x0001_2345_6789.
GOLDEN_END_OF_DATA = bytes.fromhex("AAAAAAAA 1803065D 23456789 0C0F0001")
GOLDEN_TIMESTAMP = 0x0001_2345_6789


def test_digitizer_event_words_pack_to_the_golden_bytes():
    words = np.array(
        [
            packets.MARKER,
            packets.word1(slot=3, length=13, board_id=101, channel=3),
            GOLDEN_TIMESTAMP & 0xFFFFFFFF,
            packets.word3(13, 0, packets.HEADER_TYPE_LED, GOLDEN_TIMESTAMP),
        ],
        dtype=WORD,
    )
    assert words.tobytes() == GOLDEN_EVENT_HEAD


def test_golden_digitizer_event_decodes_field_by_field():
    # Words 4..13 of the golden event are not given; zeros make it a whole event.
    buffer = np.frombuffer(GOLDEN_EVENT_HEAD + bytes(10 * 4), dtype=WORD)
    decoded = decode(buffer)
    assert decoded.unknown == []
    assert decoded.events.size == 1
    event = decoded.events[0]
    assert int(event["offset"]) == 0
    assert int(event["length"]) == 13
    assert int(event["slot"]) == 3
    assert int(event["board"]) == 101
    assert int(event["channel"]) == 3
    assert int(event["header_type"]) == 7
    assert int(event["event_type"]) == 0
    assert int(event["timestamp"]) == GOLDEN_TIMESTAMP
    assert int(event["kind"]) == KIND_EVENT


def test_golden_digitizer_event_passes_the_checker():
    buffer = np.frombuffer(GOLDEN_EVENT_HEAD + bytes(10 * 4), dtype=WORD)
    result = Checker().check(buffer, card=0)
    assert result.errors == []
    assert result.events == 1
    assert result.first_event_by_channel == {3: (0, 13)}


def test_end_of_data_header_packs_to_the_golden_bytes():
    words = packets.type_f_words(
        slot=3,
        package_data=101,
        channel=packets.CH_END_OF_RUN,
        event_type=packets.EVENT_TYPE_NONE,
        timestamp=GOLDEN_TIMESTAMP,
    )
    assert words.tobytes() == GOLDEN_END_OF_DATA


def test_golden_end_of_data_header_decodes_field_by_field():
    decoded = decode(np.frombuffer(GOLDEN_END_OF_DATA, dtype=WORD))
    assert decoded.unknown == []
    (event,) = decoded.events
    assert int(event["offset"]) == 0
    assert int(event["length"]) == 3
    assert int(event["slot"]) == 3
    assert int(event["board"]) == 101
    assert int(event["channel"]) == 0xD
    assert int(event["header_type"]) == 0xF
    assert int(event["event_type"]) == 0
    assert int(event["timestamp"]) == GOLDEN_TIMESTAMP
    assert int(event["kind"]) == KIND_TYPE_F


def test_type_f_word3_constants_of_the_spec_table():
    expected = {
        packets.EVENT_TYPE_NONE: bytes.fromhex("0C0F0000"),
        packets.EVENT_TYPE_OVERFLOW: bytes.fromhex("0C8F0000"),
        packets.EVENT_TYPE_UNDERFLOW: bytes.fromhex("0D0F0000"),
    }
    for event_type, wire in expected.items():
        words = packets.type_f_words(3, 101, packets.CH_ERROR, event_type, timestamp=0)
        assert words[3:].tobytes() == wire
        (event,) = decode(words).events
        assert int(event["event_type"]) == event_type


def test_trigger_marker_is_00_00_AA_AA_on_the_wire():
    assert np.array([packets.TRIGGER_MARKER], dtype=WORD).tobytes() == bytes.fromhex("0000AAAA")

"""GEB records from hand-made packets, against spec 04's bytes (receiver/geb.py)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ioc.decoder import decode
from receiver import geb

# Spec 04 golden packets: board 101, slot 3, channel 3, timestamp 0x0001_2345_6789.
GOLDEN_EVENT_HEAD = bytes.fromhex("AAAAAAAA 180D0653 23456789 34070001")
GOLDEN_END_OF_RUN = bytes.fromhex("AAAAAAAA 1803065D 23456789 0C0F0001")
GOLDEN_TIMESTAMP = 0x0001_2345_6789


def words_of(*chunks: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(chunks), dtype=">u4").copy()


def golden_event(tail_words: int = 10) -> bytes:
    """The golden header (N = 13) with words 4..13 = 0x01000000 + i, recognisable bytes."""
    tail = b"".join(struct.pack(">I", 0x0100_0000 + i) for i in range(tail_words))
    return GOLDEN_EVENT_HEAD + tail


def digitizer_packet(board: int, channel: int, timestamp: int, samples: int, slot: int = 3):
    """A digitizer packet, built from spec 04's table (not from ioc.packets)."""
    n = 13 + samples // 2
    words = [
        0xAAAAAAAA,
        slot << 27 | n << 16 | board << 4 | channel,
        timestamp & 0xFFFFFFFF,
        13 << 26 | 7 << 16 | timestamp >> 32,
        *[(0x1000 * channel + i) & 0xFFFFFFFF for i in range(n - 3)],
    ]
    return struct.pack(f">{len(words)}I", *words)


def trigger_packet(values: list[int]) -> bytes:
    assert len(values) == 15
    return struct.pack(">16I", 0x0000AAAA, *values)


def batch_of(data: bytes, **kwargs) -> geb.Batch:
    words = words_of(data)
    trigger = data[:4] == b"\x00\x00\xaa\xaa"
    return geb.make_batch(words, decode(words, trigger=trigger).events, **kwargs)


def test_golden_digitizer_event_becomes_the_spec_record_byte_for_byte():
    batch = batch_of(golden_event())
    expected = (
        bytes.fromhex("0E000000 34000000 8967452301000000")  # type 14, 52 bytes, timestamp
        + golden_event()[4:]  # words 1..13 exactly as received (big-endian)
    )
    assert bytes(batch.data) == expected
    assert batch.bounds.tolist() == [0, 68]
    assert batch.groups == [geb.Group(101, 3, False, 0, 1)]


def test_golden_end_of_run_header_becomes_a_28_byte_record():
    batch = batch_of(GOLDEN_END_OF_RUN)
    assert bytes(batch.data) == bytes.fromhex(
        "0E000000 0C000000 8967452301000000 1803065D 23456789 0C0F0001"
    )
    assert batch.groups == [geb.Group(101, 0xD, False, 0, 1)]


def test_geb_types_are_configurable():
    batch = batch_of(GOLDEN_END_OF_RUN, types=geb.GebTypes(digitizer=3, trigger=4))
    assert bytes(batch.data[:4]) == bytes.fromhex("03000000")


def test_trigger_packet_is_repacked_to_ten_little_endian_words():
    values = [0x0004, 0x0002, 0x3456, 0x789A, 0x0005, 0x0003, 0x0000, 0x1234,
              0x0001, 0x00A0, 0x00A1, 0x00A2, 0x00A3, 0x0007, 0x0008]  # fmt: skip
    batch = batch_of(trigger_packet(values), trigger_board=99)
    # ts = 0x0002_3456_789A; board 99 = 0x63 -> word 1 = 0x000A0630.
    expected = bytes.fromhex(
        "0F000000 28000000 9A78563402000000"  # type 15, 40 bytes, timestamp
        "AAAAAAAA 30060A00 9A785634 02000E0C"  # marker, 10<<16|99<<4, ts 31:0, 3<<26|E<<16|ts 47:32
        "05000400 00000300 01003412 A100A000 A300A200 08000700"  # (w1<<16|w5) .. (w14<<16|w15)
    )
    assert bytes(batch.data) == expected
    assert batch.groups == [geb.Group(99, -1, True, 0, 1)]
    assert batch.channel.tolist() == [geb.TRIGGER_CHANNEL]


def test_trigger_formula_of_spec_04_for_many_packets():
    rng = np.random.default_rng(5)
    packets = rng.integers(0, 1 << 16, size=(50, 16), dtype=np.uint32)
    packets[:, 0] = 0xAAAA
    data = b"".join(trigger_packet(row[1:].tolist()) for row in packets)
    batch = batch_of(data, trigger_board=4094)
    records = geb.read_records(batch.data.tobytes())
    assert records.size == 50
    assert (records["type"] == 15).all() and (records["length"] == 40).all()
    for record, w in zip(records, packets.tolist(), strict=True):
        ts = w[2] << 32 | w[3] << 16 | w[4]
        expected = [
            0xAAAAAAAA, (10 << 16) | (4094 << 4), ts & 0xFFFFFFFF,
            (3 << 26) | (0xE << 16) | ts >> 32,
            (w[1] << 16) | w[5], (w[6] << 16) | w[7], (w[8] << 16) | w[9],
            (w[10] << 16) | w[11], (w[12] << 16) | w[13], (w[14] << 16) | w[15],
        ]  # fmt: skip
        assert int(record["timestamp"]) == ts
        assert geb.payload_of(batch.data.tobytes(), record) == struct.pack("<10I", *expected)


def test_a_trigger_boards_type_f_header_is_a_trigger_record():
    type_f = bytes.fromhex("AAAAAAAA 1003063E 00000010 0C0F0000")  # board 99, slot 2, 0xE
    batch = batch_of(type_f, trigger_board=99)
    assert bytes(batch.data[:4]) == bytes.fromhex("0F000000")
    assert batch.groups == [geb.Group(99, -1, True, 0, 1)]
    digitizer = batch_of(type_f, trigger_board=98)
    assert bytes(digitizer.data[:4]) == bytes.fromhex("0E000000")
    assert digitizer.groups == [geb.Group(99, 0xE, False, 0, 1)]


def test_classic_grouping_keeps_arrival_order_inside_each_channel():
    packets = [digitizer_packet(101, ch, ts, 4) for ts, ch in
               [(10, 2), (11, 0), (12, 2), (13, 1), (14, 0), (15, 2)]]  # fmt: skip
    batch = batch_of(b"".join(packets))
    assert batch.timestamp.tolist() == [11, 14, 13, 10, 12, 15]
    assert batch.channel.tolist() == [0, 0, 1, 2, 2, 2]
    assert [(g.channel, g.first, g.stop) for g in batch.groups] == [(0, 0, 2), (1, 2, 3), (2, 3, 6)]
    assert batch.stats.records.tolist() == [2, 1, 3]
    assert batch.stats.first_timestamp.tolist() == [11, 13, 10]
    assert batch.stats.last_timestamp.tolist() == [14, 13, 15]
    assert batch.stats.nbytes.tolist() == [2 * 76, 76, 3 * 76]  # 16 + 4 * 15
    unsorted = batch_of(b"".join(packets), grouping=geb.GROUP_NONE)
    assert unsorted.timestamp.tolist() == [10, 11, 12, 13, 14, 15]
    assert unsorted.groups == [geb.Group(-1, -1, False, 0, 6)]


def reference_records(data: bytes, grouping: str, trigger_board: int = 7) -> bytes:
    """Spec 04's records built packet by packet in plain Python, grouped like the layout."""
    words = struct.unpack(f">{len(data) // 4}I", data)
    records = []  # (key, arrival, bytes)
    position = 0
    while position < len(words):
        if words[position] == 0xAAAAAAAA:
            w1 = words[position + 1]
            n = (w1 >> 16) & 0x7FF
            board, channel = (w1 >> 4) & 0xFFF, w1 & 0xF
            ts = (words[position + 3] & 0xFFFF) << 32 | words[position + 2]
            body = data[4 * (position + 1) : 4 * (position + n + 1)]
            records.append(((board, channel), struct.pack("<iiQ", 14, 4 * n, ts) + body))
            position += n + 1
        else:  # garbage word: skipped like the decoder does
            position += 1
    if grouping == geb.GROUP_CHANNEL:
        records.sort(key=lambda r: r[0])
    elif grouping == geb.GROUP_BOARD:
        records.sort(key=lambda r: r[0][0])
    return b"".join(body for _, body in records)


packet_strategy = st.tuples(
    st.sampled_from([101, 102]),
    st.integers(0, 9),
    st.integers(0, (1 << 48) - 1),
    st.sampled_from([0, 2, 8, 200]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(packet_strategy, min_size=1, max_size=40),
    st.sampled_from(geb.GROUPINGS),
    st.booleans(),
)
def test_any_mix_of_packets_matches_the_plain_python_reference(specs, grouping, garbage):
    parts = []
    for board, channel, ts, samples in specs:
        parts.append(digitizer_packet(board, channel, ts, samples))
        if garbage:
            parts.append(bytes.fromhex("DEADBEEF 00000001"))
    data = b"".join(parts)
    batch = batch_of(data, grouping=grouping)
    assert bytes(batch.data) == reference_records(data, grouping)
    records = geb.read_records(batch.data.tobytes())
    assert records["offset"].tolist() == batch.bounds[:-1].tolist()
    assert records["timestamp"].tolist() == batch.timestamp.tolist()


def test_uniform_fast_path_and_general_path_agree():
    same = b"".join(digitizer_packet(101, i % 10, 1000 + i, 200) for i in range(300))
    mixed = same + digitizer_packet(101, 4, 5000, 8)
    fast = batch_of(same)
    general = batch_of(mixed)
    assert bytes(fast.data) == reference_records(same, geb.GROUP_CHANNEL)
    assert bytes(general.data) == reference_records(mixed, geb.GROUP_CHANNEL)


def test_empty_reply_gives_no_records():
    batch = geb.make_batch(np.zeros(0, dtype=">u4"), decode(np.zeros(0, dtype=">u4")).events)
    assert len(batch) == 0 and batch.groups == [] and batch.data.size == 0


def test_reading_a_truncated_file_fails_loudly():
    data = bytes(batch_of(golden_event()).data)
    assert geb.read_records(data)["length"].tolist() == [52]
    with pytest.raises(ValueError, match="do not end"):
        geb.read_records(data[:-1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(packet_strategy, min_size=0, max_size=30),
    st.booleans(),
    st.sampled_from([None, 0, 1, 2, 3, 5]),
)
def test_the_reply_shortcut_decodes_exactly_like_the_full_decoder(specs, same_length, cut):
    parts = [digitizer_packet(b, ch, ts, 200 if same_length else s) for b, ch, ts, s in specs]
    data = b"".join(parts)
    if cut is not None:
        data = data[: max(0, len(data) - 4 * cut)]  # a broken last packet
    words = words_of(data)
    fast, full = geb.decode_reply(words), decode(words)
    assert fast.events.tobytes() == full.events.tobytes()
    assert fast.unknown == full.unknown


def test_scratch_memory_is_reused_and_gives_the_same_records():
    data = b"".join(digitizer_packet(101, i % 10, 1000 + i, 200) for i in range(100))
    words = words_of(data)
    events = decode(words).events
    scratch = geb.Scratch()
    first = geb.make_batch(words, events, scratch=scratch)
    expected = bytes(first.data)
    second = geb.make_batch(words[: 114 * 10], events[:10], scratch=scratch)
    assert np.shares_memory(first.data, second.data)
    assert expected == bytes(geb.make_batch(words, events).data)
    assert bytes(second.data) == reference_records(data[: 114 * 40], geb.GROUP_CHANNEL)

"""outLoop and retention on a real pool, without EPICS: the memory budget, packing of
queued buffers, 0xD, fatal discards, the loss ledger, and when a batch comes."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ioc.decoder import KIND_TYPE_F, decode
from ioc.losses import LossReason
from ioc.outloop import OutLoop
from ioc.packets import (
    CH_EMPTY,
    CH_END_OF_RUN,
    EVENT_TYPE_NONE,
    MARKER,
    TRIGGER_MARKER,
    TRIGGER_WORDS,
    type_f_words,
    word1,
    word3,
)
from ioc.pool import BufferPool, Owner
from ioc.retention import COMPACT_AFTER

EVENT_WORDS = 14


def event_words(card: int, n_events: int, first_ts: int) -> list[int]:
    words = []
    for i in range(n_events):
        ts = first_ts + i
        words += [
            MARKER,
            word1(card + 3, 13, 101 + card, i % 10),
            ts & 0xFFFFFFFF,
            word3(13, 0, 7, ts),
        ] + [(ts + k) & 0x3FFF for k in range(10)]
    return words


def fill_events(pool: BufferPool, card: int, n_events: int, first_ts: int = 1000):
    buf = pool.take_free()
    words = event_words(card, n_events, first_ts)
    buf.words[: len(words)] = np.array(words, dtype=np.uint32)
    buf.nbytes = 4 * len(words)
    buf.card, buf.board_type = card, 12
    return buf


def type_f(pool: BufferPool, card: int, channel: int = CH_END_OF_RUN, ts: int = 5):
    buf = pool.take_free()
    buf.words[:4] = type_f_words(card + 3, 101 + card, channel, EVENT_TYPE_NONE, ts)
    buf.nbytes, buf.card, buf.board_type, buf.is_type_f = 16, card, 12, True
    return buf


def trigger_data(pool: BufferPool, card: int, packets: int, first_ts: int = 1):
    buf = pool.take_free()
    words = np.zeros((packets, TRIGGER_WORDS), dtype=np.uint32)
    words[:, 0] = TRIGGER_MARKER
    words[:, 4] = (first_ts + np.arange(packets)) & 0xFFFF
    buf.words[: words.size] = words.reshape(-1)
    buf.nbytes = 4 * words.size
    buf.card, buf.board_type = card, 4
    return buf


def routed(pool: BufferPool, outloop: OutLoop, bufs) -> None:
    pool.q_written.put_many(bufs)
    outloop.process_batch()


def queued_bytes_by_card(pool: BufferPool) -> dict[int, bytes]:
    """What qSender would deliver per card, in order."""
    out: dict[int, bytes] = {}
    for buf in pool.q_sender.snapshot():
        out[buf.card] = out.get(buf.card, b"") + bytes(buf.data[buf.sent_bytes : buf.nbytes])
    return out


def make(pool_size: int = 40, buffer_bytes: int = 4096, retain: int | None = None):
    pool = BufferPool(size=pool_size, buffer_bytes=buffer_bytes)
    outloop = OutLoop(pool, retain_bytes=retain or pool_size * buffer_bytes)
    outloop.reset_run()
    outloop.save = True
    return pool, outloop


def test_a_batch_comes_at_once_when_inloop_runs_low_on_free_buffers():
    """A full crate gets its buffers back only through outLoop's batches (discarded,
    packed, sent): inLoop running low must not wait for the next beat, here 60 s."""
    pool = BufferPool(size=80, buffer_bytes=4096)
    outloop = OutLoop(pool, retain_bytes=4096, batch_period_s=60.0)
    outloop.reset_run()
    outloop.save = True
    outloop.start()
    try:
        pool.q_written.put_many([fill_events(pool, 0, 3, first_ts=10 * i) for i in range(40)])
        time.sleep(0.2)
        assert len(pool.q_written) == 40, "40 of 80 still free: no batch before the beat"
        while len(pool.q_free) > pool.low_free:
            pool.q_written.put(fill_events(pool, 0, 3, first_ts=1000))
        deadline = time.monotonic() + 10
        while len(pool.q_written) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pool.q_written) == 0
        assert outloop.stats().bufs_lost > 0  # past its 4 KiB budget: discarded, freed
    finally:
        began = time.monotonic()
        outloop.shutdown()
    assert time.monotonic() - began < 1.0, "shutdown waited for the 60-s beat"


def test_past_the_memory_budget_buffers_are_discarded_and_counted_but_never_a_0xd():
    pool, outloop = make(retain=3 * 3 * EVENT_WORDS * 4)
    kept = [fill_events(pool, 0, 3, first_ts=10 * i) for i in range(3)]
    routed(pool, outloop, kept)
    over, end = fill_events(pool, 0, 3, first_ts=100), type_f(pool, 0)
    routed(pool, outloop, [over, end])
    assert [b.id for b in pool.q_sender.snapshot()] == [*(b.id for b in kept), end.id], (
        "the buffer past the budget was kept, or the end-of-run header was discarded"
    )
    snapshot = outloop.losses.snapshot()
    assert snapshot.bytes[LossReason.MEMORY][0] == 3 * EVENT_WORDS * 4
    assert snapshot.events[LossReason.MEMORY][0] == 3
    assert snapshot.buffers[LossReason.MEMORY] == 1 == outloop.stats().bufs_lost
    assert pool.q_sender.bytes == 3 * 3 * EVENT_WORDS * 4 + 16
    assert pool.audit().ok


def test_a_discarded_buffer_is_still_checked_and_traced():
    pool, outloop = make(retain=1)
    bad = fill_events(pool, 2, 4)
    bad.words[EVENT_WORDS] = 0xDEADBEEF  # a bad marker: not fatal, but counted
    routed(pool, outloop, [bad])
    assert outloop.stats().errors_by_card[2] == 1
    assert outloop.trace_words(2, 0) is not None, "no trace from a buffer discarded for memory"
    assert outloop.losses.snapshot().buffers[LossReason.MEMORY] == 1


def test_buffers_are_queued_untouched_while_the_receiver_keeps_up():
    pool, outloop = make()
    bufs = [fill_events(pool, card % 2, 2, first_ts=card) for card in range(COMPACT_AFTER - 1)]
    contents = [bytes(b.data[: b.nbytes]) for b in bufs]
    routed(pool, outloop, bufs)
    queued = pool.q_sender.snapshot()
    assert [b.id for b in queued] == [b.id for b in bufs]
    assert [bytes(b.data[: b.nbytes]) for b in queued] == contents


def test_once_receivers_fall_behind_small_buffers_are_packed_per_board_in_order():
    pool, outloop = make(pool_size=60)
    bufs = []
    for i in range(30):
        card = i % 3
        bufs.append(fill_events(pool, card, 1 + i % 4, first_ts=1000 * i))
        if i % 7 == 0:
            bufs.append(type_f(pool, card, channel=CH_EMPTY, ts=1000 * i + 500))
    expected: dict[int, bytes] = {}
    for buf in bufs:
        expected[buf.card] = expected.get(buf.card, b"") + bytes(buf.data[: buf.nbytes])
    for buf in bufs:
        routed(pool, outloop, [buf])
    assert queued_bytes_by_card(pool) == expected
    assert len(pool.q_sender) < COMPACT_AFTER + 3, "small buffers were not packed"
    assert pool.q_sender.bytes == sum(len(v) for v in expected.values())
    assert pool.audit().ok and len(pool.q_free) == pool.size - len(pool.q_sender)


def test_a_late_classic_receiver_sees_every_board_before_any_end_of_run():
    """A classic receiver ends once every board it has seen sent its 0xD; packing
    after Stop must not bring a board's 0xD ahead of another board's data."""
    pool, outloop = make(pool_size=60)
    for i in range(4 * COMPACT_AFTER):
        routed(pool, outloop, [fill_events(pool, i % 4, 2, first_ts=1000 * i)])
    routed(pool, outloop, [type_f(pool, 0)])
    for card in (1, 2, 3):  # the drain reads the other boards after board 0's 0xD
        routed(pool, outloop, [fill_events(pool, card, 2, first_ts=90_000), type_f(pool, card)])
    seen: set[int] = set()
    ended: set[int] = set()
    for buf in pool.q_sender.snapshot():
        seen.add(buf.card)
        events = decode(buf.words[: buf.nbytes // 4]).events
        if np.any((events["kind"] == KIND_TYPE_F) & (events["channel"] == CH_END_OF_RUN)):
            ended.add(buf.card)
        assert not (seen and ended == seen and len(seen) < 4), (
            f"boards {sorted(ended)} ended before boards {sorted({0, 1, 2, 3} - seen)} were seen"
        )
    assert ended == {0, 1, 2, 3}


def test_packing_never_mixes_trigger_packets_with_other_records():
    pool, outloop = make()
    filler = [fill_events(pool, 0, 1, first_ts=i) for i in range(COMPACT_AFTER)]
    routed(pool, outloop, filler)
    trig = [trigger_data(pool, 4, 3, first_ts=10 * i) for i in range(3)]
    routed(pool, outloop, [trig[0], type_f(pool, 4, channel=CH_EMPTY), trig[1], trig[2],
                           type_f(pool, 4)])
    trigger_bufs = [b for b in pool.q_sender.snapshot() if b.card == 4]
    for buf in trigger_bufs:
        words = buf.words[: buf.nbytes // 4]
        first = int(words[0])
        assert first in (TRIGGER_MARKER, MARKER)
        if first == TRIGGER_MARKER:
            assert words.size % TRIGGER_WORDS == 0
            assert not np.any(words.reshape(-1, TRIGGER_WORDS)[:, 0] != TRIGGER_MARKER)
    last = trigger_bufs[-1]
    assert last.is_type_f and int(last.words[1]) & 0xF == CH_END_OF_RUN, "0xD is not last"


def test_fatal_error_discards_only_its_own_buffer_and_no_save_frees_everything():
    pool, outloop = make(pool_size=20)
    good = fill_events(pool, 1, 4)
    bad = fill_events(pool, 2, 4)
    bad.words[1] = word1(5, 600, 103, 0)
    later = fill_events(pool, 1, 4, first_ts=5000)
    routed(pool, outloop, [good, bad, later])
    assert [b.id for b in pool.q_sender.snapshot()] == [good.id, later.id]
    assert good.packet_words == later.packet_words == 14, "the sender skips its own walk"
    assert outloop.stats().errors_by_card[2] == 1
    assert outloop.stats().first_errors[2][0] == 5
    snapshot = outloop.losses.snapshot()
    assert snapshot.bytes[LossReason.CHECK][2] == bad.nbytes
    assert snapshot.events[LossReason.CHECK][2] == 4
    outloop.save = False
    routed(pool, outloop, [fill_events(pool, 1, 2, first_ts=9000)])
    assert len(pool.q_sender) == 2 and len(pool.q_free) == 18
    assert pool.audit().ok
    assert {b.owner for b in pool.buffers} <= {Owner.FREE, Owner.SENDER_QUEUE}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 40), st.booleans(), st.integers(0, 3)),
        min_size=1,
        max_size=80,
    )
)
def test_packing_keeps_every_boards_bytes_in_order_whatever_the_sender_takes(steps):
    """Random buffers of three boards, random takes by the sender (and requeues at
    the head, as after a failed reply): per board, what the sender took plus what
    is still queued is exactly what outLoop queued, in order."""
    pool, outloop = make(pool_size=120, buffer_bytes=2048)
    queued: dict[int, bytes] = {}
    taken: dict[int, bytes] = {}
    for i, (card, n_events, requeue, takes) in enumerate(steps):
        buf = fill_events(pool, card, min(n_events, 2048 // (4 * EVENT_WORDS)), first_ts=100 * i)
        queued[card] = queued.get(card, b"") + bytes(buf.data[: buf.nbytes])
        routed(pool, outloop, [buf])
        for _ in range(takes):
            head = pool.q_sender.get(Owner.SENDER)
            if head is None:
                break
            if requeue and head.nbytes - head.sent_bytes > 4 * EVENT_WORDS:
                cut = head.sent_bytes + 4 * EVENT_WORDS
                taken[head.card] = taken.get(head.card, b"") + bytes(head.data[head.sent_bytes:cut])
                head.sent_bytes = cut
                pool.q_sender.put_front(head)
                break
            taken[head.card] = taken.get(head.card, b"") + bytes(
                head.data[head.sent_bytes : head.nbytes]
            )
            pool.release(head)
    rest = queued_bytes_by_card(pool)
    for card, data in queued.items():
        assert taken.get(card, b"") + rest.get(card, b"") == data
    assert pool.audit().ok
    assert pool.q_sender.bytes == sum(len(v) for v in rest.values())

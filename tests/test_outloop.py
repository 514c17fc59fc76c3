"""outLoop's batch rules on a real pool, without EPICS: bypass edges, 0xD, fatal discards."""

from __future__ import annotations

import numpy as np
import pytest

from ioc.outloop import BYPASS_THRESHOLD, OutLoop, bypass_engages
from ioc.packets import CH_END_OF_RUN, EVENT_TYPE_NONE, MARKER, type_f_words, word1, word3
from ioc.pool import BufferPool, Owner


@pytest.mark.parametrize(
    ("save", "in_sender", "batch", "expected"),
    [
        (True, 0, 100, False),
        (True, 0, 101, True),
        (True, 99, 1, False),
        (True, 100, 1, True),
        (True, 60, 40, False),
        (True, 60, 41, True),
        (False, 200, 200, False),
    ],
)
def test_bypass_rule_edges(save, in_sender, batch, expected):
    assert bypass_engages(save, in_sender, batch) is expected


def fill_events(pool: BufferPool, card: int, n_events: int, first_ts: int = 1000):
    buf = pool.take_free()
    words = []
    for i in range(n_events):
        ts = first_ts + i
        words += [
            MARKER,
            word1(card + 3, 13, 101 + card, i % 10),
            ts & 0xFFFFFFFF,
            word3(13, 0, 7, ts),
        ] + [0] * 10
    buf.words[: len(words)] = np.array(words, dtype=np.uint32)
    buf.nbytes = 4 * len(words)
    buf.card, buf.board_type = card, 12
    return buf


def end_of_run(pool: BufferPool, card: int):
    buf = pool.take_free()
    buf.words[:4] = type_f_words(card + 3, 101 + card, CH_END_OF_RUN, EVENT_TYPE_NONE, 5)
    buf.nbytes, buf.card, buf.board_type, buf.is_type_f = 16, card, 12, True
    return buf


def test_bypass_drops_the_batch_but_never_an_end_of_run_header():
    pool = BufferPool(size=200, buffer_bytes=4096)
    outloop = OutLoop(pool)
    outloop.reset_run()
    outloop.save = True
    pool.q_sender.put_many([pool.take_free() for _ in range(BYPASS_THRESHOLD)])
    pool.q_written.put(fill_events(pool, 0, 3))
    pool.q_written.put(end_of_run(pool, 0))
    outloop.process_batch()
    assert len(pool.q_sender) == BYPASS_THRESHOLD + 1
    assert pool.q_sender.snapshot()[-1].is_type_f
    stats = outloop.stats()
    assert stats.bufs_lost == 1 and stats.lost_bytes_by_card[0] == 3 * 14 * 4
    assert stats.bufs_written == 2
    assert pool.audit().ok


def test_fatal_error_discards_only_its_own_buffer_and_no_save_frees_everything():
    pool = BufferPool(size=20, buffer_bytes=4096)
    outloop = OutLoop(pool)
    outloop.reset_run()
    good = fill_events(pool, 1, 4)
    bad = fill_events(pool, 2, 4)
    bad.words[1] = word1(5, 600, 103, 0)
    later = fill_events(pool, 1, 4, first_ts=5000)
    outloop.save = True
    pool.q_written.put_many([good, bad, later])
    outloop.process_batch()
    assert [b.id for b in pool.q_sender.snapshot()] == [good.id, later.id]
    assert good.packet_words == later.packet_words == 14, "the sender skips its own walk"
    assert outloop.stats().errors_by_card[2] == 1
    assert outloop.stats().first_errors[2][0] == 5
    assert outloop.stats().lost_bytes_by_card[2] == bad.nbytes
    outloop.save = False
    pool.q_written.put(fill_events(pool, 1, 2, first_ts=9000))
    outloop.process_batch()
    assert len(pool.q_sender) == 2 and len(pool.q_free) == 18
    assert pool.audit().ok
    assert {b.owner for b in pool.buffers} <= {Owner.FREE, Owner.SENDER_QUEUE}

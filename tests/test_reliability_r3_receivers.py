"""R3 (spec 06): receivers that close cleanly, and receivers killed at random points.

A receiver that stops asking, reads what it is owed and closes loses nothing.
A killed one (RST between replies, mid-header or mid-payload) may lose the
replies it had asked for and not fully read, never more; nothing is ever
duplicated or re-ordered, and the next receiver is always served.

The accounting is exact where the IOC publishes exact figures: the sender's
reply count and sent bytes (KiB resolution) against what the receivers read
tell how many replies and bytes went down with the killed receivers, and the
missing events must fit those bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
from dataflow import (
    BETWEEN_REPLIES,
    BOARDS,
    CRATE,
    EVENT_BYTES,
    EVENTS_PER_REPLY,
    KIB,
    MID_HEADER,
    MID_PAYLOAD,
    TYPE_F_BYTES,
    Background,
    Pva,
    assert_channel_order,
    assert_end_of_run_last_and_once,
    assert_pool_whole,
    board_events,
    data_keys,
    generated,
    ioc_process,
    killed_receiver,
    receiver,
    start_run,
    stop_run,
)
from ioc_harness import IocProcess, wait_until

from receiver.client import Tally

CLEAN_RECEIVERS = 10
KILLS = 24
#: A receiver draining the backlog stops at its first "no data" reply.
DRAINED = {"until": lambda tally: tally.insuff_replies > 0, "until_done": False}


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r3")
    with ioc_process(workdir, "--demo") as ioc:
        yield ioc


def sender_figures(pva: Pva) -> tuple[int, int]:
    """Data replies sent and bytes sent (KiB resolution) this run, once published."""
    replies, mib = pva.numbers(f"DAQC{CRATE}_CV_SenderReplies", f"DAQC{CRATE}_CV_SenderBytes")
    return int(replies), round(mib * KIB)


def wait_sender_settled(pva: Pva) -> tuple[int, int]:
    """The sender's counters after the last reply (they are published at 2 Hz)."""
    seen: list[tuple[int, int]] = []

    def settled() -> bool:
        seen.append(sender_figures(pva))
        return len(seen) >= 3 and seen[-1] == seen[-3]

    wait_until(settled, 10, "sender counters settled", period=0.5)
    return seen[-1]


def assert_received_once_in_order(tallies: list[Tally]) -> dict[int, int]:
    """Per board: no duplicate, per-channel order over the receivers in turn, one 0xD last.
    Returns the events received per board."""
    received = {}
    for bid in BOARDS.values():
        events = board_events(tallies, bid)
        keys = data_keys(events)
        assert np.unique(keys).size == keys.size, f"board {bid}: duplicates"
        assert_channel_order(events)
        assert_end_of_run_last_and_once(events)
        received[bid] = keys.size
    return received


def test_receivers_closing_cleanly_in_turn_lose_nothing(crate):
    ioc = crate
    rng = random.Random(3)
    tallies: list[Tally] = []
    start_run(ioc)
    for _ in range(CLEAN_RECEIVERS):
        session = receiver(ioc, pipeline=rng.randint(1, 6))
        tally = session.run(max_replies=rng.randint(3, 40), until_done=False, max_seconds=30)
        assert tally.replies > 0, "the next receiver was not served"
        tallies.append(tally)
    last = Background(receiver(ioc, pipeline=6), max_seconds=90)
    stop_run(ioc)
    tallies.append(last.join())
    received = assert_received_once_in_order(tallies)
    assert received == generated(ioc), "a clean close lost or added events"
    with Pva(ioc) as pva:
        replies, sent_kib = wait_sender_settled(pva)
        assert replies == sum(t.data_replies for t in tallies)
        assert sent_kib == sum(t.payload_bytes for t in tallies) // KIB
        assert pva.numbers(f"DAQC{CRATE}_OL_TotalBufsLost", f"DAQC{CRATE}_CV_SenderRequeued") == [
            0, 0,
        ]
    assert_pool_whole(ioc)


def test_killed_receivers_lose_at_most_their_in_flight_replies(crate):
    ioc = crate
    rng = random.Random(5)
    tallies: list[Tally] = []
    in_flight = kills_with_requests_out = 0
    start_run(ioc)
    for i in range(KILLS):
        mode = (BETWEEN_REPLIES, MID_HEADER, MID_PAYLOAD)[i % 3]
        pipeline = rng.randint(1, 6)
        # Dying inside a reply needs one more reply than those read whole.
        full = rng.randint(1, pipeline) if mode == BETWEEN_REPLIES else rng.randint(0, pipeline - 1)
        tally, outstanding = killed_receiver(ioc.ports.data, mode, full, pipeline)
        tallies.append(tally)
        in_flight += outstanding
        kills_with_requests_out += outstanding > 0
        # The next receiver is served at once; it drains the backlog (so the bypass never
        # engages) and closes cleanly.
        drained = receiver(ioc, pipeline=rng.randint(1, 6)).run(max_seconds=30, **DRAINED)
        assert drained.replies > 0, f"kill {i}: the next receiver was not served"
        tallies.append(drained)
    last = Background(receiver(ioc, pipeline=6), max_seconds=90)
    stop_run(ioc)
    tallies.append(last.join())

    received = assert_received_once_in_order(tallies)
    expected = generated(ioc)
    missing = sum(expected[bid] - received[bid] for bid in expected)
    with Pva(ioc) as pva:
        assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == 0, "bypass engaged"
        replies, sent_kib = wait_sender_settled(pva)
    got_bytes = sum(t.payload_bytes for t in tallies)
    lost_replies = replies - sum(t.data_replies for t in tallies)
    assert 0 <= lost_replies <= in_flight, (lost_replies, in_flight)
    assert 0 <= missing <= lost_replies * EVENTS_PER_REPLY, (missing, lost_replies)
    # Bytes gone with the killed receivers: whole events, plus any type-F replies among them.
    lost_low, lost_high = sent_kib * KIB - got_bytes, sent_kib * KIB + KIB - 1 - got_bytes
    assert lost_low - TYPE_F_BYTES * lost_replies <= missing * EVENT_BYTES <= lost_high, (
        missing, lost_low, lost_high, lost_replies,
    )
    assert kills_with_requests_out >= KILLS // 2
    assert_pool_whole(ioc)
    assert ioc.proc.poll() is None

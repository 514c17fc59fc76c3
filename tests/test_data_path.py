"""The whole data path on a real demo crate: sim -> inLoop -> outLoop -> sender -> receiver.

Real IOC process, real TCP sockets on loopback, the project's receiver client;
the simulator's own counters (`SIM_Generated`) are the reference.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from dataflow import (
    BOARDS,
    EVENT_BYTES,
    EVENTS_PER_REPLY,
    Background,
    assert_channel_order,
    assert_end_of_run_last_and_once,
    data_keys,
    generated,
    kill_socket,
    killed_receiver,
    receiver,
    start_run,
    stop_run,
)
from ioc_harness import wait_until

from ioc.decoder import KIND_EVENT, decode, trace_of
from ioc.hardware import WORD
from receiver.client import Tally


def test_full_run_delivers_every_generated_event_once_and_in_order(demo_ioc):
    ioc = demo_ioc
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    start_run(ioc)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 100, timeout=30)
    stop_run(ioc)
    tally = rx.join()
    assert tally.all_done and tally.boards_seen == set(BOARDS.values())
    expected = generated(ioc)
    for bid, count in expected.items():
        events = tally.boards[bid].events
        assert tally.boards[bid].data_events.size == count, f"board {bid}"
        assert_channel_order(events)
        assert_end_of_run_last_and_once(events)
    assert tally.unknown_words == 0
    assert ioc.getf("DAQC01_OL_TotalBufsLost") == 0
    ioc.wait_value("DAQC01_CV_BuffersAvail", "200")
    assert ioc.get("DAQC01_CV_BuffersOK") == "OK"


def test_a_receiver_that_stops_asking_loses_nothing_and_the_next_takes_over(demo_ioc):
    ioc = demo_ioc
    first = Background(receiver(ioc, pipeline=6), max_replies=40, until_done=False)
    start_run(ioc)
    part = first.join()
    assert part.data_replies > 0
    second = Background(receiver(ioc, pipeline=1), max_seconds=90)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 100, timeout=30)
    stop_run(ioc)
    rest = second.join()
    assert rest.all_done
    for bid, count in generated(ioc).items():
        keys = [data_keys(t.boards[bid].events) for t in (part, rest) if bid in t.boards]
        union = np.concatenate(keys)
        assert union.size == count, f"board {bid}: {union.size} of {count}"
        assert np.unique(union).size == union.size, f"board {bid}: duplicates"
    assert ioc.getf("DAQC01_CV_SenderRequeued") == 0


def test_receivers_killed_twenty_times_lose_at_most_their_in_flight_replies(demo_ioc):
    ioc = demo_ioc
    start_run(ioc)
    killed: list[Tally] = []
    in_flight = 0
    for i in range(20):
        wait_until(lambda: ioc.getf("DAQC01_OL_NumSendBuffers") >= 2, 10, "data waiting")
        tally, lost = killed_receiver(ioc.ports.data, mode=i % 3, full=1 + i % 4)
        killed.append(tally)
        in_flight += lost
    final = Background(receiver(ioc, pipeline=6), max_seconds=90)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 200, timeout=30)
    stop_run(ioc)
    last = final.join()
    assert last.all_done
    missing_total = 0
    for bid, count in generated(ioc).items():
        parts = [data_keys(t.boards[bid].events) for t in [*killed, last] if bid in t.boards]
        union = np.concatenate(parts)
        assert np.unique(union).size == union.size, f"board {bid}: duplicates"
        ordered = [t.boards[bid].events for t in [*killed, last] if bid in t.boards]
        assert_channel_order(np.concatenate(ordered))
        missing_total += count - union.size
    bypassed = sum(ioc.getf(f"DAQC01_OL_DataLost{card}") for card in range(4)) * 2**20
    allowed = in_flight * EVENTS_PER_REPLY + bypassed / EVENT_BYTES + 4 * 3  # KiB rounding
    assert 0 <= missing_total <= allowed, (missing_total, in_flight, bypassed)
    ioc.wait_value("DAQC01_CV_BuffersAvail", "200", timeout=20)
    assert ioc.get("DAQC01_CV_BuffersOK") == "OK"


def test_a_receiver_connecting_after_stop_gets_the_drained_data_and_every_end_of_run(demo_ioc):
    ioc = demo_ioc
    start_run(ioc)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 20, timeout=30)
    stop_run(ioc)
    tally = receiver(ioc, pipeline=6).run(max_seconds=60)
    assert tally.all_done and tally.boards_seen == set(BOARDS.values())
    for bid in BOARDS.values():
        assert_end_of_run_last_and_once(tally.boards[bid].events)
        assert tally.boards[bid].data_events.size > 0


def test_the_trace_pv_is_the_trace_of_a_received_event(demo_ioc):
    ioc = demo_ioc
    ioc.put_ok("DAQC01_CS_TraceBd", 1)
    ioc.put_ok("DAQC01_CS_TraceChan", 3)
    rx = Background(receiver(ioc, pipeline=6, keep_payloads=True), max_seconds=90)
    start_run(ioc)
    ioc.wait_numeric("DAQC01_CV_TraceLen", lambda v: v == 200, timeout=30)
    stop_run(ioc)
    tally = rx.join()
    candidates = []
    for payload in tally.payloads:
        words = np.frombuffer(payload, dtype=WORD)
        decoded = decode(words)
        ev = decoded.events
        for event in ev[(ev["board"] == 102) & (ev["channel"] == 3) & (ev["kind"] == KIND_EVENT)]:
            candidates.append(trace_of(words, event))
    assert candidates

    def published_trace_received() -> bool:
        trace = np.asarray(ioc.pva("DAQC01_CV_Trace")).astype(np.uint16)[:200]
        return any(np.array_equal(c, trace) for c in candidates)

    wait_until(published_trace_received, 5, "the published trace among the received ones")


def test_no_save_means_no_listener_and_save_mid_run_opens_it(demo_ioc):
    ioc = demo_ioc
    start_run(ioc, save="No Save")
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 10, timeout=30)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ioc.ports.data), timeout=2).close()
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    ioc.put_ok("Online_CS_SaveData", "Save")
    ioc.wait_numeric("DAQC01_CV_SenderReplies", lambda v: v > 10, timeout=30)
    stop_run(ioc)
    tally = rx.join()
    assert tally.all_done and tally.data_replies > 10


def test_garbage_on_the_data_port_never_stops_the_ioc(demo_ioc):
    ioc = demo_ioc
    start_run(ioc)
    rng = np.random.default_rng(7)
    idle = [socket.create_connection(("127.0.0.1", ioc.ports.data), timeout=5) for _ in range(3)]
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", ioc.ports.data), timeout=5)
        if i % 3 == 0:
            sock.sendall(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
        elif i % 3 == 1:
            sock.sendall(b"\x00\x00")
        kill_socket(sock) if i % 2 else sock.close()
    for sock in idle:
        sock.close()
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    ioc.wait_numeric("DAQC01_CV_SenderReplies", lambda v: v > 10, timeout=30)
    stop_run(ioc)
    assert rx.join().all_done
    assert ioc.proc.poll() is None

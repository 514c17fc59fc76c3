"""The project's receiver client against a real Sender on loopback (spec 05)."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import test_sender
from ioc_harness import free_port, wait_until
from test_sender import (
    HOST,
    TRIGGER,
    digitizer_events,
    end_of_run,
    queue,
    read_exactly,
    refused,
    trigger_packets,
)

from ioc.decoder import KIND_TRIGGER, decode
from receiver.client import DataConnection, ProtocolError, Receiver, SenderOff

#: The sender fixture of test_sender (a started Sender on its own pool, audited afterwards).
make_sender = test_sender.make_sender


def expected_events(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([decode(words).events for words in parts])


def test_a_receiver_started_before_the_listener_connects_when_it_opens(make_sender):
    port = free_port()
    pool, sender = make_sender(port=port, run=False)
    receiver = Receiver(HOST, port, pipeline=6, connect_timeout=10)
    puller = threading.Thread(target=receiver.run, kwargs={"max_seconds": 10}, daemon=True)
    puller.start()
    assert refused(port)
    words = digitizer_events(20)
    sender.run_started(save=True)
    queue(pool, words)
    queue(pool, end_of_run())
    puller.join(15)
    assert not puller.is_alive()
    assert receiver.tally.boards[101].data_events.size == 20
    assert receiver.tally.boards_done == {101}


@pytest.mark.parametrize("pipeline", [1, 6])
def test_it_files_events_by_board_and_stops_after_every_boards_0xd(make_sender, pipeline):
    pool, sender = make_sender(max_reply_bytes=3000)
    a1 = digitizer_events(100, board=101, slot=3, trace_words=10)
    b1 = digitizer_events(40, board=102, slot=4, first_ts=500)
    a2 = digitizer_events(30, board=101, slot=3, first_ts=1000, trace_words=10)
    b2 = digitizer_events(5, board=102, slot=4, first_ts=2000)
    for words, card in ((a1, 0), (b1, 1), (a2, 0), (end_of_run(101, 3), 0), (b2, 1)):
        queue(pool, words, card=card)
    queue(pool, end_of_run(102, 4), card=1)

    tally = Receiver(HOST, sender.port, pipeline=pipeline).run(max_seconds=20)

    assert tally.boards_seen == {101, 102} and tally.all_done
    for board, parts in ((101, (a1, a2, end_of_run(101, 3))), (102, (b1, b2, end_of_run(102, 4)))):
        got, want = tally.boards[board].events, expected_events(*parts)
        for name in ("timestamp", "channel", "slot", "kind", "length"):
            assert np.array_equal(got[name], want[name]), (board, name)
        assert tally.boards[board].end_of_run == 1
    assert tally.data_replies + tally.insuff_replies == tally.replies
    assert tally.payload_bytes == sum(w.nbytes for w in (a1, b1, a2, b2)) + 2 * 16
    wait_until(lambda: not sender.stats().serving, 5, "the receiver to have closed")


def test_trigger_replies_are_decoded_as_trigger_packets(make_sender):
    pool, sender = make_sender()
    triggers = trigger_packets(50, first_ts=0x1_0000_0005)
    queue(pool, triggers, card=6, board_type=TRIGGER)
    queue(pool, end_of_run(board=99, slot=7), card=6, board_type=TRIGGER)
    tally = Receiver(HOST, sender.port, pipeline=6).run(max_seconds=10)
    events = tally.trigger_events
    assert events.size == 50 and (events["kind"] == KIND_TRIGGER).all()
    assert events["timestamp"][0] == 0x1_0000_0005 and events["timestamp"][-1] == 0x1_0000_0005 + 49
    assert tally.boards_done == {99} and tally.boards[99].data_events.size == 0


def test_stopping_after_n_replies_is_clean_and_the_next_receiver_gets_the_rest(make_sender):
    pool, sender = make_sender(max_reply_bytes=2048)
    sent = [digitizer_events(200, first_ts=1 + 200 * i) for i in range(5)]
    for words in sent:
        queue(pool, words)
    queue(pool, end_of_run())
    first = Receiver(HOST, sender.port, pipeline=6).run(max_replies=9)
    assert first.replies == 9 and first.insuff_replies == 0
    second = Receiver(HOST, sender.port, pipeline=6).run(max_seconds=10)
    stamps = np.concatenate(
        [first.boards[101].data_events["timestamp"], second.boards[101].data_events["timestamp"]]
    )
    assert np.array_equal(stamps, np.arange(1, 1001))
    assert second.all_done


def test_without_data_it_counts_type_5_replies_and_stops_at_its_time_limit(make_sender):
    _, sender = make_sender(idle_wait_s=0.02)
    started = time.monotonic()
    tally = Receiver(HOST, sender.port, pipeline=6).run(max_seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert tally.replies == tally.insuff_replies > 0 and tally.data_replies == 0
    assert not tally.all_done


def test_garbage_in_a_payload_is_counted_as_unknown(make_sender):
    pool, sender = make_sender()
    junk = np.full(5, 0x01020304, dtype=">u4")
    words = np.concatenate([junk, digitizer_events(4)])
    queue(pool, words)
    queue(pool, end_of_run())
    tally = Receiver(HOST, sender.port, pipeline=1).run(max_seconds=10)
    assert tally.unknown_spans == 1 and tally.unknown_words == 5
    assert tally.boards[101].data_events.size == 4


@contextlib.contextmanager
def scripted_server(script: Callable[[socket.socket], None]) -> Iterator[
        tuple[int, threading.Thread]]:
    """A one-connection server on loopback: ``script`` plays the IOC's side of the
    first connection in a thread, then closes it. Yields the port and the thread."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                script(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1], thread


@pytest.mark.parametrize(("kind", "error"), [(2, ProtocolError), (3, SenderOff)])
def test_a_reply_type_other_than_data_or_no_data_is_reported(kind, error):
    """Type 2 is never sent; type 3 (SENDER_OFF) means: connect again later."""

    def answer(conn: socket.socket) -> None:
        conn.recv(4)
        conn.sendall(struct.pack(">iiii", kind, 0, 0, 0))
        conn.recv(1)

    with scripted_server(answer) as (port, _):
        conn = DataConnection.connect(HOST, port, timeout=5)
        conn.request()
        with pytest.raises(error):
            conn.read_reply()
        conn.close()


def test_replies_in_the_socket_are_read_after_a_request_fails_on_a_closed_server():
    """A pipelining receiver learns of a close from a failing request; the replies the
    server sent before closing are still in its socket and must not be lost with it."""
    replies = [digitizer_events(5, first_ts=100 * i) for i in range(6)]

    def answer_then_close(conn: socket.socket) -> None:
        read_exactly(conn, 4 * len(replies))
        conn.sendall(b"".join(
            struct.pack(">iiii", 4, words.nbytes, 0, 1) + words.tobytes() for words in replies
        ))

    with scripted_server(answer_then_close) as (port, closing):
        conn = DataConnection.connect(HOST, port, timeout=5)
        conn.request(len(replies))
        closing.join(5)  # closed: each request from now on is answered with a reset
        got: list[bytes] = []
        with pytest.raises(ConnectionError):
            while len(got) <= len(replies):
                got.append(bytes(conn.read_reply()[1]))
                conn.request(1)
        conn.close()
    assert got == [words.tobytes() for words in replies]


def test_connecting_gives_up_after_its_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        DataConnection.connect(HOST, port, timeout=0.3)
    assert 0.2 <= time.monotonic() - started < 5


def test_the_command_line_prints_rates(make_sender):
    pool, sender = make_sender()
    for i in range(3):
        queue(pool, digitizer_events(1000, first_ts=1 + 1000 * i, trace_words=100), card=0)
    queue(pool, end_of_run(), card=0)
    result = subprocess.run(
        [sys.executable, "-m", "receiver.client", f"{HOST}:{sender.port}", "--interval", "0.05"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    lines = result.stdout.splitlines()
    keys = ("MB=", "MB/s=", "events/s=", "replies/s=")
    assert lines and all(all(key in line for key in keys) for line in lines[:-1])
    assert "events=3001" in lines[-1] and "done=[101]" in lines[-1]

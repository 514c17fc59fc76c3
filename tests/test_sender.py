"""The sender over real loopback sockets (spec 02 §4, 05; R3, R4 at unit level).

Each test builds a small `BufferPool`, queues buffers of packets made with
`ioc.packets` on qSender and talks to a real `Sender` on 127.0.0.1 the way a
receiver does. The packet builders here are also used by the receiver tests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ioc_harness import free_port, wait_until

from ioc import packets
from ioc.checker import Checker
from ioc.config import SenderConfig
from ioc.cuts import event_boundaries, reply_ends
from ioc.decoder import decode
from ioc.hardware import WORD
from ioc.losses import LossReason
from ioc.pool import Buffer, BufferPool
from ioc.sender import Sender
from receiver.client import Receiver

HOST = "127.0.0.1"
TEST_SETTINGS = {"idle_wait_s": 0.02, "idle_timeout_s": 2.0, "delivery_timeout_s": 5.0}
DIGITIZER = 12
TRIGGER = 4


# ------------------------------------------------------------------ packets


def digitizer_events(
    count: int,
    *,
    board: int = 101,
    slot: int = 3,
    trace_words: int = 0,
    first_ts: int = 1,
    lengths: list[int] | None = None,
) -> np.ndarray:
    """``count`` chained LED events with increasing timestamps (or one per N in ``lengths``)."""
    lengths = lengths or [packets.DIGITIZER_HEADER_LENGTH + trace_words] * count
    out = np.zeros(sum(n + 1 for n in lengths), dtype=WORD)
    position = 0
    for i, length in enumerate(lengths):
        ts = first_ts + i
        out[position] = packets.MARKER
        out[position + 1] = packets.word1(slot, length, board, i % packets.DIGITIZER_CHANNELS)
        out[position + 2] = ts & 0xFFFFFFFF
        out[position + 3] = packets.word3(
            min(length, packets.DIGITIZER_HEADER_LENGTH), 0, packets.HEADER_TYPE_LED, ts
        )
        out[position + 4 : position + length + 1] = (i * 7 + np.arange(length - 3)) & 0x3FFF
        position += length + 1
    return out


def end_of_run(board: int = 101, slot: int = 3, ts: int = 0x1_2345_6789) -> np.ndarray:
    return packets.type_f_words(slot, board, packets.CH_END_OF_RUN, 0, ts)


def trigger_packets(count: int, first_ts: int = 1) -> np.ndarray:
    """``count`` 16-word master-trigger packets with increasing timestamps."""
    out = np.zeros((count, packets.TRIGGER_WORDS), dtype=WORD)
    ts = first_ts + np.arange(count, dtype=np.uint64)
    out[:, 0] = packets.TRIGGER_MARKER
    out[:, 1] = 1
    out[:, 2] = (ts >> np.uint64(32)) & np.uint64(0xFFFF)
    out[:, 3] = (ts >> np.uint64(16)) & np.uint64(0xFFFF)
    out[:, 4] = ts & np.uint64(0xFFFF)
    out[:, 5:] = 0x1234
    return out.reshape(-1)


def queue(
    pool: BufferPool, words: np.ndarray, *, card: int = 0, board_type: int = DIGITIZER
) -> Buffer:
    """Put a buffer holding ``words`` on qSender, as outLoop would."""
    buf = pool.take_free()
    assert buf is not None, "test pool too small"
    buf.words[: words.size] = words
    buf.nbytes = words.size * 4
    buf.card = card
    buf.board_type = board_type
    buf.is_type_f = words.size == packets.TYPE_F_WORDS
    pool.q_sender.put(buf)
    return buf


# ------------------------------------------------------------------ sockets


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def read_reply(sock: socket.socket) -> tuple[bytes, bytes]:
    header = read_exactly(sock, 16)
    kind, length = struct.unpack(">ii", header[:8])
    return header, read_exactly(sock, length if kind == 4 else 0)


def nothing_arrives(sock: socket.socket, within: float) -> bool:
    """True if no byte (and no close) arrives on ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5.0)
    return False


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a reset, like a killed process on a busy socket."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


REQUEST = struct.pack(">i", 1)


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def make_sender():
    """Build a started Sender on its own pool; all are shut down (and audited) afterwards."""
    made: list[tuple[BufferPool, Sender]] = []

    def make(
        *, pool_size: int = 16, buffer_bytes: int = 1 << 20, port: int = 0, run: bool = True,
        **settings,
    ) -> tuple[BufferPool, Sender]:
        pool = BufferPool(pool_size, buffer_bytes)
        sender = Sender(pool, SenderConfig(**{**TEST_SETTINGS, **settings}), HOST, port)
        sender.start()
        if run:
            sender.run_started(save=True)
        made.append((pool, sender))
        return pool, sender

    yield make
    for pool, sender in made:
        sender.shutdown(deliver_timeout=0.0)
        assert pool.audit().ok


def all_free(pool: BufferPool) -> bool:
    audit = pool.audit()
    return audit.ok and audit.free == pool.size


# ------------------------------------------------------------ wire format


def test_data_reply_is_header_4_reclen_0_1_then_the_buffer_bytes(make_sender):
    pool, sender = make_sender()
    words = digitizer_events(3)
    queue(pool, words)
    with connect(sender.port) as sock:
        sock.sendall(REQUEST)
        header, payload = read_reply(sock)
    assert header == bytes.fromhex("00000004") + struct.pack(">i", words.size * 4) + bytes.fromhex(
        "00000000 00000001"
    )
    assert payload == words.tobytes()
    assert payload[:4] == b"\xaa\xaa\xaa\xaa"  # big-endian on the wire
    wait_until(lambda: all_free(pool), 5, "the buffer back in qFree")
    stats = sender.stats()
    assert (stats.replies, stats.bytes_sent, stats.idle_replies) == (1, words.size * 4, 0)


def test_no_data_answers_type_5_after_the_idle_wait(make_sender):
    _, sender = make_sender(idle_wait_s=0.2)
    with connect(sender.port) as sock:
        started = time.monotonic()
        sock.sendall(REQUEST)
        header, payload = read_reply(sock)
        waited = time.monotonic() - started
    assert header == bytes.fromhex("00000005 00000000 00000000 00000000")
    assert payload == b""
    assert waited >= 0.2
    wait_until(lambda: sender.stats().idle_replies == 1, 5, "the INSUFF_DATA reply counted")


def test_data_arriving_during_the_idle_wait_is_sent_instead_of_type_5(make_sender):
    pool, sender = make_sender(idle_wait_s=5.0)
    words = digitizer_events(2)
    with connect(sender.port) as sock:
        sock.sendall(REQUEST)
        wait_until(lambda: sender.stats().serving, 5, "the receiver being served")
        queue(pool, words)
        header, payload = read_reply(sock)
    assert header[:4] == bytes.fromhex("00000004") and payload == words.tobytes()


def test_six_pipelined_requests_get_six_replies_in_queue_order(make_sender):
    pool, sender = make_sender()
    sent = [digitizer_events(2, board=100 + i, first_ts=10 * i) for i in range(4)]
    for words in sent:
        queue(pool, words)
    with connect(sender.port) as sock:
        sock.sendall(REQUEST * 6)
        replies = [read_reply(sock) for _ in range(6)]
        assert nothing_arrives(sock, 0.2)
    assert [payload for _, payload in replies[:4]] == [w.tobytes() for w in sent]
    assert [header[:4] for header, _ in replies[4:]] == [bytes.fromhex("00000005")] * 2


def test_a_request_split_over_three_writes_is_answered_once(make_sender):
    pool, sender = make_sender(idle_wait_s=0.01)
    queue(pool, digitizer_events(1))
    with connect(sender.port) as sock:
        for piece in (b"\x00", b"\x00\x00"):
            sock.sendall(piece)
            assert nothing_arrives(sock, 0.15)
        sock.sendall(b"\x01")
        header, _ = read_reply(sock)
        assert header[:4] == bytes.fromhex("00000004")
        assert nothing_arrives(sock, 0.2)
    wait_until(lambda: sender.stats().replies == 1, 5, "one data reply counted")


def test_an_unknown_request_word_ends_the_connection_and_keeps_its_data(make_sender, caplog):
    pool, sender = make_sender()
    words = digitizer_events(3)
    queue(pool, words)
    with connect(sender.port) as sock:
        sock.sendall(REQUEST + b"\xde\xad\xbe\xef" + REQUEST * 3)
        assert sock.recv(16) == b"", "served a connection that sent an unknown word"
    with connect(sender.port) as sock:
        sock.sendall(REQUEST)
        _, again = read_reply(sock)
    assert again == words.tobytes(), "the data held by the bad connection were lost"
    assert sender.stats().rejected == 1
    assert len([r for r in caplog.records if "0xdeadbeef" in r.getMessage()]) == 1


def test_random_bytes_get_no_data_and_are_logged_once(make_sender, caplog):
    pool, sender = make_sender()
    words = digitizer_events(50)
    queue(pool, words)
    noise = random.Random(7).randbytes(1 << 16)
    with connect(sender.port) as sock:
        with contextlib.suppress(OSError):  # the IOC may close while we still write
            sock.sendall(noise)
        sock.settimeout(5.0)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    assert received == b"", "random bytes were answered with data"
    wait_until(lambda: sender.stats().rejected == 1, 5, "the connection counted as rejected")
    assert len([r for r in caplog.records if "unknown request word" in r.getMessage()]) == 1
    with connect(sender.port) as sock:
        sock.sendall(REQUEST)
        _, payload = read_reply(sock)
    assert payload == words.tobytes()


def test_accepted_connections_use_the_configured_segment_size(make_sender):
    _, sender = make_sender(max_segment=32764)
    with connect(sender.port) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 32764
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# ------------------------------------------------------------ reply cuts


def _whole_events(words: np.ndarray) -> set[tuple[int, int]]:
    return {(int(e["offset"]), int(e["length"])) for e in decode(words).events}


def _check_cuts(words: np.ndarray, limit: int, start: int = 0) -> list[int]:
    """Cut a buffer like the sender; every whole event must land whole in one reply."""
    pool = BufferPool(1, max(words.nbytes, 4))
    buf = pool.buffers[0]
    buf.words[: words.size] = words
    buf.nbytes, buf.board_type, buf.sent_bytes = words.nbytes, DIGITIZER, start
    ends = reply_ends(buf, limit)
    buf.packet_words = Checker().check(words, card=0).packet_words
    assert reply_ends(buf, limit) == ends, "outLoop's packet size changed the cuts"
    assert ends[-1] == words.nbytes
    cuts = [start, *ends]
    assert all(b > a and b - a <= limit and b % 4 == 0 for a, b in itertools.pairwise(cuts))
    kept: set[tuple[int, int]] = set()
    for a, b in itertools.pairwise(cuts):
        kept |= {(off + a // 4, n) for off, n in _whole_events(words[a // 4 : b // 4])}
    whole = {(off + start // 4, n) for off, n in _whole_events(words[start // 4 :])}
    assert whole <= kept, "an event was split between replies"
    return ends


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(3, packets.MAX_PACKET_LENGTH), min_size=1, max_size=60),
    limit=st.integers(2048, 12000),
)
def test_cuts_keep_every_event_whole_and_replies_within_the_limit(lengths, limit):
    words = digitizer_events(len(lengths), lengths=lengths)
    ends = _check_cuts(words, limit)
    if words.nbytes > limit:  # greedy: no reply could have taken the next event too
        bounds = event_boundaries(words) * 4
        cuts = [0, *ends]
        for a, b in itertools.pairwise(cuts[:-1]):
            assert not any(b < x <= a + limit for x in bounds)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 400),
    trace_words=st.sampled_from([0, 100, 496]),
    limit=st.integers(2048, 40000),
    garbage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 3000)), max_size=3),
    marker_in_trace=st.booleans(),
)
def test_cuts_survive_garbage_and_false_markers(
    count, trace_words, limit, garbage, marker_in_trace
):
    parts = [digitizer_events(count, trace_words=trace_words)]
    if marker_in_trace and trace_words:
        parts[0][packets.HEADER_WORDS + 1] = packets.MARKER
    for where, size in garbage:
        junk = np.full(size, 0x12345678, dtype=WORD)
        junk[::7] = packets.MARKER
        cut = int(where % (sum(p.size for p in parts) + 1))
        flat = np.concatenate(parts)
        parts = [flat[:cut], junk, flat[cut:]]
    _check_cuts(np.concatenate(parts), limit)


def test_a_resumed_buffer_is_cut_from_where_it_stopped():
    words = digitizer_events(500, trace_words=100)
    first = _check_cuts(words, 20000)
    assert _check_cuts(words, 20000, start=first[0]) == first[1:]


def test_trigger_buffers_are_cut_at_whole_16_word_packets():
    pool = BufferPool(1)
    buf = pool.buffers[0]
    words = trigger_packets(1000)
    buf.words[: words.size] = words
    buf.nbytes, buf.board_type = words.nbytes, TRIGGER
    ends = reply_ends(buf, 3000)
    assert all(end % 64 == 0 for end in ends) and ends[-1] == words.nbytes
    assert max(b - a for a, b in zip([0, *ends], ends)) <= 3000


@pytest.mark.parametrize(
    ("trace_words", "limit", "buffers"),
    [(0, 2048, 3), (100, 5000, 2), (496, 280000, 2), (None, 7001, 2)],
    ids=["header-only", "200-sample", "992-sample", "mixed"],
)
def test_served_replies_hold_whole_events_of_one_board_within_the_limit(
    make_sender, trace_words, limit, buffers
):
    pool, sender = make_sender(max_reply_bytes=limit)
    rng = random.Random(trace_words)
    sent = []
    for i in range(buffers):
        if trace_words is None:
            lengths = [rng.randint(3, packets.MAX_PACKET_LENGTH) for _ in range(600)]
            words = digitizer_events(len(lengths), board=200 + i, lengths=lengths)
        else:
            count = (1 << 20) // 4 // (trace_words + 14) - i
            words = digitizer_events(count, board=200 + i, trace_words=trace_words)
        queue(pool, words, card=i)
        sent.append(words)
    receiver = Receiver(HOST, sender.port, pipeline=6, keep_payloads=True)
    tally = receiver.run(max_seconds=10, until_done=False, until=lambda t: t.insuff_replies > 0)
    payloads = tally.payloads
    assert b"".join(payloads) == b"".join(w.tobytes() for w in sent)
    for payload in payloads:
        assert len(payload) <= limit
        decoded = decode(np.frombuffer(payload, dtype=WORD))
        assert decoded.unknown == []
        assert len(set(decoded.events["board"].tolist())) == 1
    assert sum(log.events.size for log in tally.boards.values()) == sum(
        decode(w).events.size for w in sent
    )


# ---------------------------------------------------------- listener lifecycle


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_listener_opens_at_start_and_save_whichever_comes_last(make_sender):
    port = free_port()
    _, sender = make_sender(port=port, run=False)
    assert not sender.stats().listening and refused(port)
    sender.save_changed(True)  # Save without a run: still closed
    assert not sender.stats().listening and refused(port)
    sender.run_started(save=False)
    assert not sender.stats().listening and refused(port)
    sender.save_changed(True)
    assert sender.stats().listening
    connect(port).close()


def test_accepting_starts_accept_delay_after_the_run_starts(make_sender):
    port = free_port()
    _, sender = make_sender(port=port, run=False, accept_delay_s=0.3)
    started = time.monotonic()
    sender.run_started(save=True)
    assert refused(port)
    wait_until(lambda: sender.stats().listening, 5, "the listener")
    assert time.monotonic() - started >= 0.3
    connect(port).close()


def test_after_delivery_the_listener_closes_but_the_receiver_is_still_answered(make_sender):
    pool, sender = make_sender()
    port = sender.port
    words = digitizer_events(5)
    queue(pool, words)
    queue(pool, end_of_run())
    with connect(port) as sock:
        sock.sendall(REQUEST * 2)
        assert [read_reply(sock)[1] for _ in range(2)] == [words.tobytes(), end_of_run().tobytes()]
        sender.run_stopped()
        assert sender.stats().listening  # Stop alone does not close it
        sender.drain_complete()
        wait_until(lambda: not sender.stats().listening, 5, "the listener to close")
        assert refused(port)
        sock.sendall(REQUEST)
        header, _ = read_reply(sock)
        assert header[:4] == bytes.fromhex("00000005")
        assert sender.stats().serving


def test_the_listener_stays_open_until_queued_data_are_delivered(make_sender):
    pool, sender = make_sender()
    queue(pool, digitizer_events(5))
    sender.run_stopped()
    sender.drain_complete()
    assert nothing_changes(lambda: sender.stats().listening, 0.3)
    receiver = Receiver(HOST, sender.port, pipeline=1)
    receiver.run(max_replies=1)
    wait_until(lambda: not sender.stats().listening, 5, "the listener to close")
    assert receiver.tally.events == 5


def nothing_changes(value, seconds: float) -> bool:
    """True if ``value()`` stays truthy for ``seconds`` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not value():
            return False
        time.sleep(0.05)
    return True


def test_delivery_timeout_closes_the_listener_then_qsender_is_flushed_once_a_second(make_sender):
    pool, sender = make_sender(delivery_timeout_s=0.3)
    queue(pool, digitizer_events(10), card=1)
    queue(pool, digitizer_events(3), card=3)
    stopped = time.monotonic()
    sender.run_stopped()
    wait_until(lambda: not sender.stats().listening, 5, "the listener to close")
    assert time.monotonic() - stopped >= 0.3
    wait_until(lambda: unreachable(sender).buffers == 2, 5, "the first flush")
    first_flush = time.monotonic()
    assert unreachable(sender).bytes == (0, 10 * 56, 0, 3 * 56, 0, 0, 0)
    assert unreachable(sender).events == (0, 10, 0, 3, 0, 0, 0)
    assert all_free(pool)
    queue(pool, digitizer_events(1), card=6)
    wait_until(lambda: unreachable(sender).buffers == 3, 5, "the second flush")
    assert time.monotonic() - first_flush >= 0.9
    assert unreachable(sender).bytes[6] == 56


class Lost(NamedTuple):
    bytes: tuple[int, ...]
    events: tuple[int, ...]
    buffers: int


def lost(sender: Sender, reason: LossReason) -> Lost:
    snapshot = sender.losses.snapshot()
    return Lost(snapshot.bytes[reason], snapshot.events[reason], snapshot.buffers[reason])


def unreachable(sender: Sender) -> Lost:
    return lost(sender, LossReason.UNREACHABLE)


def test_nothing_is_flushed_while_a_run_with_save_waits_for_its_first_receiver(make_sender):
    pool, sender = make_sender(run=False, accept_delay_s=1.2)
    sender.run_started(save=True)
    queue(pool, digitizer_events(4))
    wait_until(lambda: sender.stats().listening, 5, "the listener")
    assert unreachable(sender).buffers == 0
    assert Receiver(HOST, sender.port, pipeline=1).run(max_replies=1).events == 4


def test_a_new_run_drops_the_previous_runs_leftovers_and_zeroes_the_counters(make_sender):
    pool, sender = make_sender()
    queue(pool, digitizer_events(1))
    Receiver(HOST, sender.port, pipeline=1).run(max_replies=1)
    queue(pool, digitizer_events(2))
    queue(pool, digitizer_events(3))
    wait_until(lambda: sender.stats().replies == 1, 5, "one data reply counted")
    sender.run_stopped()
    sender.losses.reset_run()  # as run control does at each Start
    sender.run_started(save=True)
    stats = sender.stats()
    assert len(pool.q_sender) == 0 and all_free(pool)
    assert (stats.replies, stats.bytes_sent) == (0, 0)
    superseded = lost(sender, LossReason.SUPERSEDED)
    assert (superseded.bytes[0], superseded.events[0], superseded.buffers) == (5 * 56, 5, 2)
    fresh = digitizer_events(4, first_ts=99)
    queue(pool, fresh)
    receiver = Receiver(HOST, sender.port, pipeline=1, keep_payloads=True)
    assert receiver.run(max_replies=1).payloads == [fresh.tobytes()]


def test_bind_check_reports_a_port_in_use(make_sender):
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        _, sender = make_sender(port=other.getsockname()[1], run=False)
        with pytest.raises(OSError):
            sender.bind_check()
    _, ours = make_sender()
    ours.bind_check()  # holding the port ourselves is fine


# -------------------------------------------------------- several receivers


def test_a_second_receiver_is_told_sender_off_and_served_after_the_first_leaves(
    make_sender, caplog
):
    pool, sender = make_sender(idle_wait_s=0.3)  # the first keeps requests outstanding
    first_words, second_words = digitizer_events(2), digitizer_events(3, first_ts=50)
    queue(pool, first_words)
    first = connect(sender.port)
    first.sendall(REQUEST * 4)
    assert read_reply(first)[1] == first_words.tobytes()
    queue(pool, second_words)
    with connect(sender.port) as second:
        second.sendall(REQUEST)
        assert read_exactly(second, 16) == struct.pack(">iiii", 3, 0, 0, 0)  # SENDER_OFF
        assert second.recv(1) == b"", "SENDER_OFF must close the connection"
    assert any("told to retry later" in r.getMessage() for r in caplog.records)
    assert read_reply(first)[1] == second_words.tobytes()
    third_words = digitizer_events(4, first_ts=90)
    queue(pool, third_words)
    first.close()
    with connect(sender.port) as again:
        again.sendall(REQUEST)
        assert read_reply(again)[1] == third_words.tobytes()


def test_a_receiver_that_gave_up_while_waiting_is_not_answered(make_sender):
    pool, sender = make_sender()
    first = connect(sender.port)
    wait_until(lambda: sender.stats().serving, 5, "the first receiver being served")
    gave_up = connect(sender.port)
    gave_up.sendall(REQUEST * 6)
    gave_up.close()  # its requests are still queued at the sender when it is its turn
    sent = [digitizer_events(3, first_ts=10 * i) for i in range(4)]
    for words in sent:
        queue(pool, words)
    first.close()
    receiver = Receiver(HOST, sender.port, pipeline=6, keep_payloads=True)
    receiver.run(until_done=False, until=lambda t: t.insuff_replies > 0)
    assert b"".join(receiver.tally.payloads) == b"".join(w.tobytes() for w in sent)


def test_an_idle_receiver_is_closed_once_when_data_wait(make_sender, caplog):
    caplog.set_level(logging.INFO, logger="dgs.sender")
    pool, sender = make_sender(idle_timeout_s=0.3)
    words = digitizer_events(2)
    with connect(sender.port) as idle:
        wait_until(lambda: sender.stats().serving, 5, "the idle receiver being served")
        queue(pool, words)
        started = time.monotonic()
        assert read_exactly_or_eof(idle) == b""  # the sender closed it
        assert time.monotonic() - started >= 0.2
    payloads = Receiver(HOST, sender.port, pipeline=1, keep_payloads=True).run(max_replies=1)
    assert payloads.payloads == [words.tobytes()]
    assert sum("no request" in r.getMessage() for r in caplog.records) == 1


def read_exactly_or_eof(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)
    return sock.recv(1)


def test_a_partial_request_at_close_is_logged_once(make_sender, caplog):
    caplog.set_level(logging.INFO, logger="dgs.sender")
    _, sender = make_sender()
    with connect(sender.port) as sock:
        sock.sendall(b"\x00\x00")
    wait_until(lambda: any("partial" in r.getMessage() for r in caplog.records), 5, "the log")
    assert nothing_changes(lambda: sum("partial" in r.getMessage() for r in caplog.records) == 1,
                           0.2)


# ------------------------------------------------- receivers that go away


def test_a_receiver_that_stops_asking_and_closes_loses_nothing(make_sender):
    pool, sender = make_sender(max_reply_bytes=4096)
    sent = [digitizer_events(300, board=101 + i % 3, first_ts=1000 * i) for i in range(6)]
    for words in sent:
        queue(pool, words)
    first = Receiver(HOST, sender.port, pipeline=6, keep_payloads=True).run(max_replies=7)
    assert first.replies == 7
    second = Receiver(HOST, sender.port, pipeline=6, keep_payloads=True)
    second.run(until_done=False, until=lambda t: t.insuff_replies > 0)
    assert b"".join(first.payloads + second.tally.payloads) == b"".join(w.tobytes() for w in sent)
    wait_until(lambda: all_free(pool), 5, "every buffer back in qFree")


def test_a_receiver_that_closes_while_its_requests_wait_for_data_loses_nothing(
    make_sender, caplog
):
    caplog.set_level(logging.INFO, logger="dgs.sender")
    pool, sender = make_sender(idle_wait_s=2.0)
    with connect(sender.port) as done:
        done.sendall(REQUEST * 6)
        assert nothing_arrives(done, 0.3)  # the sender holds its requests, waiting for data
    sent = [digitizer_events(5, first_ts=100 * i) for i in range(3)]
    for words in sent:
        queue(pool, words)
    after = Receiver(HOST, sender.port, pipeline=1, keep_payloads=True).run(max_replies=3)
    assert after.payloads == [w.tobytes() for w in sent]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_receiver_reset_mid_reply_leaves_that_reply_whole_for_the_next(make_sender):
    size = 8 << 20  # far more than the kernel can buffer for a slow reader
    pool, sender = make_sender(pool_size=3, buffer_bytes=size, max_reply_bytes=10_000_000)
    words = digitizer_events(size // 4 // 114, trace_words=100)
    queue(pool, words)
    killed = socket.socket()
    killed.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    killed.settimeout(5)
    killed.connect((HOST, sender.port))
    killed.sendall(REQUEST)
    header = read_exactly(killed, 16)
    assert struct.unpack(">ii", header[:8]) == (4, words.nbytes)
    read_exactly(killed, 1000)
    reset_close(killed)
    wait_until(lambda: sender.stats().requeued == 1, 10, "the reply to be requeued")
    with connect(sender.port) as sock:
        sock.sendall(REQUEST)
        header, payload = read_reply(sock)
    assert payload == words.tobytes()
    wait_until(lambda: all_free(pool), 5, "the buffer back in qFree")
    assert sender.stats().replies == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_receivers_lose_at_most_their_in_flight_replies(make_sender, seed):
    """R3 in small: 12 receivers killed mid-header, mid-payload or between replies."""
    rng = random.Random(seed)
    pool, sender = make_sender(pool_size=40, max_reply_bytes=2048)
    events_per_buffer, pipeline = 100, 2
    for i in range(30):
        queue(pool, digitizer_events(events_per_buffer, first_ts=1 + i * events_per_buffer))
    received: list[np.ndarray] = []  # timestamps of fully read replies, in order
    in_flight = 0
    for _ in range(12):
        sock = connect(sender.port)
        sock.sendall(REQUEST * pipeline)
        for _ in range(rng.randint(0, 3)):
            _, payload = read_reply(sock)
            received.append(decode(np.frombuffer(payload, WORD)).events["timestamp"])
            sock.sendall(REQUEST)
        where = rng.choice(["mid-header", "mid-payload", "between"])
        if where != "between":
            read_exactly(sock, 8 if where == "mid-header" else 16 + 100)
        reset_close(sock)
        in_flight += pipeline
    rest = Receiver(HOST, sender.port, pipeline=6)
    rest.run(until_done=False, until=lambda t: t.insuff_replies > 0)
    received.extend(log.events["timestamp"] for log in rest.tally.boards.values())
    stamps = np.concatenate(received)
    assert (np.diff(stamps.astype(np.int64)) > 0).all(), "duplicated or re-ordered events"
    lost = 30 * events_per_buffer - stamps.size
    assert 0 <= lost <= in_flight * (2048 // 56)
    wait_until(lambda: all_free(pool), 5, "every buffer back in qFree")


# ------------------------------------------------------- malformed input


def test_garbage_immediate_closes_and_idle_connections_do_not_stop_the_server(
    make_sender, caplog
):
    """R4 in small: random bytes are requests; the server keeps serving afterwards."""
    caplog.set_level(logging.INFO, logger="dgs.sender")
    pool, sender = make_sender(idle_wait_s=0.002, idle_timeout_s=0.1)
    port = sender.port

    @settings(max_examples=30, deadline=None)
    @given(garbage=st.binary(max_size=48), ending=st.sampled_from(["close", "reset", "linger"]))
    def misbehave(garbage: bytes, ending: str) -> None:
        sock = connect(port)
        if garbage:
            sock.sendall(garbage)
        if ending == "reset":
            reset_close(sock)
        elif ending == "close":
            sock.close()
        else:
            idle.append(sock)  # left open and silent until the end

    idle: list[socket.socket] = []
    misbehave()
    words = digitizer_events(7, first_ts=12345)

    def data_once_served(tally) -> None:
        """Queue data only when the good receiver is served: garbage requests would take it."""
        if tally.replies == 1:
            queue(pool, words)

    good = Receiver(HOST, port, pipeline=6)
    tally = good.run(
        until_done=False, until=lambda t: 101 in t.boards, on_reply=data_once_served,
        max_seconds=20,
    )
    assert 12345 in tally.boards[101].events["timestamp"]
    for sock in idle:
        sock.close()
    wait_until(lambda: all_free(pool), 5, "every buffer back in qFree")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    cases = Counter(re.match(r"receiver (\S+): (\w+)", message).groups() for message in warnings)
    assert cases and max(cases.values()) == 1, "a bad case logged twice for one connection"


# ------------------------------------------------------------------ shutdown


def test_shutdown_lets_the_receiver_take_what_is_queued(make_sender):
    pool, sender = make_sender(max_reply_bytes=4096)
    sent = [digitizer_events(200, first_ts=1000 * i) for i in range(4)]
    for words in sent:
        queue(pool, words)
    total = sum(w.nbytes for w in sent)
    served, shutting_down = threading.Event(), threading.Event()

    def hold_after_first_reply(tally) -> None:
        if tally.replies == 1:
            served.set()
            shutting_down.wait(5)

    receiver = Receiver(HOST, sender.port, pipeline=1, keep_payloads=True)
    puller = threading.Thread(
        target=receiver.run,
        kwargs={
            "until_done": False,
            "until": lambda t: t.payload_bytes == total,
            "on_reply": hold_after_first_reply,
        },
        daemon=True,
    )
    puller.start()
    assert served.wait(5)
    assert len(pool.q_sender) > 0
    started = time.monotonic()
    shutting_down.set()
    sender.shutdown(deliver_timeout=3.0)
    assert time.monotonic() - started < 3.0
    puller.join(10)
    assert b"".join(receiver.tally.payloads) == b"".join(w.tobytes() for w in sent)
    assert all_free(pool)


def test_shutdown_after_stop_waits_for_the_drain_to_deliver_the_end_of_run(make_sender):
    pool, sender = make_sender()
    data, end = digitizer_events(50), end_of_run(101)
    queue(pool, data)
    receiver = Receiver(HOST, sender.port, pipeline=1, keep_payloads=True)
    total = data.nbytes + end.nbytes
    puller = threading.Thread(
        target=receiver.run,
        kwargs={"until_done": False, "until": lambda t: t.payload_bytes == total},
        daemon=True,
    )
    puller.start()
    wait_until(lambda: receiver.tally.payload_bytes == data.nbytes, 5, "the data delivered")
    sender.run_stopped()
    started = time.monotonic()
    shutdown = threading.Thread(target=sender.shutdown, kwargs={"deliver_timeout": 5.0})
    shutdown.start()  # qSender is empty, but the drain has not queued its 0xD yet
    assert nothing_changes(lambda: shutdown.is_alive(), 0.3)
    queue(pool, end)
    sender.drain_complete()
    shutdown.join(10)
    puller.join(10)
    assert time.monotonic() - started < 5.0
    assert receiver.tally.payloads == [data.tobytes(), end.tobytes()]


def test_shutdown_lets_a_pipelining_receiver_take_the_last_replies_before_closing(make_sender):
    """A receiver that asks again after each reply keeps writing until it sees the close.
    Had the sender closed with the last replies still in its socket, such a request
    would reset the connection and throw them away (the end of run among them)."""
    pool, sender = make_sender(max_reply_bytes=1 << 20)
    sent = [digitizer_events(2400, first_ts=10_000 * i, trace_words=80) for i in range(6)]
    sent.append(end_of_run())
    for words in sent:
        queue(pool, words)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # most stays with the sender
    sock.settimeout(5.0)
    with sock:
        sock.connect((HOST, sender.port))
        sock.sendall(REQUEST * len(sent))
        assert sock.recv(1, socket.MSG_PEEK), "served"
        shutdown = threading.Thread(target=sender.shutdown, kwargs={"deliver_timeout": 5.0})
        shutdown.start()
        received: list[bytes] = []
        with contextlib.suppress(ConnectionError):
            for _ in range(len(sent)):
                received.append(read_reply(sock)[1])
                with contextlib.suppress(OSError):
                    sock.sendall(REQUEST)
        shutdown.join(10)
    assert [len(payload) for payload in received] == [words.nbytes for words in sent]
    assert received == [words.tobytes() for words in sent]


def test_shutdown_with_nobody_connected_returns_at_once(make_sender):
    pool, sender = make_sender()
    queue(pool, digitizer_events(3))
    started = time.monotonic()
    sender.shutdown(deliver_timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert pool.audit().ok and len(pool.q_sender) == 1

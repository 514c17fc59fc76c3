"""Protocol v2 on the data port, byte by byte, against a real `Sender` on loopback.

`V2Client` below is the small, independent test client of docs/protocol.md: it
packs the hello and requests with `struct` itself and checks every reply
field, so the IOC's codecs are not trusted to test themselves.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ioc_harness import wait_until
from test_sender import HOST, REQUEST, connect, digitizer_events, queue, read_exactly, read_reply

from ioc.config import SenderConfig
from ioc.delivery import RunIdentity
from ioc.losses import LossReason
from ioc.pool import BufferPool
from ioc.sender import Sender

HELLO = struct.Struct(">4sHHiQI")
REQUEST_V2 = struct.Struct(">4sIQ")
HEADER = struct.Struct(">iiiiQQ")
INFO = struct.Struct(">IIQII")
DATA, NO_DATA, HELLO_REPLY, REFUSED = 4, 5, 6, 7
WRONG_RUN, BUSY = 1, 2
COMPLETE = 0x100
RUN = RunIdentity(number=12, start_ns=1_700_000_000_000_000_000, boards=(101, 102))
SETTINGS = {"idle_wait_s": 0.02, "idle_timeout_s": 2.0}


class V2Client:
    """Hello, then requests with acknowledgements; every reply parsed and checked."""

    def __init__(self, port: int, run: int = -1, start_ns: int = 0, description: str = ""):
        self.sock = connect(port)
        text = description.encode()
        self.sock.sendall(HELLO.pack(b"DGS2", 2, 0, run, start_ns, len(text)) + text)
        self.header = HEADER.unpack(read_exactly(self.sock, HEADER.size))
        payload = read_exactly(self.sock, self.header[1])
        crate, status, start, max_reply, count = INFO.unpack_from(payload)
        self.info = {"crate": crate, "status": status, "run_start_ns": start,
                     "max_reply": max_reply,
                     "boards": struct.unpack_from(f">{count}I", payload, INFO.size)}
        self.text = payload[INFO.size + 4 * count :].decode()
        #: Stream offset of the next byte expected, and the acknowledgement sent.
        self.offset = self.acked = self.header[4]

    @property
    def kind(self) -> int:
        return self.header[0]

    def ask(self, count: int = 1) -> None:
        self.sock.sendall(REQUEST_V2.pack(b"DGSR", count, self.acked))

    def reply(self) -> tuple[tuple[int, ...], bytes]:
        header = HEADER.unpack(read_exactly(self.sock, HEADER.size))
        payload = read_exactly(self.sock, header[1])
        if header[0] == DATA:
            assert header[4] == self.offset, "a gap or an overlap in the stream"
            self.offset += header[1]
        return header, payload

    def take(self, replies: int) -> bytes:
        """Ask and read ``replies`` replies one at a time, acknowledging each data reply."""
        data = b""
        for _ in range(replies):
            self.ask()
            header, payload = self.reply()
            if header[0] == DATA:
                data += payload
                self.acked = self.offset
        return data

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def running_sender(pool_size: int = 32, **settings) -> Iterator[tuple[BufferPool, Sender]]:
    """A started sender of crate 1 holding run 12, on its own pool; audited at the end."""
    pool = BufferPool(pool_size, 1 << 16)
    sender = Sender(pool, SenderConfig(**{**SETTINGS, **settings}), HOST, 0, crate=1)
    sender.start()
    sender.run_started(save=True, run=RUN)
    try:
        yield pool, sender
    finally:
        sender.shutdown(deliver_timeout=0.0)
    assert pool.audit().ok


@pytest.fixture
def make_sender():
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(running_sender(**settings))


def test_hello_reply_names_the_crate_the_run_its_start_and_its_boards(make_sender):
    _, sender = make_sender()
    client = V2Client(sender.port, run=12)
    assert client.kind == HELLO_REPLY
    assert client.header[3] == 12 and client.header[4] == 0  # run, resume offset
    assert client.info["crate"] == 1 and client.info["run_start_ns"] == RUN.start_ns
    assert client.info["boards"] == (101, 102)
    assert client.info["status"] & 0xFF == 1 and not client.info["status"] & COMPLETE  # Running
    client.close()


def test_data_replies_carry_the_run_and_their_stream_offset(make_sender):
    pool, sender = make_sender()
    sent = [digitizer_events(3, first_ts=10 * i) for i in range(3)]
    for words in sent:
        queue(pool, words)
    client = V2Client(sender.port, run=12)
    data = client.take(3)
    assert data == b"".join(w.tobytes() for w in sent)
    client.ask()
    header, _ = client.reply()
    assert header[0] == NO_DATA and header[3] == 12 and header[4] == len(data)
    client.close()


def test_unacknowledged_bytes_are_kept_and_the_next_client_resumes_at_the_first(make_sender):
    pool, sender = make_sender()
    sent = [digitizer_events(2 + i, first_ts=100 * i) for i in range(5)]
    for words in sent:
        queue(pool, words)
    first = V2Client(sender.port, run=12)
    stored = first.take(2)  # acknowledged with the next request
    first.ask(2)
    first.reply()
    first.reply()  # received, never acknowledged
    first.close()
    wait_until(lambda: not sender.stats().serving, 5, "the first client gone")
    second = V2Client(sender.port, run=12)
    assert second.header[4] == len(stored), "it did not resume at the first unacknowledged byte"
    rest = second.take(3)
    assert stored + rest == b"".join(w.tobytes() for w in sent), "lost or duplicated bytes"
    second.ask(0)  # the last acknowledgement, alone
    wait_until(lambda: len(pool.q_free) == pool.size, 5, "acknowledged buffers released")
    second.close()
    wait_until(lambda: len(pool.q_free) == pool.size, 5, "acknowledged buffers released")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 2**32))
def test_any_sequence_of_dying_clients_delivers_every_byte_once(takes, seed):
    """Clients that take a few replies, acknowledge some, and die (with requests
    still in flight): the acknowledged parts, in order, are the stream exactly."""
    with running_sender(pool_size=64) as (pool, sender):
        dying_clients_deliver_every_byte_once(pool, sender, takes, random.Random(seed))


def dying_clients_deliver_every_byte_once(pool, sender, takes, rng) -> None:
    sent = [digitizer_events(rng.randint(1, 40), first_ts=1000 * i) for i in range(20)]
    for words in sent:
        queue(pool, words)
    expected = b"".join(w.tobytes() for w in sent)
    stored = b""
    for take in [*takes, 40]:
        wait_until(lambda: not sender.stats().serving, 5, "the previous client gone")
        client = V2Client(sender.port, run=12)
        assert client.header[4] == len(stored)
        stored += client.take(take)
        client.ask(rng.randint(0, 3))  # in flight when it dies: never acknowledged
        client.close()
        if len(stored) == len(expected):
            break
    assert stored == expected


def test_a_client_for_another_run_or_a_restarted_run_is_refused(make_sender):
    _, sender = make_sender()
    for run, start in ((13, 0), (12, RUN.start_ns + 1)):
        client = V2Client(sender.port, run=run, start_ns=start)
        assert client.kind == REFUSED and client.header[2] == WRONG_RUN
        assert client.header[3] == 12 and "run 12" in client.text
        assert client.sock.recv(1) == b"", "a refusal must close the connection"
        client.close()


def test_a_second_client_is_refused_busy_while_the_first_is_served(make_sender):
    _, sender = make_sender(idle_wait_s=0.3)
    first = V2Client(sender.port, run=12)
    first.ask(3)  # outstanding: it is active
    second = V2Client(sender.port, run=12)
    assert second.kind == REFUSED and second.header[2] == BUSY
    second.close()
    first.close()


def test_the_run_completes_once_drained_and_everything_is_acknowledged(make_sender):
    pool, sender = make_sender()
    words = digitizer_events(5)
    queue(pool, words)
    sender.run_stopped()
    sender.drain_complete()
    client = V2Client(sender.port, run=12)
    assert client.take(1) == words.tobytes()
    client.ask()
    header, _ = client.reply()
    assert header[0] == NO_DATA and header[2] & COMPLETE and header[2] & 0xFF == 0
    client.close()
    wait_until(lambda: not sender.stats().listening, 5, "the listener closed: all delivered")


def test_an_acknowledgement_beyond_what_was_sent_ends_the_connection_keeping_the_data(
    make_sender,
):
    pool, sender = make_sender()
    words = digitizer_events(4)
    queue(pool, words)
    client = V2Client(sender.port, run=12)
    client.acked = 1 << 40
    client.ask()
    assert client.sock.recv(1) == b"", "served despite a false acknowledgement"
    client.close()
    assert sender.stats().rejected == 1
    good = V2Client(sender.port, run=12)
    assert good.take(1) == words.tobytes()
    good.close()


def test_the_next_client_learns_how_the_previous_one_described_itself(make_sender):
    _, sender = make_sender()
    described = json.dumps({"host": "daq1", "journal": "/data/run00012/.run00012.journal_0"})
    first = V2Client(sender.port, run=12, description=described)
    assert first.text == ""
    first.close()
    wait_until(lambda: not sender.stats().serving, 5, "the first client gone")
    second = V2Client(sender.port, run=12)
    assert second.text == described
    second.close()


def new_run(sender: Sender) -> None:
    sender.losses.reset_run()
    sender.run_started(save=True, run=RunIdentity(13, RUN.start_ns + 10**9, (101, 102)))


def test_a_new_run_ends_a_v2_connection_of_the_old_one_and_counts_its_leftovers(make_sender):
    pool, sender = make_sender()
    queue(pool, digitizer_events(3))
    queue(pool, digitizer_events(4, first_ts=50))
    client = V2Client(sender.port, run=12)
    client.take(1)
    client.ask(0)  # the acknowledgement of the stored buffer alone
    wait_until(lambda: sender.delivery.acked == client.acked, 5, "the acknowledgement applied")
    new_run(sender)
    client.ask()
    header, _ = client.reply()
    assert header[0] == REFUSED and header[2] == WRONG_RUN and header[3] == 13
    client.close()
    wait_until(lambda: sender.delivery.current, 5, "the sender caught up with the new run")
    assert sender.losses.snapshot().events[LossReason.SUPERSEDED][0] == 4
    wait_until(lambda: len(pool.q_free) == pool.size, 5, "the old run's buffers released")


def test_an_acknowledgement_of_the_old_run_after_a_start_is_no_violation(make_sender):
    """The old run's acknowledgement arriving once its data were dropped: the client is told
    the run is over (WRONG_RUN), not cut off as a protocol breaker."""
    pool, sender = make_sender()
    queue(pool, digitizer_events(3))
    queue(pool, digitizer_events(4, first_ts=50))
    client = V2Client(sender.port, run=12)
    client.take(1)
    new_run(sender)
    wait_until(lambda: sender.delivery.current, 5, "the sender caught up with the new run")
    client.ask()
    header, _ = client.reply()
    assert header[0] == REFUSED and header[2] == WRONG_RUN and header[3] == 13
    client.close()
    assert sender.losses.snapshot().events[LossReason.SUPERSEDED][0] == 7
    assert sender.stats().rejected == 0
    wait_until(lambda: len(pool.q_free) == pool.size, 5, "the old run's buffers released")


def test_classic_and_v2_clients_share_the_port(make_sender):
    """A classic receiver after a v2 one: byte-for-byte classic replies, from where v2
    acknowledged."""
    pool, sender = make_sender()
    first, second = digitizer_events(2), digitizer_events(3, first_ts=9)
    queue(pool, first)
    queue(pool, second)
    client = V2Client(sender.port, run=12)
    assert client.take(1) == first.tobytes()
    client.ask(0)  # the acknowledgement alone
    client.close()
    wait_until(lambda: not sender.stats().serving, 5, "the v2 client gone")
    with socket.create_connection((HOST, sender.port), timeout=5) as sock:
        sock.sendall(REQUEST)
        header, payload = read_reply(sock)
    assert header == struct.pack(">iiii", 4, len(payload), 0, 1)
    assert payload == second.tobytes()
    assert np.array_equal(np.frombuffer(payload, dtype=">u4"), second)

"""R4 (spec 06): malformed input on the data port.

Hypothesis drives connections at a crate that is running with Save: request
streams split over several writes, valid requests followed by random bytes,
random bytes alone, immediate closes, orderly or abortive, with some or none
of the replies read. Only the valid requests before the first unknown word
are ever answered; that word ends the connection. After every example the IOC
is alive and a well-behaved receiver gets data. Idle connections are closed
after the (shortened) idle timeout. Every bad case is logged at most once per
connection.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dataflow import (
    DEMO_SPECS,
    assert_pool_whole,
    ioc_process,
    kill_socket,
    read_exactly,
    receiver,
    start_run,
    stop_run,
    write_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ioc_harness import IocProcess

from receiver.client import HEADER, INSUFF_DATA, REQUEST, SERVER_SUMMARY, Receiver

IDLE_TIMEOUT_S = 1.0
#: About 10 000 connections in all (spec 06); DGS_FUZZ_EXAMPLES changes it for longer hunts.
EXAMPLES = int(os.environ.get("DGS_FUZZ_EXAMPLES", "1450"))
#: Connections per example. Each example ends with a receiver that waits its turn, so the
#: IOC's accept backlog (16) never overflows into the kernel's 1-s SYN retries.
MIN_CASES, MAX_CASES = 4, 12
#: How long a client waits to be sure no further (unsolicited) reply comes.
QUIET_S = 0.02
MAX_REPLY = 280_000

_SENDER_WARNING = re.compile(r"WARNING dgs\.sender: receiver (\S+): (.*)$")
BAD_CASES = (
    "partial request", "connection lost", "took nothing", "no request for", "unknown request word",
    "no request outstanding",
)


@dataclass(frozen=True)
class Case:
    """One connection: what it writes (in pieces), how many replies it reads, how it leaves."""

    chunks: tuple[bytes, ...]
    read: int
    abort: bool
    check_quiet: bool

    @property
    def valid_requests(self) -> int:
        """Whole words equal to the classic request before the first other word."""
        data = b"".join(self.chunks)
        count = 0
        while data[4 * count : 4 * count + 4] == REQUEST:
            count += 1
        return count

    @property
    def rejected(self) -> bool:
        """It sends a whole word the protocol does not know (then it is closed)."""
        return len(b"".join(self.chunks)) // 4 > self.valid_requests


@st.composite
def cases(draw) -> Case:
    valid = REQUEST * draw(st.integers(0, 8))
    tail = draw(st.one_of(st.just(b""), st.binary(max_size=3), st.binary(max_size=96)))
    data = valid + tail
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    chunks = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)
    case = Case(chunks, 0, draw(st.booleans()), False)
    # Whether the requests before a bad word are answered depends on how the bytes
    # arrive, so only a stream without one reads replies.
    read = 0 if case.rejected else draw(st.integers(0, min(case.valid_requests, 3)))
    # The check for unsolicited replies costs a wait, so only about one connection in eight.
    quiet = not case.rejected and read == case.valid_requests and draw(st.integers(0, 7)) == 7
    return Case(chunks, read, case.abort, quiet)


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r4")
    config = write_config(workdir, DEMO_SPECS, sender={"idle_timeout_s": IDLE_TIMEOUT_S})
    with ioc_process(workdir, "--config", str(config)) as ioc:
        start_run(ioc)
        yield ioc


#: Local ports of every connection the fuzzer made, to match the IOC's log lines.
_peers: Counter[str] = Counter()


def play(port: int, case: Case) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _peers[f"127.0.0.1:{sock.getsockname()[1]}"] += 1
    try:
        for chunk in case.chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                assert case.rejected, "a connection that broke no rule was closed"
                return  # closed for its unknown word while the rest was still being written
        for _ in range(case.read):
            header = HEADER.unpack(read_exactly(sock, HEADER.size))
            assert header[0] in (SERVER_SUMMARY, INSUFF_DATA), header
            read_exactly(sock, header[1])
        if case.rejected and not case.abort:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    replies = len(chunk)  # replies to the valid requests may come first
                    assert replies <= case.valid_requests * (HEADER.size + MAX_REPLY), chunk[:16]
        if case.check_quiet:
            sock.settimeout(QUIET_S)
            with pytest.raises(TimeoutError):
                extra = sock.recv(1)
                raise AssertionError(f"unsolicited or partial-request reply: {extra!r}")
    finally:
        kill_socket(sock) if case.abort else sock.close()


def well_behaved_gets_data(port: int) -> None:
    """A receiver asking one reply at a time gets a data reply; then it leaves cleanly."""
    tally = receiver_for(port).run(until_done=False, until=lambda t: t.data_replies > 0,
                                   max_replies=50)
    assert tally.data_replies, "no data reply in 50 requests"


def receiver_for(port: int) -> Receiver:
    return Receiver("127.0.0.1", port, pipeline=1, connect_timeout=10, read_timeout=10)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(cases(), min_size=MIN_CASES, max_size=MAX_CASES))
def test_random_streams_partial_requests_and_closes_never_stop_the_service(crate, batch):
    for case in batch:
        play(crate.ports.data, case)
    assert crate.proc.poll() is None, "the IOC died"
    well_behaved_gets_data(crate.ports.data)


def test_idle_connections_are_closed_after_the_idle_timeout_and_the_next_is_served(crate):
    """Silent and partial-request connections neither get data nor hold the port: each
    is closed one idle timeout after it came (waiting for a turn or not)."""
    port = crate.ports.data
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    partial = socket.create_connection(("127.0.0.1", port), timeout=10)
    partial.sendall(b"\x00\x00")
    for sock in (*idle, partial):
        _peers[f"127.0.0.1:{sock.getsockname()[1]}"] += 1
    start = time.monotonic()
    closed_after = []
    try:
        for sock in (*idle, partial):
            sock.settimeout(IDLE_TIMEOUT_S * 4 + 5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b"", "an idle connection got data"
            closed_after.append(time.monotonic() - start)
    finally:
        for sock in (*idle, partial):
            sock.close()
    assert all(IDLE_TIMEOUT_S * 0.9 <= t <= IDLE_TIMEOUT_S + 2.0 for t in closed_after), (
        closed_after
    )
    well_behaved_gets_data(port)


def test_each_bad_case_is_logged_once_and_a_run_still_ends_cleanly(crate):
    """Runs last in this module: looks back at everything the fuzzer did."""
    ioc = crate
    rx = receiver(ioc, pipeline=6)
    stop_run(ioc)
    assert rx.run(max_seconds=60).all_done, "a receiver after the fuzzing got every 0xD"
    assert_pool_whole(ioc)

    def logged() -> list[tuple[str, str]]:
        found = []
        for line in ioc.log().splitlines():
            match = _SENDER_WARNING.search(line)
            if match:
                reason = next((r for r in BAD_CASES if match.group(2).startswith(r)), "other")
                found.append((match.group(1), reason))
        return found

    assert ioc.proc.poll() is None
    warnings = logged()
    per_case = Counter(warnings)
    repeated = {key: n for key, n in per_case.items() if n > 1 and _peers[key[0]] == 1}
    assert not repeated, f"bad cases logged more than once: {list(repeated.items())[:5]}"
    assert all(reason != "other" for _, reason in warnings), warnings[:5]
    idle_logged = sum(1 for _, reason in warnings if reason == "no request for")
    assert idle_logged >= 3, "the idle timeouts were not logged"
    assert len(warnings) <= len(BAD_CASES) * sum(_peers.values())
    assert sum(_peers.values()) >= MIN_CASES * EXAMPLES
    assert "Traceback" not in ioc.log()

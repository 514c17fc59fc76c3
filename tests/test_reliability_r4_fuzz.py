"""R4 (spec 06): malformed input on the data port.

Hypothesis drives connections at a crate that is running with Save: random
byte streams (every 4 bytes are a request, the rest a partial one), requests
split over several writes, immediate closes, orderly or abortive, with some or
none of the replies read. After every example the IOC is alive and a
well-behaved receiver gets data. Idle connections are closed after the
(shortened) idle timeout. Every bad case is logged at most once per
connection. Random bytes are valid requests, so loss is not asserted here.
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

from receiver.client import HEADER, INSUFF_DATA, SERVER_SUMMARY, DataConnection

IDLE_TIMEOUT_S = 1.0
#: About 10 000 connections in all (spec 06); DGS_FUZZ_EXAMPLES changes it for longer hunts.
EXAMPLES = int(os.environ.get("DGS_FUZZ_EXAMPLES", "1450"))
#: Connections per example. Each example ends with a receiver that waits its turn, so the
#: IOC's accept backlog (16) never overflows into the kernel's 1-s SYN retries.
MIN_CASES, MAX_CASES = 4, 12
#: How long a client waits to be sure no further (unsolicited) reply comes.
QUIET_S = 0.02

_SENDER_WARNING = re.compile(r"WARNING dgs\.sender: receiver (\S+): (.*)$")
BAD_CASES = ("partial request", "connection lost", "took nothing", "no request for")


@dataclass(frozen=True)
class Case:
    """One connection: what it writes (in pieces), how many replies it reads, how it leaves."""

    chunks: tuple[bytes, ...]
    read: int
    abort: bool
    check_quiet: bool

    @property
    def requests(self) -> int:
        return sum(len(c) for c in self.chunks) // 4


@st.composite
def cases(draw) -> Case:
    data = draw(st.binary(max_size=96))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    chunks = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)
    requests = len(data) // 4
    read = draw(st.integers(0, min(requests, 3)))
    # The check for unsolicited replies costs a wait, so only about one connection in eight.
    quiet = read == requests and draw(st.integers(0, 7)) == 7
    return Case(chunks, read, draw(st.booleans()), quiet)


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
            sock.sendall(chunk)
        for _ in range(case.read):
            header = HEADER.unpack(read_exactly(sock, HEADER.size))
            assert header[0] in (SERVER_SUMMARY, INSUFF_DATA), header
            read_exactly(sock, header[1])
        if case.check_quiet:
            sock.settimeout(QUIET_S)
            with pytest.raises(TimeoutError):
                extra = sock.recv(1)
                raise AssertionError(f"unsolicited or partial-request reply: {extra!r}")
    finally:
        kill_socket(sock) if case.abort else sock.close()


def well_behaved_gets_data(port: int) -> None:
    """One request at a time until a data reply; then leave cleanly."""
    conn = DataConnection.connect("127.0.0.1", port, timeout=10, read_timeout=10)
    try:
        for _ in range(50):
            conn.request(1)
            header, _ = conn.read_reply()
            if header.type == SERVER_SUMMARY:
                return
        raise AssertionError("no data reply in 50 requests")
    finally:
        conn.close()


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
    port = crate.ports.data
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    partial = socket.create_connection(("127.0.0.1", port), timeout=10)
    partial.sendall(b"\x00\x00")
    for sock in (*idle, partial):
        _peers[f"127.0.0.1:{sock.getsockname()[1]}"] += 1
    start = time.monotonic()
    closed_after = []
    try:
        for sock in (*idle, partial):  # served one at a time, in the order they came
            sock.settimeout(IDLE_TIMEOUT_S * 4 + 5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b"", "an idle connection got data"
            closed_after.append(time.monotonic() - start)
    finally:
        for sock in (*idle, partial):
            sock.close()
    gaps = [b - a for a, b in itertools.pairwise([0.0, *closed_after])]
    assert all(IDLE_TIMEOUT_S * 0.9 <= gap <= IDLE_TIMEOUT_S + 2.0 for gap in gaps), gaps
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

"""The whole data path on a real demo crate: sim -> inLoop -> outLoop -> sender -> receiver.

Real IOC process, real TCP sockets on loopback, the project's receiver client;
the simulator's own counters (`SIM_Generated`) are the reference.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from ioc_harness import wait_until

from ioc.decoder import KIND_EVENT, KIND_TYPE_F, decode, trace_of
from ioc.hardware import WORD
from ioc.packets import CH_END_OF_RUN
from receiver.client import HEADER, REQUEST, Receiver, Tally, decode_payload

BOARDS = {"MDIG1": 101, "MDIG2": 102, "MDIG3": 103, "MDIG4": 104}
#: 200-sample events: 14 + 100 words.
EVENT_BYTES = 4 * (14 + 100)
MAX_REPLY = 280_000


def start_run(ioc, save: str = "Save") -> None:
    ioc.put_ok("Online_CS_SaveData", save)
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")


def stop_run(ioc) -> None:
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)


class Background:
    """A receiver session in a thread (it connects before or after the listener opens)."""

    def __init__(self, receiver: Receiver, **run_args) -> None:
        self.receiver = receiver
        self.tally: Tally | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=run_args, daemon=True)
        self.thread.start()

    def _run(self, **run_args) -> None:
        try:
            self.tally = self.receiver.run(**run_args)
        except BaseException as err:  # reported by join()
            self.error = err

    def join(self, timeout: float = 60.0) -> Tally:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not finish"
        if self.error is not None:
            raise self.error
        assert self.tally is not None
        return self.tally


def receiver(ioc, **kwargs) -> Receiver:
    kwargs.setdefault("connect_timeout", 30.0)
    return Receiver("127.0.0.1", ioc.ports.data, **kwargs)


def generated(ioc) -> dict[int, int]:
    return {bid: int(ioc.getf(f"VME01:{name}:SIM_Generated")) for name, bid in BOARDS.items()}


def data_keys(events: np.ndarray) -> np.ndarray:
    """(channel, timestamp) of digitizer events, one int per event."""
    data = events[events["kind"] == KIND_EVENT]
    return data["timestamp"].astype(np.uint64) * np.uint64(16) + data["channel"].astype(np.uint64)


def assert_channel_order(events: np.ndarray) -> None:
    data = events[events["kind"] == KIND_EVENT]
    for channel in np.unique(data["channel"]):
        ts = data["timestamp"][data["channel"] == channel].astype(np.int64)
        assert (np.diff(ts) > 0).all(), f"channel {channel} out of order"


def assert_end_of_run_last_and_once(events: np.ndarray) -> None:
    end = (events["kind"] == KIND_TYPE_F) & (events["channel"] == CH_END_OF_RUN)
    assert int(end.sum()) == 1
    assert bool(end[-1]), "0xD is not right after the board's last data"


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


def _kill(sock: socket.socket) -> None:
    """Abort like a killed process: RST, no orderly close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def killed_receiver(port: int, mode: int, full: int, pipeline: int = 6) -> tuple[Tally, int]:
    """Ask ``pipeline`` replies, read ``full`` of them, then die between replies (mode 0),
    mid-header (1) or mid-payload (2). Returns what it fully got and its in-flight count."""
    tally = Tally()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(REQUEST * pipeline)
        for _ in range(full):
            header = HEADER.unpack(_read_exactly(sock, HEADER.size))
            payload = _read_exactly(sock, header[1])
            tally.replies += 1
            if header[0] == 4:
                tally.add_decoded(decode_payload(payload))
        if mode == 1:
            _read_exactly(sock, 8)
        elif mode == 2:
            header = HEADER.unpack(_read_exactly(sock, HEADER.size))
            _read_exactly(sock, header[1] // 2)
    finally:
        _kill(sock)
    return tally, pipeline - full


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
    assert 0 <= missing_total <= in_flight * (MAX_REPLY // EVENT_BYTES)
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
        _kill(sock) if i % 2 else sock.close()
    for sock in idle:
        sock.close()
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    ioc.wait_numeric("DAQC01_CV_SenderReplies", lambda v: v > 10, timeout=30)
    stop_run(ioc)
    assert rx.join().all_done
    assert ioc.proc.poll() is None

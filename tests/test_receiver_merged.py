"""`dgs-receiver --layout merged`: one file in timestamp order across connections (issue 16).

Scripted data servers (real TCP, the classic protocol) make the timing exact:
which connection sends which timestamps, and a board that stays silent longer
than ``--merge-wait``. The three-crate run with real IOCs is in
test_receiver_online.py. Also: events without data files (``--layout none``, ROOT,
traces, calibration) and beside the per-board files (HDF5).
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st
from ioc_harness import wait_until
from test_receiver_files import MARKER, ReceiverThread, ScriptedServer, run_files, type_f

from receiver import geb, merge
from receiver.merge import Merger, Released


def event(board: int, slot: int, ts: int) -> bytes:
    """A 14-word header-only event of ``board`` (header type 7)."""
    w1 = slot << 27 | 13 << 16 | board << 4
    return struct.pack(">4I", MARKER, w1, ts, 13 << 26 | 7 << 16) + bytes(40)


class PausingServer(ScriptedServer):
    """A scripted server that sends nothing but empty replies until ``resume`` is set
    before its payloads after the first (a board that falls silent, then comes back)."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.resume = threading.Event()
        self.first = payloads[0]
        super().__init__([self.first])
        self.rest = payloads[1:]
        threading.Thread(target=self._later, daemon=True).start()

    def _later(self) -> None:
        if self.resume.wait(60):
            self.payloads.extend(self.rest)


def merged_records(tmp_path: Path, name: str) -> list[np.ndarray]:
    """The records of each chunk of the run's one stream (``<run>.gtd_<chunk>``)."""
    files = run_files(tmp_path / name, name)
    assert list(files) == [""], files
    return [geb.read_records(path.read_bytes()) for path in files[""]]


def summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / f"{name}.summary.json").read_text())


def receive(tmp_path: Path, name: str, servers: list[ScriptedServer], *options: str):
    return ReceiverThread([
        "--protocol", "classic", "--out", str(tmp_path), "--run-name", name,
        "--layout", "merged", "--pipeline", "1", "--status", "plain", *options,
        *(f"127.0.0.1:{server.port}" for server in servers),
    ])  # fmt: skip


def test_two_connections_are_written_as_one_stream_in_timestamp_order(tmp_path):
    crate_a = ScriptedServer([
        event(101, 3, 10) + event(101, 3, 30), event(101, 3, 50), type_f(3, 101, 0xD, 60),
    ])  # fmt: skip
    crate_b = ScriptedServer([
        event(201, 3, 5) + event(201, 3, 20), event(201, 3, 40) + event(201, 3, 55),
        type_f(3, 201, 0xD, 61),
    ])  # fmt: skip
    try:
        receiver = receive(tmp_path, "m", [crate_a, crate_b])
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        crate_a.close()
        crate_b.close()
    (records,) = merged_records(tmp_path, "m")
    assert records["timestamp"].tolist() == [5, 10, 20, 30, 40, 50, 55, 60, 61]
    text = receiver.out.getvalue()
    assert "online: 9 records in timestamp order, 0 late" in text, text
    assert summary(tmp_path, "m")["online"]["late"] == 0


def test_a_silent_board_holds_records_back_only_for_the_merge_wait_and_late_data_are_counted(
    tmp_path,
):
    steady = ScriptedServer([event(101, 3, 10), event(101, 3, 20) + event(101, 3, 30)])
    silent = PausingServer([event(201, 3, 5), event(201, 3, 15) + event(201, 3, 35),
                            type_f(3, 201, 0xD, 36)])
    run_dir = tmp_path / "late"
    try:
        receiver = receive(tmp_path, "late", [steady, silent], "--merge-wait", "0.3")
        # board 201 is silent: after 0.3 s the records held for it are written anyway
        part = run_dir / ".late.gtd_000.part"

        def written() -> list[int]:
            try:
                return geb.read_records(part.read_bytes())["timestamp"].tolist()
            except (OSError, ValueError):  # not there yet, or caught mid-write
                return []

        wait_until(lambda: written() == [5, 10, 20, 30], 20, "held records released")
        silent.resume.set()
        wait_until(lambda: 15 in written(), 20, "the late record written")
        steady.payloads.append(type_f(3, 101, 0xD, 40))
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        steady.close()
        silent.close()
    (records,) = merged_records(tmp_path, "late")
    # 15 arrived after 30 was written: written after it, and counted
    assert records["timestamp"].tolist() == [5, 10, 20, 30, 15, 35, 36, 40]
    assert summary(tmp_path, "late")["online"]["late"] == 1
    assert "1 late (--merge-wait 0.3 s" in receiver.out.getvalue()


def reply(payload: bytes) -> geb.Batch:
    """One reply's records, as a puller hands them to the merger."""
    words = np.frombuffer(payload, dtype=">u4")
    return geb.make_batch(words, geb.decode_reply(words).events, grouping=geb.GROUP_NONE)


BOARDS = (101, 102, 103)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_merged_order_is_the_stable_timestamp_order_of_arrival(data):
    """Whatever the boards send, in whatever interleaving and reply sizes (some replies
    holding two boards), the merger writes every record once, in timestamp order, ties
    in arrival order; a word buffer a few records long, and records of two lengths, make it
    compact and grow its buffer."""
    chunks = {
        board: data.draw(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=6),
                                  max_size=5))
        for board in BOARDS
    }
    for board, parts in chunks.items():  # one board's records come in time order
        flat = sorted(ts for part in parts for ts in part)
        cuts = np.cumsum([len(part) for part in parts])[:-1]
        chunks[board] = [list(part) for part in np.split(np.array(flat, dtype=int), cuts)]
    senders = data.draw(st.permutations([b for b in BOARDS for _ in chunks[b]]))
    by_board = {board: iter(chunks[board]) for board in BOARDS}
    replies = [(board, next(by_board[board])) for board in senders]
    written: list[Released] = []
    arrival: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge, "_INITIAL_WORDS", 64)
        merger = Merger(1, wait_s=1e9, output=written.append, expected=set(BOARDS))
        pending = b""
        pending_records: list[tuple[int, int]] = []
        for index, (board, stamps) in enumerate(replies):
            pending += b"".join((traced_event if ts % 3 else event)(board, 3, ts)
                                for ts in stamps)
            pending_records += [(int(ts), board) for ts in stamps]
            if index % 3 == 1 and index + 1 < len(replies):
                continue  # this reply goes out with the next one: two boards in one reply
            merger.add(0, reply(pending), [], now=0.0)
            arrival += pending_records
            pending, pending_records = b"", []
        merger.add(0, reply(b""), list(BOARDS), now=0.0)
        merger.close()
    got = [(int(ts), _board_of(block, i))
           for block in written for i, ts in enumerate(block.timestamp)]
    assert got == sorted(arrival, key=lambda record: record[0])
    assert merger.counters.late == 0 and merger.held == 0


def _board_of(block: Released, index: int) -> int:
    """The board id of record ``index`` of a released block (packet word 1, the first
    after the GEB header, bits 4..15)."""
    start = int(block.bounds[index]) + geb.GEB_HEADER_BYTES
    return int.from_bytes(block.data[start : start + 4].tobytes(), "big") >> 4 & 0xFFF


def test_an_almost_full_header_ahead_of_its_older_events_makes_nothing_late():
    """The IOC sends a board's almost-full header (its timestamp latched when it
    decided to send it) before the older events then in its FIFO: the other
    board's records must not be written past those events meanwhile."""
    written: list[Released] = []
    merger = Merger(2, wait_s=30.0, output=written.append, expected={101, 201})
    merger.add(0, reply(event(101, 3, 10) + type_f(3, 101, 0xF, 100)), [], now=0.0)
    merger.add(1, reply(event(201, 3, 5)), [], now=0.1)
    merger.add(1, reply(event(201, 3, 70) + event(201, 3, 80)), [], now=0.2)
    merger.add(0, reply(event(101, 3, 50) + event(101, 3, 60)), [], now=0.3)
    merger.add(0, reply(type_f(3, 101, 0xD, 110)), [101], now=0.4)
    merger.add(1, reply(type_f(3, 201, 0xD, 120)), [201], now=0.5)
    merger.close()
    stamps = [int(ts) for block in written for ts in block.timestamp]
    assert stamps == [5, 10, 50, 60, 70, 80, 100, 110, 120]
    assert merger.counters.late == 0


def traced_event(board: int, slot: int, ts: int, channel: int = 0) -> bytes:
    """An LED event of ``board`` with an 8-sample trace (N = 17 words after the marker)."""
    w1 = slot << 27 | 17 << 16 | board << 4 | channel
    trace = struct.pack(">4I", *(0x0010_0020 + i for i in range(4)))
    return struct.pack(">4I", MARKER, w1, ts, 17 << 26 | 7 << 16) + bytes(40) + trace


def test_events_without_data_files_in_root_with_traces_and_calibration(tmp_path):
    calibration = tmp_path / "cal.csv"
    calibration.write_text("board,channel,gain,offset\n*,*,0.25,0\n")
    crate_a = ScriptedServer([traced_event(101, 3, 10) + traced_event(101, 3, 500, 1),
                              type_f(3, 101, 0xD, 600)])
    crate_b = ScriptedServer([traced_event(201, 3, 50) + traced_event(201, 3, 1000),
                              type_f(3, 201, 0xD, 1001)])
    out = tmp_path / "ev.root"
    try:
        receiver = receive(tmp_path, "ev", [crate_a, crate_b], "--layout", "none", "--events",
                           str(out), "--window", "100", "--traces", "--calibration",
                           str(calibration))
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        crate_a.close()
        crate_b.close()
    assert run_files(tmp_path / "ev", "ev") == {}  # no GEB files
    tree = uproot.open(out)["events"]
    assert tree["mult"].array().tolist() == [2, 1, 1]  # 10+50 within 100 ticks; 500; 1000
    assert tree["board"].array().tolist() == [[101, 201], [101], [201]]
    assert tree["timestamp"].array().tolist() == [[10, 50], [500], [1000]]
    assert tree["trace_samples"].array().tolist() == [8, 8, 8]
    assert [len(trace) for trace in tree["trace"].array().tolist()] == [16, 8, 8]
    assert len(tree["ekev"].array()) == 3
    assert "3 events in 1 file(s)" in receiver.out.getvalue()


def test_events_beside_the_per_board_files(tmp_path):
    crate_a = ScriptedServer([event(101, 3, 10) + event(101, 3, 500), type_f(3, 101, 0xD, 600)])
    crate_b = ScriptedServer([event(201, 3, 50), type_f(3, 201, 0xD, 601)])
    out = tmp_path / "ev.h5"
    try:
        receiver = receive(tmp_path, "both", [crate_a, crate_b], "--layout", "classic",
                           "--events", str(out))
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        crate_a.close()
        crate_b.close()
    assert sorted(run_files(tmp_path / "both", "both")) == ["0101_0", "0101_D", "0201_0", "0201_D"]
    with h5py.File(out) as h5:
        assert h5["events"]["mult"].tolist() == [2, 1]
        assert h5["hits"]["timestamp"].tolist() == [10, 50, 500]


def test_layout_none_without_events_is_refused_before_anything_is_created(tmp_path):
    receiver = ReceiverThread(["--out", str(tmp_path), "--run-name", "x", "--layout", "none",
                               "127.0.0.1:9"])
    assert receiver.join(10) == 2
    assert "give --events" in receiver.out.getvalue()
    assert not (tmp_path / "x").exists()

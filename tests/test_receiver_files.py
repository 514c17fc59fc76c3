"""`dgs-receiver` end to end: run files from a real crate IOC, byte for byte (spec 04, 05).

The reference for every file is built here, packet by packet in plain Python,
from the replies exactly as the receiver got them (``--save-raw`` keeps them):
spec 04's record layout and file names, written out literally. The simulator's
own counters (``SIM_Generated``) say how many events each board made.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from ioc_harness import wait_until

from receiver import cli, geb
from receiver.files import (
    Layout,
    Rotation,
    RunDirectory,
    RunExistsError,
    StreamKey,
    read_unknown,
)

DEMO_BOARDS = {"MDIG1": 101, "MDIG2": 102, "MDIG3": 103, "MDIG4": 104}
MARKER = 0xAAAAAAAA
TRIGGER_MARKER = 0x0000AAAA


# ------------------------------------------------------------------ helpers


class ReceiverThread:
    """`dgs-receiver` run in-process (``cli.main``) in a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.out = io.StringIO()
        self.stop = threading.Event()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._main, args=(argv,), daemon=True)
        self.thread.start()

    def _main(self, argv: list[str]) -> None:
        self.code = cli.main(argv, stop=self.stop, out=self.out, err=self.out)

    def join(self, timeout: float = 60.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"receiver did not finish:\n{self.out.getvalue()}"
        assert self.code is not None
        return self.code


def start_run(ioc) -> None:
    ioc.put_ok("Online_CS_SaveData", "Save")
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")


def stop_run(ioc) -> None:
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)


def saved_replies(path: Path) -> list[bytes]:
    """Payloads of the data replies kept by ``--save-raw`` (16-byte header + payload each)."""
    data = path.read_bytes()
    payloads, position = [], 0
    while position < len(data):
        kind, length, status, recs = struct.unpack_from(">iiii", data, position)
        assert (kind, status, recs) == (4, 0, 1) and length > 0
        payloads.append(data[position + 16 : position + 16 + length])
        position += 16 + length
    return payloads


def reference_records(payloads: list[bytes], trigger_board: int = -1) -> dict[str, list[bytes]]:
    """Spec 04 literally: every packet's GEB record, per classic file family, arrival order.

    The family is the file name after ``<run>.<ext>_<chunk>_``.
    """
    families: dict[str, list[bytes]] = defaultdict(list)
    for payload in payloads:
        w = struct.unpack(f">{len(payload) // 4}I", payload)
        position = 0
        while position < len(w):
            if w[position] == TRIGGER_MARKER:
                p = w[position : position + 16]
                ts = p[2] << 32 | p[3] << 16 | p[4]
                words = [
                    0xAAAAAAAA, (10 << 16) | (trigger_board << 4), ts & 0xFFFFFFFF,
                    (3 << 26) | (0xE << 16) | (ts >> 32),
                    (p[1] << 16) | p[5], (p[6] << 16) | p[7], (p[8] << 16) | p[9],
                    (p[10] << 16) | p[11], (p[12] << 16) | p[13], (p[14] << 16) | p[15],
                ]  # fmt: skip
                record = struct.pack("<iiQ", 15, 40, ts) + struct.pack("<10I", *words)
                families[f"trig_{trigger_board:04d}_0"].append(record)
                position += 16
                continue
            assert w[position] == MARKER, f"no packet at word {position}"
            n = (w[position + 1] >> 16) & 0x7FF
            board, channel = (w[position + 1] >> 4) & 0xFFF, w[position + 1] & 0xF
            ts = (w[position + 3] & 0xFFFF) << 32 | w[position + 2]
            body = payload[4 * (position + 1) : 4 * (position + 1 + n)]
            if board == trigger_board:
                record = struct.pack("<iiQ", 15, 4 * n, ts) + body
                families[f"trig_{board:04d}_0"].append(record)
            else:
                record = struct.pack("<iiQ", 14, 4 * n, ts) + body
                families[f"{board:04d}_{channel:X}"].append(record)
            position += n + 1
    return families


def run_files(run_dir: Path, run_name: str, ext: str = "gtd") -> dict[str, list[Path]]:
    """The run's data files per family, in chunk order."""
    prefix = f"{run_name}.{ext}_"
    families: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in run_dir.iterdir():
        if path.name.startswith(prefix):
            chunk, _, family = path.name[len(prefix) :].partition("_")
            families[family].append((int(chunk), path))
    return {f: [p for _, p in sorted(chunks)] for f, chunks in families.items()}


def assert_closed_and_read_only(run_dir: Path) -> None:
    names = os.listdir(run_dir)
    assert not [n for n in names if n.endswith(".part")], names
    for name in names:
        assert stat.S_IMODE((run_dir / name).stat().st_mode) & 0o222 == 0, name


def digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir()}


def generated(ioc, boards: dict[str, int]) -> dict[int, int]:
    return {bid: int(ioc.getf(f"VME01:{name}:SIM_Generated")) for name, bid in boards.items()}


# ------------------------------------------------------------- a demo run


def test_demo_run_files_are_byte_exact_and_a_second_run_is_refused(demo_ioc, tmp_path):
    ioc = demo_ioc
    argv = [
        "--out", str(tmp_path), "--run", "42", "--save-raw", "--status", "plain",
        "--pv-pva", f"127.0.0.1:{ioc.ports.pva}", "--crate", "01",
        f"127.0.0.1:{ioc.ports.data}",
    ]  # fmt: skip
    ioc.put_ok("Online_CS_RunNumber", 42)  # v2 receivers take only the run they are for
    receiver = ReceiverThread(argv)
    start_run(ioc)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 40, timeout=30)
    stopped_at = time.time()
    stop_run(ioc)
    assert receiver.join() == 0, receiver.out.getvalue()
    joined_at = time.time()
    run_dir = tmp_path / "run00042"
    assert_closed_and_read_only(run_dir)

    expected = reference_records(saved_replies(run_dir / "run00042.replies_0"))
    files = run_files(run_dir, "run00042")
    assert set(files) == set(expected)
    for family, paths in files.items():
        assert [p.name[len("run00042.gtd_") :][:3] for p in paths] == ["000"], family
        assert paths[0].read_bytes() == b"".join(expected[family]), family

    counts = generated(ioc, DEMO_BOARDS)
    for board, count in counts.items():
        records = 0
        for channel in range(10):
            data = files[f"{board:04d}_{channel:X}"][0].read_bytes()
            found = geb.read_records(data)
            assert (found["type"] == 14).all()
            stamps = found["timestamp"].astype("int64")
            assert (stamps[1:] > stamps[:-1]).all(), f"board {board} ch {channel} order"
            records += found.size
        assert records == count > 0, f"board {board}"
        assert geb.read_records(files[f"{board:04d}_D"][0].read_bytes()).size == 1

    begin = json.loads((run_dir / "run00042.pvs_begin.json").read_text())
    end = json.loads((run_dir / "run00042.pvs_end.json").read_text())
    assert begin["crates"][0]["pvs"]["VME01:MDIG3:user_package_data"] == 103
    assert begin["crates"][0]["pvs"]["VME01:MDIG1:CS_Ena"] == "Enable"
    # The calibration is part of the conditions (the simulator's scale), the spectra not.
    assert begin["crates"][0]["pvs"]["VME01:MDIG4:CalGain9"] == 0.25
    assert begin["crates"][0]["pvs"]["VME01:MDIG2:CalOffset0"] == 0.0
    assert not {"VME01:MDIG1:Spectrum0", "VME01:MDIG1:Rate0"} & set(end["crates"][0]["pvs"])
    assert end["crates"][0]["pvs"]["VME01:MDIG2:SIM_Generated"] == counts[102]
    summary = json.loads((run_dir / "run00042.summary.json").read_text())
    rows = summary["iocs"][0]["channels"]
    assert sum(r["events"] for r in rows if r["board"] == 104 and r["channel"] not in "DEF") == (
        counts[104]
    )
    assert stopped_at < summary["iocs"][0]["completed_at"] < joined_at
    assert "104" in receiver.out.getvalue() and "snapshot" in receiver.out.getvalue()

    before = digests(run_dir)
    again = ReceiverThread(argv)
    assert again.join(30) == 2
    assert "run00042" in again.out.getvalue() and "exists" in again.out.getvalue()
    assert digests(run_dir) == before


# ---------------------------------------------------- rotation and Ctrl-C


def test_rotation_and_ctrl_c_leave_complete_read_only_chunks(demo_ioc, tmp_path):
    ioc = demo_ioc
    limit = 60_000
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "receiver.cli", "--out", str(tmp_path), "--run-name", "rot",
            "--ext", "dat", "--chunk-bytes", str(limit), "--save-raw", "--status", "plain",
            "--status-interval", "0.2", "--pv-ca", f"127.0.0.1:{ioc.ports.ca}", "--crate", "01",
            f"127.0.0.1:{ioc.ports.data}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        start_run(ioc)
        run_dir = tmp_path / "rot"
        wait_until(  # the receiver creates its run directory while it starts
            lambda: run_dir.is_dir() and any(".dat_003_" in name for name in os.listdir(run_dir)),
            30,
            "chunk 003",
        )
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert "MB/s" in output and "events" in output
    assert_closed_and_read_only(run_dir)
    assert json.loads((run_dir / "rot.summary.json").read_text())["iocs"][0]["completed_at"] is None

    expected = reference_records(saved_replies(run_dir / "rot.replies_0"))
    files = run_files(run_dir, "rot", "dat")
    assert set(files) == set(expected)
    for family, paths in files.items():
        sizes = [len(record) for record in expected[family]]
        chunk_sizes: list[int] = [0]
        for size in sizes:  # a new chunk when the next record would exceed the limit
            if chunk_sizes[-1] + size > limit:
                chunk_sizes.append(0)
            chunk_sizes[-1] += size
        assert [p.stat().st_size for p in paths] == chunk_sizes, family
        assert [p.name.split("_")[1] for p in paths] == [f"{i:03d}" for i in range(len(paths))]
        assert b"".join(p.read_bytes() for p in paths) == b"".join(expected[family])
    assert max(len(v) for v in files.values()) >= 4
    for when in ("begin", "end"):  # over Channel Access: the crate-wide records
        pvs = json.loads((run_dir / f"rot.pvs_{when}.json").read_text())["crates"][0]["pvs"]
        assert pvs["DAQC01_BoardType2"] == "AMD" and pvs["DAQC01_CV_CRATENUM"] == 1


# ----------------------------------------------------------------- trigger

TRIGGER_CRATE = """
[system]
globals = "local"

[[crate]]
crate = "01"
data_bind = "127.0.0.1"

[[crate.board]]
name = "MTRG"
kind = "trigger_master"
card = 0
slot = 2
package_data = 99
enabled = true
[crate.board.sim]
event_rate_hz = 3000

[[crate.board]]
name = "MDIG1"
kind = "digitizer_master"
card = 1
slot = 3
package_data = 101
enabled = true
[crate.board.sim]
event_rate_hz = 100
trace_samples = 8
"""


def test_trigger_packets_are_repacked_bit_for_bit_with_the_real_package_data(
    start_ioc, tmp_path
):
    config = tmp_path / "trigger.toml"
    config.write_text(TRIGGER_CRATE)
    ioc = start_ioc("--config", str(config))
    ioc.put_ok("Online_CS_RunNumber", 7)
    receiver = ReceiverThread([
        "--out", str(tmp_path), "--run", "7", "--save-raw", "--status", "plain",
        "--pv-pva", f"127.0.0.1:{ioc.ports.pva}", "--crate", "01",
        f"127.0.0.1:{ioc.ports.data}",
    ])  # fmt: skip
    start_run(ioc)
    ioc.wait_numeric("VME01:MTRG:SIM_Generated", lambda v: v > 2000, timeout=30)
    stop_run(ioc)
    assert receiver.join() == 0, receiver.out.getvalue()
    run_dir = tmp_path / "run00007"
    assert_closed_and_read_only(run_dir)

    expected = reference_records(saved_replies(run_dir / "run00007.replies_0"), trigger_board=99)
    files = run_files(run_dir, "run00007")
    assert set(files) == set(expected)
    for family, paths in files.items():
        assert b"".join(p.read_bytes() for p in paths) == b"".join(expected[family]), family
    trig = geb.read_records(files["trig_0099_0"][0].read_bytes())
    assert (trig["type"] == 15).all()
    assert int((trig["length"] == 40).sum()) == generated(ioc, {"MTRG": 99})[99]
    assert int((trig["length"] == 12).sum()) >= 1  # the trigger's own type-F, 0xD included
    assert "0101_D" in files and "0099_D" not in files


# ------------------------------------------- a scripted server on loopback


class ScriptedServer:
    """A real TCP data server answering each 4-byte request with the next scripted reply."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = list(payloads)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            pending = b""
            for _ in range(100_000):
                data = conn.recv(4096)
                if not data:
                    return
                pending += data
                while len(pending) >= 4:
                    pending = pending[4:]
                    if self.payloads:
                        payload = self.payloads.pop(0)
                        conn.sendall(struct.pack(">iiii", 4, len(payload), 0, 1) + payload)
                    else:
                        conn.sendall(struct.pack(">iiii", 5, 0, 0, 0))

    def close(self) -> None:
        self.listener.close()


def header_only_event(channel: int, ts: int) -> bytes:
    """A 14-word event of board 101 in slot 3 (N = 13, header type 7)."""
    w1 = 3 << 27 | 13 << 16 | 101 << 4 | channel
    return struct.pack(">4I", MARKER, w1, ts, 13 << 26 | 7 << 16) + bytes(40)


def type_f(slot: int, board: int, channel: int, ts: int) -> bytes:
    return struct.pack(">4I", MARKER, slot << 27 | 3 << 16 | board << 4 | channel, ts, 0x0C0F0000)


def test_unknown_data_a_second_end_of_run_and_a_given_trigger_board(tmp_path):
    garbage = bytes.fromhex("DEADBEEF 01020304")
    trigger = struct.pack(">16I", TRIGGER_MARKER, 4, 0, 1, 2, *range(5, 16))
    server = ScriptedServer([
        header_only_event(1, 10) + garbage + header_only_event(2, 11),
        trigger * 3,
        type_f(3, 101, 0xD, 21),
        type_f(3, 101, 0xD, 22),
        type_f(2, 99, 0xD, 23),
    ])  # fmt: skip
    try:
        receiver = ReceiverThread([
            "--protocol", "classic", "--out", str(tmp_path), "--run-name", "scripted",
            "--trigger-board", "99",
            "--pipeline", "1", "--status", "plain", f"127.0.0.1:{server.port}",
        ])  # fmt: skip
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        server.close()
    run_dir = tmp_path / "scripted"
    assert_closed_and_read_only(run_dir)
    spans = read_unknown((run_dir / "scripted.unknown").read_bytes())
    assert spans == [(f"127.0.0.1:{server.port}", 0, 1, 56, garbage)]
    files = run_files(run_dir, "scripted")
    assert sorted(files) == ["0101_1", "0101_2", "0101_D", "trig_0099_0"]
    trig = geb.read_records(files["trig_0099_0"][0].read_bytes())
    assert trig["type"].tolist() == [15] * 4 and trig["length"].tolist() == [40] * 3 + [12]
    summary = json.loads((run_dir / "scripted.summary.json").read_text())
    assert summary["unknown"] == {"spans": 1, "bytes": 8}
    assert summary["iocs"][0]["errors"] == 2  # the garbage span and the second 0xD
    assert any("second end-of-run" in m for m in summary["iocs"][0]["messages"])


def test_an_unreachable_ioc_exits_3_after_the_connect_timeout(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    receiver = ReceiverThread([
        "--out", str(tmp_path), "--run", "1", "--connect-timeout", "0.5", "--status", "plain",
        f"127.0.0.1:{port}",
    ])  # fmt: skip
    assert receiver.join(30) == 3
    assert "no connection within 0.5 s" in receiver.out.getvalue()
    assert sorted(os.listdir(tmp_path / "run00001")) == ["run00001.summary.json"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--run", "1", "--crate", "01", "--crate", "02", "127.0.0.1:9"], "--crate once per"),
        (["--run", "1", "--pv-ca", "127.0.0.1:5064", "127.0.0.1:9"], "needs --crate"),
        (["127.0.0.1:9"], "required"),
        (["--run", "1", "localhost"], "HOST:PORT"),
    ],
)
def test_usage_errors_exit_2_and_create_nothing(tmp_path, argv, message, capsys):
    out = io.StringIO()
    assert cli.main(["--out", str(tmp_path / "runs"), *argv], out=out, err=out) == 2
    assert message in out.getvalue() + capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------- the file layer


def records_of(sizes: list[int]) -> tuple[bytes, list[int]]:
    """Distinct byte records of the given sizes and their bounds."""
    data = b"".join(bytes([i % 251]) * size for i, size in enumerate(sizes))
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return data, bounds


def write(run: RunDirectory, key: StreamKey, sizes: list[int]) -> bytes:

    data, bounds = records_of(sizes)
    run.write(key, np.frombuffer(data, dtype=np.uint8), np.array(bounds))
    return data


def test_rotation_by_records_and_by_age(tmp_path):
    run = RunDirectory.create(tmp_path, "r1", rotation=Rotation(max_bytes=10**6, max_records=3))
    data = write(run, StreamKey(5, 1, False), [10] * 7)
    run.close()
    paths = sorted((tmp_path / "r1").iterdir())
    assert [p.name for p in paths] == [f"r1.gtd_{c:03d}_0005_1" for c in range(3)]
    assert [p.stat().st_size for p in paths] == [30, 30, 10]
    assert b"".join(p.read_bytes() for p in paths) == data

    aged = RunDirectory.create(tmp_path, "r2", rotation=Rotation(max_seconds=1e-9))
    write(aged, StreamKey(5, 1, False), [10, 10])
    write(aged, StreamKey(5, 1, False), [10])
    aged.close()
    assert len(list((tmp_path / "r2").iterdir())) == 2  # a chunk never starts empty


def test_a_record_larger_than_the_limit_is_written_alone(tmp_path):
    run = RunDirectory.create(tmp_path, "big", rotation=Rotation(max_bytes=25))
    write(run, StreamKey(7, 2, False), [10, 40, 10, 10, 10])
    run.close()
    sizes = [p.stat().st_size for p in sorted((tmp_path / "big").iterdir())]
    assert sizes == [10, 40, 20, 10]


@pytest.mark.parametrize(
    "layout, names",
    [
        (Layout.CLASSIC, ["x.ev_000_0012_A", "x.ev_000_trig_0099_0"]),
        (Layout.BOARD, ["x.ev_000_0012", "x.ev_000_trig_0099"]),
        (Layout.SINGLE, ["x.ev_000"]),
    ],
)
def test_file_names_of_each_layout(tmp_path, layout, names):
    run = RunDirectory.create(tmp_path, "x", "ev", layout)
    write(run, run.key_for(12, 10, False), [8])
    write(run, run.key_for(99, geb.TRIGGER_CHANNEL, True), [8])
    run.close()
    assert sorted(os.listdir(tmp_path / "x")) == names
    assert_closed_and_read_only(tmp_path / "x")


def test_existing_runs_are_refused_and_side_files_never_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    RunDirectory.create(tmp_path, "empty")  # an empty directory made beforehand is fine
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep")
    with pytest.raises(RunExistsError, match="used"):
        RunDirectory.create(tmp_path, "used")
    assert os.listdir(tmp_path / "used") == ["notes.txt"]
    run = RunDirectory.create(tmp_path, "side")
    run.write_json("summary", {"a": 1})
    with pytest.raises(RunExistsError, match=r"side\.summary\.json"):
        run.write_json("summary", {"a": 2})
    assert (tmp_path / "side" / "side.summary.json").read_text().strip() == '{\n "a": 1\n}'
    with pytest.raises(ValueError):
        RunDirectory.create(tmp_path, "../escape")


def test_without_any_trigger_identity_trigger_packets_are_filed_as_board_0(tmp_path):
    trigger = struct.pack(">16I", TRIGGER_MARKER, 1, 0, 0, 9, *range(5, 16))
    server = ScriptedServer([
        header_only_event(1, 5), trigger * 2, type_f(2, 99, 0xD, 20), type_f(3, 101, 0xD, 21),
    ])  # fmt: skip
    try:
        receiver = ReceiverThread([
            "--protocol", "classic", "--out", str(tmp_path), "--run-name", "anon",
            "--pipeline", "1",
            "--status", "plain", f"127.0.0.1:{server.port}",
        ])  # fmt: skip
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        server.close()
    assert "trigger board unknown" in receiver.out.getvalue()
    files = run_files(tmp_path / "anon", "anon")
    assert sorted(files) == ["0099_D", "0101_1", "0101_D", "trig_0000_0"]
    assert files["trig_0000_0"][0].read_bytes() == b"".join(reference_records([trigger * 2], 0)[
        "trig_0000_0"
    ])


def test_a_trigger_board_is_learned_from_a_type_f_header_of_its_slot():
    from ioc.decoder import decode

    identity = cli.TriggerIdentity(crate_ids=set(), slots={2})
    assert identity.board == -1
    digitizer_f = decode(np.frombuffer(type_f(3, 101, 0xE, 1), ">u4")).events
    identity.learn(digitizer_f)
    assert identity.board == -1
    trigger_f = decode(np.frombuffer(type_f(2, 77, 0xE, 1), ">u4")).events
    identity.learn(trigger_f)
    assert identity.board == 77 and identity.ids == {77}
    assert cli.TriggerIdentity(crate_ids={12}, slots=set(), given={40, 41}).board == 12
    assert cli.TriggerIdentity(crate_ids=set(), slots=set(), given={40}).board == 40
    assert cli.TriggerIdentity(crate_ids=set(), slots=set(), given={40, 41}).board == -1


def run_cli_subprocess(argv: list[str], stdout) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "receiver.cli", *argv],
        stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60,
    )
    return proc.returncode


@pytest.mark.parametrize("terminal", [True, False])
def test_status_is_a_redrawn_display_on_a_terminal_and_plain_lines_otherwise(tmp_path, terminal):

    server = ScriptedServer([header_only_event(4, 9), type_f(3, 101, 0xD, 10)])
    main_fd, child_fd = pty.openpty() if terminal else (None, None)
    log = tmp_path / "out.txt"
    try:
        with open(log, "wb") as plain:
            code = run_cli_subprocess(
                ["--protocol", "classic", "--out", str(tmp_path), "--run", "5",
                 f"127.0.0.1:{server.port}"],
                child_fd if terminal else plain,
            )
        if terminal:
            os.close(child_fd)
            chunks = []
            for _ in range(1000):
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # the terminal is closed once everything was read
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            text = b"".join(chunks).decode()
        else:
            text = log.read_text()
    finally:
        server.close()
        if main_fd is not None:
            os.close(main_fd)
    assert code == 0, text
    assert "1 events" in text and "boards 1/1 done" in text
    assert ("\x1b[K" in text) is terminal


@pytest.mark.parametrize("layout", ["board", "single"])
def test_board_and_single_layouts_keep_arrival_order(tmp_path, layout):
    def event(board: int, channel: int, ts: int) -> bytes:
        w1 = 4 << 27 | 13 << 16 | board << 4 | channel
        return struct.pack(">4I", MARKER, w1, ts, 13 << 26 | 7 << 16) + bytes(40)

    replies = [
        event(101, 2, 1) + event(101, 1, 2) + event(101, 2, 3),
        event(102, 0, 4),
        type_f(4, 101, 0xD, 5),
        type_f(5, 102, 0xD, 6),
    ]
    server = ScriptedServer(replies)
    try:
        receiver = ReceiverThread([
            "--protocol", "classic", "--out", str(tmp_path), "--run-name", layout,
            "--layout", layout, "--pipeline", "2",
            "--status", "plain", f"127.0.0.1:{server.port}",
        ])  # fmt: skip
        assert receiver.join(30) == 0, receiver.out.getvalue()
    finally:
        server.close()
    files = run_files(tmp_path / layout, layout)
    stamps = {
        family: geb.read_records(paths[0].read_bytes())["timestamp"].tolist()
        for family, paths in files.items()
    }
    if layout == "board":
        assert stamps == {"0101": [1, 2, 3, 5], "0102": [4, 6]}
    else:  # one file, single.gtd_000: no family after the chunk number
        assert [p.name for p in files[""]] == ["single.gtd_000"]
        assert stamps == {"": [1, 2, 3, 4, 5, 6]}

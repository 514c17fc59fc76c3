"""A recorded run replayed through the whole chain: real IOCs, real `dgs-receiver` processes.

A simulated crate (four digitizers and a master trigger) is recorded for two
seconds with per-board files and ``--save-raw``; then `dgs-ioc` with
``backend = "replay"`` plays those files, the saved replies, and files of the
classic layout (one per board and channel, made by a replay), each to another
receiver. That receiver's files must hold the recorded records, per board and
in order (type-F headers are each IOC's own and are left out).
At speed 1 the replay takes about as long as the recording; at "max" it is fast.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dataflow import (
    CRATE,
    DEMO_SPECS,
    TRIGGER_SPEC,
    Pva,
    crate_toml,
    ioc_process,
    start_run,
    stop_run,
)
from ioc_harness import BIN, IocProcess, wait_until

from ioc import packets
from receiver import geb

RECORD_SECONDS = 2.0
BOARDS = (*DEMO_SPECS, TRIGGER_SPEC)
TRIGGER_ID = TRIGGER_SPEC.package_data
RUN = 7


def receive(ioc: IocProcess, out: Path, *extra: str, layout: str = "board") -> subprocess.Popen:
    """`dgs-receiver` for run RUN (one file per board unless ``layout`` says otherwise)."""
    return subprocess.Popen(
        [str(BIN / "dgs-receiver"), "--out", str(out), "--run", str(RUN), "--layout", layout,
         "--trigger-board", str(TRIGGER_ID), "--status", "plain", *extra,
         f"127.0.0.1:{ioc.ports.data}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(receiver: subprocess.Popen) -> None:
    output, _ = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, output


def records_by_board(run_dir: Path) -> dict[str, list[bytes]]:
    """Every record but type-F headers, per board file family, in file order."""
    found: dict[str, list[bytes]] = {}
    for path in sorted(run_dir.glob(f"run{RUN:05d}.gtd_*")):
        family = path.name.split("_", 2)[2]
        data = path.read_bytes()
        for record in geb.read_records(data):
            start = int(record["offset"])
            payload = data[start + geb.GEB_HEADER_BYTES : start + geb.GEB_HEADER_BYTES
                           + int(record["length"])]
            status = (
                payload[:4] != b"\xaa" * 4
                and packets.header_type(int.from_bytes(payload[8:12], "big")) == 0xF
            )
            if not status:
                found.setdefault(family, []).append(data[start : start + 16 + len(payload)])
    return found


def fifo_bytes(records: dict[str, list[bytes]]) -> dict[str, int]:
    """What the replayed packets weigh in the FIFOs, per family (the marker word is back)."""
    return {
        family: sum(64 if r[16:20] == b"\xaa" * 4 else len(r) - 12 for r in rows)
        for family, rows in records.items()
    }


def replay_config(directory: Path, source: Path, speed: str) -> Path:
    text = crate_toml(BOARDS).replace("seed = 1\n", 'seed = 1\nbackend = "replay"\n', 1)
    path = directory / "replay.toml"
    path.write_text(f'{text}[crate.replay]\nsource = "{source}"\nspeed = {speed}\n')
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Iterator[Path]:
    """A two-second run of the simulated crate, per-board files and saved replies."""
    workdir = tmp_path_factory.mktemp("recording")
    config = workdir / "sim.toml"
    config.write_text(crate_toml(BOARDS))
    with ioc_process(workdir, "--config", str(config)) as ioc:
        ioc.put_ok("Online_CS_RunNumber", RUN)
        receiver = receive(ioc, workdir, "--save-raw")
        start_run(ioc)
        time.sleep(RECORD_SECONDS)  # the length of the recording itself
        stop_run(ioc)
        finish(receiver)
    yield workdir / f"run{RUN:05d}"


def replay(
    start_ioc, recording: Path, source: Path, speed: str, out: Path, layout: str = "board"
) -> tuple[Path, float]:
    """Replay ``source`` (made from ``recording``) to a new receiver writing into ``out``;
    the replayed run's directory and how long the IOC took to read every recorded packet."""
    out.mkdir()
    config = replay_config(out, source, speed)
    ioc = start_ioc("--config", str(config))
    ioc.put_ok("Online_CS_RunNumber", RUN)
    receiver = receive(ioc, out, layout=layout)
    expected = fifo_bytes(records_by_board(recording))
    cards = {f"{spec.package_data:04d}" if not spec.is_trigger else f"trig_{TRIGGER_ID:04d}":
             spec.card for spec in BOARDS}  # fmt: skip
    with Pva(ioc) as pva:

        def all_read() -> bool:
            return all(
                pva.number(f"DAQC{CRATE}_OL_Data{cards[family]}") * (1 << 20) >= nbytes - 1024
                for family, nbytes in expected.items()
            )

        began = time.monotonic()
        start_run(ioc)
        wait_until(all_read, 30, "every recorded packet read by the IOC")
        took = time.monotonic() - began
    stop_run(ioc)
    finish(receiver)
    return out / f"run{RUN:05d}", took


def recorded_span_s(run_dir: Path) -> float:
    stamps = [
        geb.read_records(path.read_bytes())["timestamp"]
        for path in run_dir.glob(f"run{RUN:05d}.gtd_*")
    ]
    every = np.concatenate(stamps).astype(np.int64)
    return (every.max() - every.min()) / 1e8


def test_replaying_run_files_at_the_recorded_pace_gives_the_same_records(
    recording, tmp_path, start_ioc
):
    replayed, took = replay(start_ioc, recording, recording, "1.0", tmp_path / "replayed")
    expected = records_by_board(recording)
    assert set(expected) == {"0101", "0102", "0103", "0104", f"trig_{TRIGGER_ID:04d}"}
    assert all(len(rows) > 100 for rows in expected.values())
    assert records_by_board(replayed) == expected
    span = recorded_span_s(recording)
    assert span > 1.5
    assert took > 0.7 * span, f"a {span:.1f} s recording replayed in {took:.2f} s at speed 1"


def test_replaying_saved_replies_as_fast_as_read_gives_the_same_records(
    recording, tmp_path, start_ioc
):
    replies = recording / f"run{RUN:05d}.replies_0"
    replayed, took = replay(start_ioc, recording, replies, '"max"', tmp_path / "replayed")
    assert records_by_board(replayed) == records_by_board(recording)
    span = recorded_span_s(recording)
    assert took < 0.5 * span, f"a {span:.1f} s recording took {took:.2f} s at speed max"


def test_per_channel_files_replay_to_the_same_records(recording, tmp_path, start_ioc):
    """Replayed into the classic layout (a file per board and channel), then replayed again."""
    classic, _ = replay(start_ioc, recording, recording, '"max"', tmp_path / "classic",
                        layout="classic")
    channels = {path.name[-1] for path in classic.glob(f"run{RUN:05d}.gtd_000_0101_*")}
    assert channels >= set("0123456789D")
    replayed, _ = replay(start_ioc, recording, classic, '"max"', tmp_path / "again")
    assert records_by_board(replayed) == records_by_board(recording)


def test_a_recording_that_cannot_be_read_stops_start_up_with_one_line(tmp_path, start_ioc):
    missing = tmp_path / "run00099"
    config = replay_config(tmp_path, missing, "1.0")
    ioc = start_ioc("--config", str(config), wait_ready=False)
    assert ioc.proc.wait(60) == 2
    assert ioc.log().strip().splitlines() == [
        f"dgs-ioc: crate {CRATE}: backend 'replay' cannot be built: "
        f"{missing}: no such file or directory"
    ]

"""Atomic reply writes (`receiver.files`) and taking over a killed receiver's directory
(`receiver.journal`), on real files."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from receiver.files import Layout, Rotation, RunDirectory, StreamKey
from receiver.journal import Journal, RecoveryError, describe, journal_path, recover

RECORD = 100  # bytes per test record


def records(count: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct records of RECORD bytes and their bounds."""
    data = np.zeros(count * RECORD, dtype=np.uint8)
    for i in range(count):
        data[i * RECORD : (i + 1) * RECORD] = (first + i) % 251
    return data, np.arange(count + 1, dtype=np.int64) * RECORD


def state(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_a_write_taken_back_leaves_the_stream_as_it_was_even_across_rotations(tmp_path):
    run = RunDirectory.create(tmp_path, "r1", layout=Layout.BOARD,
                              rotation=Rotation(max_bytes=5 * RECORD))
    stream = run.stream(StreamKey(101, -1, False))
    stream.write(*records(3))
    before = state(run.path)
    mark = stream.write(*records(9, first=3))  # fills chunk 0, rotates twice
    assert len(stream.retired) == 2 and stream.current is not None
    stream.undo(mark)
    assert state(run.path) == before
    stream.write(*records(4, first=50))
    stream.settle()
    run.close()
    chunks = sorted(p for p in run.path.iterdir())
    assert [p.stat().st_size for p in chunks] == [5 * RECORD, 2 * RECORD]
    assert chunks[0].read_bytes()[3 * RECORD : 4 * RECORD] == bytes([50]) * RECORD


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_takes_the_failed_write_back_to_its_last_whole_record(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        run = RunDirectory.create(small, "r2", layout=Layout.SINGLE)
        stream = run.stream(StreamKey(-1, -1, False))
        stream.write(*records(100))  # 10 000 bytes
        with pytest.raises(OSError) as raised:
            stream.write(*records(2000, first=7))  # 200 000 bytes: does not fit
        assert raised.value.errno == 28 and raised.value.filename.endswith("r2.gtd_000")
        run.close()
        (only,) = run.path.iterdir()
        assert only.read_bytes() == records(100)[0].tobytes()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def killed_receiver_dir(tmp_path: Path) -> tuple[Path, str]:
    """A run directory as a receiver killed mid-reply leaves it: journal, .part files with
    bytes beyond its last journal line, a file only the killed reply had begun."""
    run_dir = tmp_path / "run00005"
    run_dir.mkdir()
    journal = Journal(journal_path(run_dir, "run00005", 0),
                      {"run": "run00005", "files": "run00005.gtd_"})
    names = ["run00005.gtd_000_0101_0", "run00005.gtd_000_0101_1", "run00005.gtd_000_0102_0"]
    (run_dir / f".{names[0]}.part").write_bytes(b"a" * 300)
    (run_dir / f".{names[1]}.part").write_bytes(b"b" * 100)
    journal.record(1000, {names[0]: 200, names[1]: 100})
    journal.record(2000, {names[0]: 300})
    journal.record(3000, {names[2]: 50})  # written, journaled, never acknowledged
    (run_dir / f".{names[2]}.part").write_bytes(b"c" * 50)
    (run_dir / ".run00005.gtd_000_0103_0.part").write_bytes(b"d" * 10)  # killed mid-write
    (run_dir / f".{names[1]}.part").write_bytes(b"b" * 170)  # likewise: beyond its last line
    description = describe(journal.path)
    os.close(journal._fd)  # the receiver dies: its lock goes with it
    return run_dir, description


def test_recovery_cuts_a_killed_receivers_files_back_to_what_the_ioc_saw_acknowledged(tmp_path):
    run_dir, description = killed_receiver_dir(tmp_path)
    done = recover(description, acked=2000)
    assert state(run_dir).keys() >= {"run00005.gtd_000_0101_0", "run00005.gtd_000_0101_1"}
    assert (run_dir / "run00005.gtd_000_0101_0").read_bytes() == b"a" * 300
    assert (run_dir / "run00005.gtd_000_0101_1").read_bytes() == b"b" * 100
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".part")]
    assert not (run_dir / "run00005.gtd_000_0102_0").exists(), "unacknowledged file kept"
    for name in ("run00005.gtd_000_0101_0", "run00005.gtd_000_0101_1"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) & 0o222 == 0, name
    assert done.trimmed == {"run00005.gtd_000_0101_1": 70}
    assert sorted(done.removed) == ["run00005.gtd_000_0102_0", "run00005.gtd_000_0103_0"]
    assert "cut back to byte 2000" in done.summary()


def test_recovery_to_an_earlier_acknowledgement_cuts_further(tmp_path):
    run_dir, description = killed_receiver_dir(tmp_path)
    recover(description, acked=1000)
    assert (run_dir / "run00005.gtd_000_0101_0").read_bytes() == b"a" * 200


def test_a_directory_still_in_use_or_of_another_host_is_not_touched(tmp_path):
    run_dir = tmp_path / "run00006"
    run_dir.mkdir()
    journal = Journal(journal_path(run_dir, "run00006", 0), {"files": "run00006.gtd_"})
    (run_dir / ".run00006.gtd_000_0101_0.part").write_bytes(b"x" * 10)
    journal.record(100, {"run00006.gtd_000_0101_0": 10})
    before = state(run_dir)
    with pytest.raises(RecoveryError, match="still in use"):
        recover(describe(journal.path), acked=0)
    other = json.dumps({"host": socket.gethostname() + "-elsewhere",
                        "journal": str(journal.path)})
    with pytest.raises(RecoveryError, match="not on this host"):
        recover(other, acked=0)
    assert state(run_dir) == before
    journal.close(100)


def test_a_receiver_that_ended_by_itself_needs_no_recovery(tmp_path):
    run_dir = tmp_path / "run00007"
    run_dir.mkdir()
    journal = Journal(journal_path(run_dir, "run00007", 0), {"files": "run00007.gtd_"})
    (run_dir / "run00007.gtd_000_0101_0").write_bytes(b"y" * 40)
    journal.record(500, {"run00007.gtd_000_0101_0": 40})
    journal.close(500)
    done = recover(describe(journal.path), acked=500)
    assert not (done.trimmed or done.removed or done.closed)
    assert (run_dir / "run00007.gtd_000_0101_0").read_bytes() == b"y" * 40


def test_the_journal_is_locked_while_its_receiver_lives(tmp_path):
    """A second process cannot take the lock of a live journal (flock is per open file)."""
    run_dir = tmp_path / "run00008"
    run_dir.mkdir()
    journal = Journal(journal_path(run_dir, "run00008", 0), {})
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(journal.path)!r}, os.O_RDONLY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    journal.close(0)
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0

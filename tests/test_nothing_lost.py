"""Nothing lost in ordinary operation, end to end with real processes.

- a late classic receiver (15 s after Start at the demo rate, 4 s after Start at
  2000 events/s per channel) still gets every generated event: the crate keeps
  the data in memory instead of discarding them after 100 buffers;
- `dgs-receiver` (protocol v2) killed twice during a run and started again into
  new directories: together the directories hold every event once;
- `dgs-receiver` on a 3 MiB file system exits 4 with one line, leaves no partial
  record, and a second receiver of the run on a roomy disk gets the rest;
- a receiver started for the next run while the crate still holds the previous
  one's data writes only its own run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dataflow import (
    BOARDS,
    CRATE,
    Background,
    Pva,
    assert_pool_whole,
    begin_over_pva,
    data_keys,
    end_over_pva,
    generated,
    ioc_process,
    receiver,
    sim_figures,
)
from ioc_harness import IocProcess, wait_until

from receiver import geb

#: Digitizer records carry GEB type 14; a classic file is <run>.gtd_<chunk>_<board>_<channel>.
GEB_DIGITIZER = 14


@pytest.fixture
def crate(tmp_path) -> Iterator[IocProcess]:
    with ioc_process(tmp_path, "--demo") as ioc:
        yield ioc


def set_rate(pva: Pva, rate_hz: float) -> None:
    for name in BOARDS:
        pva.put(f"VME{CRATE}:{name}:SIM_EventRate", rate_hz)


def assert_no_overflow(pva: Pva) -> None:
    for name in BOARDS:
        figures = sim_figures(pva, name)
        assert (figures.dropped, figures.cleared) == (0, 0), f"{name}: FIFO overflow"


# ------------------------------------------------------------ late receivers


@pytest.mark.parametrize(("rate_hz", "late_s"), [(500, 15.0), (2000, 4.0)])
def test_a_late_classic_receiver_gets_every_event(crate, rate_hz, late_s):
    with Pva(crate) as pva:
        set_rate(pva, rate_hz)
        begin_over_pva(pva)
        time.sleep(late_s)  # the point of the test: nobody takes data meanwhile
        rx = Background(receiver(crate, pipeline=6), max_seconds=90)
        wait_until(lambda: pva.number(f"DAQC{CRATE}_CV_Retained") < 5, 60,
                   "the receiver to catch up")
        end_over_pva(pva)
        tally = rx.join(90)
        assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == 0
        assert sum(pva.get(f"DAQC{CRATE}_OL_LostMemory")) == 0
        assert_no_overflow(pva)
    expected = generated(crate)
    received = {bid: data_keys(tally.boards[bid].events).size for bid in expected}
    assert received == expected
    assert tally.all_done
    assert_pool_whole(crate)


# ------------------------------------------------------- dgs-receiver helpers


def start_receiver(ioc: IocProcess, out: Path, run: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "--run", str(run), "--out", str(out),
         "--status", "plain", "--status-interval", "1", "--connect-timeout", "30",
         "--crate", CRATE, *extra, f"127.0.0.1:{ioc.ports.data}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def written_keys(run_dir: Path, run_name: str) -> dict[int, np.ndarray]:
    """(channel, timestamp) keys of every digitizer record in a run directory, per board."""
    keys: dict[int, list[np.ndarray]] = {}
    prefix = f"{run_name}.gtd_"
    for path in sorted(run_dir.iterdir()):
        if not path.name.startswith(prefix):
            continue
        _chunk, board, channel = path.name[len(prefix):].split("_")
        if channel in "DEF":
            continue
        records = geb.read_records(path.read_bytes())
        assert np.all(records["type"] == GEB_DIGITIZER), path.name
        key = records["timestamp"].astype(np.uint64) * np.uint64(16) + np.uint64(int(channel, 16))
        keys.setdefault(int(board), []).append(key)
    return {board: np.concatenate(parts) for board, parts in keys.items()}


def directory_keys(run_dir: Path, run_name: str) -> dict[int, np.ndarray]:
    assert not list(run_dir.glob(".*.part")), f"half-written files left in {run_dir}"
    return written_keys(run_dir, run_name)


def assert_union_is_every_event_once(per_directory: list[dict[int, np.ndarray]], ioc) -> None:
    expected = generated(ioc)
    union: dict[int, list[np.ndarray]] = {}
    for keys_by_board in per_directory:
        for board, keys in keys_by_board.items():
            union.setdefault(board, []).append(keys)
    for board, count in expected.items():
        keys = np.concatenate(union.get(board, [np.empty(0, np.uint64)]))
        assert np.unique(keys).size == keys.size, f"board {board}: events written twice"
        assert keys.size == count, f"board {board}: {keys.size} events of {count}"


# ------------------------------------------------------------ killed receivers


def test_receivers_killed_twice_and_restarted_elsewhere_hold_every_event_once(crate, tmp_path):
    with Pva(crate) as pva:
        set_rate(pva, 1000)
        begin_over_pva(pva, run_number=21)
        dirs = []
        for attempt in range(2):
            out = tmp_path / f"rx{attempt}"
            proc = start_receiver(crate, out, 21)
            dirs.append(out / "run00021")
            wait_until(lambda out=out: list(out.glob("run00021/*.gtd_*")), 30, "files written")
            time.sleep(1.0 + 0.37 * attempt)  # mid-run, while replies stream in
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        out = tmp_path / "rx2"
        last = start_receiver(crate, out, 21)
        dirs.append(out / "run00021")
        time.sleep(1.0)
        end_over_pva(pva)
        code, stdout, stderr = finish(last)
        assert code == 0, stdout + stderr
        assert "recovered" in stdout, "the killed receiver's files were not reconciled"
        assert_no_overflow(pva)
        assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == 0
    assert_union_is_every_event_once([directory_keys(d, "run00021") for d in dirs], crate)


# ---------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_exits_4_with_whole_records_and_a_second_receiver_gets_the_rest(
    crate, tmp_path
):
    with small_filesystem(tmp_path / "small", "3m") as small, Pva(crate) as pva:
        begin_over_pva(pva, run_number=31)
        first = start_receiver(crate, small, 31)
        code, stdout, stderr = finish(first)
        assert code == 4, stdout + stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], stderr
        assert str(small) in lines[0], "the line does not name the path"
        run_dir = small / "run00031"
        written = directory_keys(run_dir, "run00031")  # raises on a partial record
        assert sum(k.size for k in written.values()) > 0, "the small disk took nothing"
        summary = json.loads((run_dir / "run00031.summary.json").read_text())
        assert summary["exit_code"] == 4, "the summary, written in space set aside for it"
        assert "No space left on device" in summary["iocs"][0]["write_error"]
        roomy = tmp_path / "roomy"
        second = start_receiver(crate, roomy, 31)
        time.sleep(1.0)
        end_over_pva(pva)
        code, stdout, stderr = finish(second)
        assert code == 0, stdout + stderr
        assert_no_overflow(pva)
        first_keys = directory_keys(run_dir, "run00031")
        assert {b: k.size for b, k in first_keys.items()} == {
            b: k.size for b, k in written.items()
        }, "what the first receiver stored was not what the crate saw acknowledged"
    assert_union_is_every_event_once([first_keys, directory_keys(roomy / "run00031", "run00031")],
                                     crate)


# ------------------------------------------------------------------ wrong run


def test_a_receiver_for_the_next_run_takes_nothing_of_the_previous_one(crate, tmp_path):
    with Pva(crate) as pva:
        begin_over_pva(pva, run_number=10)
        time.sleep(1.0)
        end_over_pva(pva)  # run 10's data wait in the crate: nobody took them
        assert pva.number(f"DAQC{CRATE}_CV_Retained") > 1
        early = start_receiver(crate, tmp_path / "next", 11)
        time.sleep(2.0)
        assert early.poll() is None, "the receiver of run 11 ended before run 11 began"
        assert not list((tmp_path / "next" / "run00011").glob("*.gtd_*")), "it took run 10"
        begin_over_pva(pva, run_number=11)
        time.sleep(1.0)
        end_over_pva(pva)
        code, stdout, stderr = finish(early)
        assert code == 0, stdout + stderr
        assert "run 10" in stdout, "it did not say which run it waited behind"
        superseded = pva.get(f"DAQC{CRATE}_OL_LostSuperseded")
        assert sum(superseded) > 1, "run 10's leftovers were not counted as superseded"
    keys = directory_keys(tmp_path / "next" / "run00011", "run00011")
    assert {b: k.size for b, k in keys.items()} == generated(crate), "not exactly run 11"

"""A three-crate system on loopback, driven like an operator would from a group.

`dgs-system` starts the globals IOC and three crate IOCs; `dgs-run start`,
about ten seconds of data, `dgs-run stop`; then the receivers' files are
decoded and compared with the simulator's own counts, the run log and the run
number are checked, `dgs-merge` orders the three crates' files into one, and the
group is stopped with SIGTERM. Stopping the group
during a run ends the run properly first, even when its output has nowhere to
go (`| tee` ended by the same Ctrl-C, a closed stdout).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from geb_files import reference_merge
from ioc_harness import BIN, Ports, wait_until
from test_operator import system_toml

from builder.cli import data_files as merge_inputs
from receiver.geb import read_records
from runctl.operator import RUN_LOG_FILE, STATE_FILE
from runctl.runlog import RunLog
from runctl.system import LOG_DIR, OWN_LOG, SYSTEM_FILE

CRATES = ("01", "02", "03")
BOARDS = ("MDIG1", "MDIG2")
RUN_SECONDS = 10.0
GEB_HEADER = struct.Struct("<iiQ")
#: Classic file names: <run>.gtd_<chunk>_<board>_<ch>.
FILE_NAME = re.compile(r"\.gtd_\d{3}_(\d{4})_([0-9A-F])$")


def data_files(run_dir: Path) -> list[Path]:
    """The GEB files of a run (the receiver's JSON summary, PV snapshots and its hidden
    acknowledgement journal are not)."""
    return [
        path for path in run_dir.iterdir()
        if path.suffix != ".json" and not path.name.startswith(".")
    ]


def count_records(run_dir: Path) -> tuple[Counter, Counter, int]:
    """(data records per board, end-of-run 0xD records per board, all records)."""
    data: Counter = Counter()
    end_of_run: Counter = Counter()
    total = 0
    for path in data_files(run_dir):
        match = FILE_NAME.search(path.name)
        assert match, f"unexpected file {path.name}"
        board, channel = int(match[1]), match[2]
        content = path.read_bytes()
        offset = records = 0
        while offset < len(content):
            _type, length, _timestamp = GEB_HEADER.unpack_from(content, offset)
            offset += GEB_HEADER.size + length
            records += 1
        assert offset == len(content), f"{path.name}: truncated record"
        total += records
        if channel.isdigit():
            data[board] += records
        elif channel == "D":
            end_of_run[board] += records
    return data, end_of_run, total


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie awaiting its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Group:
    """`dgs-system` running a system of remote globals and ``crates``, and the commands
    and CA tools an operator uses, pointed at this system only.

    ``output``: where dgs-system's stdout and stderr go: "file"; "pipe", whose reader
    the test can make leave (`reader_leaves`); or "closed" descriptors."""

    def __init__(self, tmp_path: Path, crates: tuple[str, ...], output: str = "file") -> None:
        globals_ports = Ports.allocate()
        crate_ports = {crate: Ports.allocate() for crate in crates}
        shared = Ports.allocate()  # one CA repeater and PVA broadcast port for the group
        self.toml = tmp_path / "system.toml"
        self.toml.write_text(system_toml(globals_ports.ca, crate_ports))
        self.run_dir = tmp_path / "ctl"
        ca_servers = [globals_ports.ca, *(p.ca for p in crate_ports.values())]
        self.env = {
            **os.environ,
            "EPICS_CA_REPEATER_PORT": str(shared.ca_repeater),
            "EPICS_PVAS_BROADCAST_PORT": str(shared.pva_broadcast),
            "EPICS_PVA_BROADCAST_PORT": str(shared.pva_broadcast),
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": " ".join(f"127.0.0.1:{port}" for port in ca_servers),
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "PYTHONUNBUFFERED": "1",
        }
        self.output_path = tmp_path / "dgs-system.out"
        options = {
            "--config": str(self.toml),
            "--run-dir": str(self.run_dir),
            "--state-dir": str(tmp_path / "state"),
            "--globals-pva": f"127.0.0.1:{globals_ports.pva}",
        }
        command = [sys.executable, "-m", "runctl.system", *(x for o in options.items() for x in o)]
        self.output = output
        self._reader: int | None = None
        if output == "file":
            with open(self.output_path, "w") as stdout:
                self._start(command, stdout)
        elif output == "pipe":
            self._reader, writer = os.pipe()
            self._start(command, writer)
            os.close(writer)
        else:
            self._start(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *command], subprocess.DEVNULL)

    def _start(self, command: list[str], stdout) -> None:
        self.process = subprocess.Popen(
            command, env=self.env, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def reader_leaves(self) -> None:
        """The pipe's only reader closes it, as `tee` does when Ctrl-C ends it."""
        assert self._reader is not None
        os.close(self._reader)
        self._reader = None

    def printed(self) -> str:
        """What dgs-system printed (with no stdout to read: its own copy in its log)."""
        if self.output == "file":
            return self.output_path.read_text()
        copy = self.run_dir / LOG_DIR / OWN_LOG
        return copy.read_text() if copy.exists() else ""

    def wait_ready(self) -> None:
        wait_until(
            lambda: "dgs-system: ready;" in self.printed() or self.process.poll() is not None,
            60,
            "dgs-system ready",
        )
        assert self.process.poll() is None, self.printed()

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``), as Ctrl-C would; the group's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(60)
        if self._reader is not None:
            os.close(self._reader)
        return code

    def dgs_run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runctl.cli", "--run-dir", str(self.run_dir), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def caget(self, name: str) -> float:
        out = subprocess.run(
            [str(BIN / "caget"), "-t", "-n", "-w", "5", name],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert out.returncode == 0, f"caget {name}: {out.stdout}{out.stderr}"
        return float(out.stdout.split()[0])


def response_kinds(output: str) -> list[str]:
    return [line.split(":", 1)[0] for line in output.splitlines()]


def test_three_crates_run_ten_seconds_and_everything_generated_is_on_disk(tmp_path):
    group = Group(tmp_path, CRATES)
    run_dir = group.run_dir
    try:
        group.wait_ready()
        assert (run_dir / SYSTEM_FILE).exists()
        before = int(group.caget("Online_CS_RunNumber"))

        start = group.dgs_run("start")
        assert start.returncode == 0, start.stdout + start.stderr
        prepared = ["acknowledged", *["crate-ready"] * 3, "run-number", *["receiver-started"] * 3]
        begun = ["acknowledged", *["crate-running"] * 3]
        assert response_kinds(start.stdout) == [*prepared, "done", *begun, "done"], start.stdout
        started = time.monotonic()

        status = group.dgs_run("--timeout", "15", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"RUN run {before + 1}" in status.stdout
        for crate in CRATES:
            assert re.search(rf"^{crate}\s+Running", status.stdout, re.M), status.stdout
            wait_until(
                lambda crate=crate: group.caget(f"DAQC{crate}_CV_SenderBytes") > 0,
                20,
                f"crate {crate} sending",
                0.5,
            )
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))  # the run's length

        stop = group.dgs_run("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        finished = [line for line in stop.stdout.splitlines() if "receiver-finished" in line]
        assert len(finished) == 3 and all("exited with 0:" in line for line in finished), (
            stop.stdout
        )
        assert stop.stdout.splitlines()[-1].startswith("done: STOP")
        assert int(group.caget("Online_CS_RunNumber")) == before + 1

        name = f"run{before + 1:05d}"
        record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
        assert (record.run, record.name, record.result) == (before + 1, name, "ok")
        assert list(record.crates) == list(CRATES)
        assert record.duration_s is not None and record.duration_s >= RUN_SECONDS - 0.5
        for crate in CRATES:
            crate_dir = run_dir / f"crate{crate}" / name
            data, end_of_run, total = count_records(crate_dir)
            for card, board in enumerate(BOARDS):
                board_id = int(crate) * 100 + card + 1
                generated = int(group.caget(f"VME{crate}:{board}:SIM_Generated"))
                assert generated > 0
                assert data[board_id] == generated, f"crate {crate} {board}"
                assert end_of_run[board_id] == 1, f"crate {crate} {board}: 0xD"
            logged = record.crates[crate]
            files = data_files(crate_dir)
            assert logged.receiver_exit == 0 and logged.records == total
            assert (logged.files, logged.file_bytes) == (
                len(files),
                sum(p.stat().st_size for p in files),
            )
            assert logged.received_bytes is not None
            assert 0 < logged.received_bytes <= logged.sender_bytes + 1024  # KiB resolution

        # The three run directories merge (dgs-merge, issue 16) into one file holding every
        # record once, ordered across crates, and events whose hits carry their crate.
        run_dirs = [run_dir / f"crate{crate}" / name for crate in CRATES]
        merged, events = tmp_path / "merged.gtd", tmp_path / "events.h5"
        done = subprocess.run(
            [str(BIN / "dgs-merge"), *map(str, run_dirs), "-o", str(merged),
             "--events", str(events)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "count check passed" in done.stdout
        content = merged.read_bytes()
        assert content == reference_merge([p for d in run_dirs for p in merge_inputs(d)])
        stamps = read_records(content)["timestamp"]
        assert (stamps[1:] >= stamps[:-1]).all()
        with h5py.File(events) as h5:
            hit_crates = h5["hits"]["crate"]
            metadata = json.loads(h5.attrs["metadata"])
        assert set(hit_crates.tolist()) == {int(c) for c in CRATES}
        switches = int(np.count_nonzero(hit_crates[1:] != hit_crates[:-1]))
        assert switches > 100, f"the crates' hits interleave in time ({switches} switches)"
        assert [c["crate"] for c in metadata["pvs_begin"]["crates"]] == list(CRATES)

        table = group.dgs_run("log")
        assert table.returncode == 0
        assert re.search(rf"^\s*{before + 1}\s+ok\s", table.stdout, re.M), table.stdout
    finally:
        code = group.terminate()
    assert code == 0, group.printed()
    for member in ("globals", *(f"crate {crate}" for crate in CRATES)):
        assert f"dgs-system: {member} exited with 0" in group.printed()
    assert not (run_dir / SYSTEM_FILE).exists()


@pytest.mark.parametrize(
    ("output", "sig"),
    [("pipe", signal.SIGINT), ("closed", signal.SIGTERM)],
    ids=["pipe-reader-left-ctrl-c", "closed-stdout-sigterm"],
)
def test_stopping_the_group_during_a_run_ends_the_run_first(tmp_path, output, sig):
    group = Group(tmp_path, ("07",), output)
    try:
        group.wait_ready()
        members = json.loads((group.run_dir / SYSTEM_FILE).read_text())["members"]
        if output == "pipe":
            group.reader_leaves()
        start = group.dgs_run("start")
        assert start.returncode == 0, start.stdout + start.stderr
        state = json.loads((group.run_dir / STATE_FILE).read_text())
        receivers = [receiver["pid"] for receiver in state["receivers"]]
        wait_until(lambda: group.caget("DAQC07_CV_SenderBytes") > 0, 20, "data flowing", 0.5)
    finally:
        code = group.terminate(sig)
    printed = group.printed()
    assert code == 0, printed
    assert "dgs-system: ending the open run first" in printed
    assert "receiver-finished: crate 07 receiver exited with 0" in printed
    assert "dgs-system: crate 07 exited with 0" in printed
    assert "dgs-system: globals exited with 0" in printed
    record = RunLog(group.run_dir / RUN_LOG_FILE).records()[-1]
    assert record.result == "ok" and record.crates["07"].receiver_exit == 0
    assert json.loads((group.run_dir / STATE_FILE).read_text())["state"] == "STOP"
    for pid in (*members.values(), *receivers):
        wait_until(lambda pid=pid: gone(pid), 10, f"process {pid} to exit")

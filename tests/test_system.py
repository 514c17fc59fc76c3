"""A three-crate system on loopback, driven like an operator would from a group.

`dgs-system` starts the globals IOC and three crate IOCs; `dgs-run start`,
about ten seconds of data, `dgs-run stop`; then the receivers' files are
decoded and compared with the simulator's own counts, the run log and the run
number are checked, and the group is stopped with SIGTERM. Stopping the group
during a run ends the run properly first.
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

from ioc_harness import BIN, Ports, wait_until
from test_operator import system_toml

from runctl.operator import RUN_LOG_FILE, STATE_FILE
from runctl.runlog import RunLog
from runctl.system import SYSTEM_FILE

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


class Group:
    """`dgs-system` running a system of remote globals and ``crates``, and the commands
    and CA tools an operator uses, pointed at this system only."""

    def __init__(self, tmp_path: Path, crates: tuple[str, ...]) -> None:
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
        with open(self.output_path, "w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runctl.system", *(x for o in options.items() for x in o)],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def printed(self) -> str:
        return self.output_path.read_text()

    def wait_ready(self) -> None:
        wait_until(
            lambda: "dgs-system: ready;" in self.printed() or self.process.poll() is not None,
            60,
            "dgs-system ready",
        )
        assert self.process.poll() is None, self.printed()

    def terminate(self) -> int:
        """SIGTERM, as Ctrl-C would; the group's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

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
            crate_dir = run_dir / "data" / f"crate{crate}" / name
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

        table = group.dgs_run("log")
        assert table.returncode == 0
        assert re.search(rf"^\s*{before + 1}\s+ok\s", table.stdout, re.M), table.stdout
    finally:
        code = group.terminate()
    assert code == 0, group.printed()
    for member in ("globals", *(f"crate {crate}" for crate in CRATES)):
        assert f"dgs-system: {member} exited with 0" in group.printed()
    assert not (run_dir / SYSTEM_FILE).exists()


def test_stopping_the_group_during_a_run_ends_the_run_first(tmp_path):
    group = Group(tmp_path, ("07",))
    try:
        group.wait_ready()
        start = group.dgs_run("start")
        assert start.returncode == 0, start.stdout + start.stderr
        wait_until(lambda: group.caget("DAQC07_CV_SenderBytes") > 0, 20, "data flowing", 0.5)
    finally:
        code = group.terminate()
    printed = group.printed()
    assert code == 0, printed
    assert "dgs-system: ending the open run first" in printed
    assert "receiver-finished: crate 07 receiver exited with 0" in printed
    assert "dgs-system: crate 07 exited with 0" in printed
    assert "dgs-system: globals exited with 0" in printed
    record = RunLog(group.run_dir / RUN_LOG_FILE).records()[-1]
    assert record.result == "ok" and record.crates["07"].receiver_exit == 0
    assert json.loads((group.run_dir / STATE_FILE).read_text())["state"] == "STOP"

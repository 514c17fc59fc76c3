"""`dgs-run` as operators use it: the demo of `make run`, closed output, Ctrl-C, a second
operator host, and IOCs that are gone.

A standalone crate (it serves its own globals) runs as a real `dgs-ioc` process on
isolated loopback ports; `dgs-run` runs as a real command with the real receivers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dataflow import Background, receiver
from ioc_harness import IocProcess, Ports, wait_until
from test_operator import no_leftover_receivers  # noqa: F401 - autouse here too
from test_system import gone

from runctl.operator import RUN_LOG_FILE, STATE_FILE
from runctl.runlog import RunLog

REPO = Path(__file__).resolve().parent.parent
DEMO_NOTE = "using the demonstration crate"


def standalone_toml(ports: Ports) -> str:
    """Crate 01 serving its own globals, two digitizers at a low rate, every port given."""
    lines = [
        "[system]",
        'globals = "local"',
        "[[crate]]",
        'crate = "01"',
        f"ca_port = {ports.ca}",
        f"pva_port = {ports.pva}",
        f"data_port = {ports.data}",
        'data_bind = "127.0.0.1"',
    ]
    for card in range(2):
        lines += [
            "[[crate.board]]",
            f'name = "MDIG{card + 1}"',
            'kind = "digitizer_master"',
            f"card = {card}",
            f"slot = {card + 3}",
            f"package_data = {101 + card}",
            "enabled = true",
            "[crate.board.sim]",
            "event_rate_hz = 100",
            "trace_samples = 50",
        ]
    return "\n".join(lines) + "\n"


class Crate:
    """A standalone crate IOC and `dgs-run` pointed at it."""

    def __init__(self, workdir: Path) -> None:
        self.ports = Ports.allocate()
        self.toml = workdir / "crate.toml"
        self.toml.write_text(standalone_toml(self.ports))
        argv = ["--config", str(self.toml), "--state-dir", str(workdir / "state")]
        self.ioc = IocProcess(argv, workdir, self.ports).start()

    def dgs_run(
        self, run_dir: Path, *args: str, config: bool = True, **popen
    ) -> subprocess.CompletedProcess:
        """``dgs-run --run-dir RUN_DIR [--config FILE] ARGS`` to its end."""
        options = ["--config", str(self.toml)] if config else []
        popen.setdefault("capture_output", "stdout" not in popen)
        return subprocess.run(
            self.command(run_dir, *options, *args),
            env=self.ioc.env,
            text=True,
            timeout=120,
            **popen,
        )

    @staticmethod
    def command(run_dir: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "runctl.cli", "--run-dir", str(run_dir), *args]


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[Crate]:
    one = Crate(tmp_path_factory.mktemp("standalone"))
    yield one
    one.ioc.kill()


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / STATE_FILE).read_text())


def test_start_and_stop_finish_their_step_when_nobody_reads_their_output(crate, tmp_path):
    run_dir = tmp_path / "ctl"
    command = crate.command(run_dir, "--config", str(crate.toml), "start")
    started = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command],
        env=crate.ioc.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    running = state(run_dir)
    assert running["state"] == "RUN"
    receiver = running["receivers"][0]["pid"]
    assert not gone(receiver)
    crate.ioc.wait_numeric("DAQC01_CV_SenderBytes", lambda mib: mib > 0)

    reader, writer = os.pipe()
    os.close(reader)  # like `dgs-run stop | head -1` once head has left
    try:
        stopped = crate.dgs_run(run_dir, "stop", stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert stopped.returncode == 0, stopped.stderr
    assert "standard output was closed" in stopped.stderr
    assert state(run_dir)["state"] == "STOP"
    record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
    assert (record.run, record.result) == (running["run"], "ok")
    assert record.crates["01"].receiver_exit == 0 and record.crates["01"].records > 0
    wait_until(lambda: gone(receiver), 10, "the receiver to exit")


def test_ctrl_c_during_start_cancels_the_prepared_run_and_leaves_no_run_directory(crate, tmp_path):
    run_dir = tmp_path / "ctl"
    process = subprocess.Popen(
        crate.command(run_dir, "--config", str(crate.toml), "start"),
        env=crate.ioc.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        # The number is reserved; the receiver is still starting (its snapshot takes a while).
        wait_until(lambda: any(line.startswith("run-number:") for line in lines), 30, "run-number")
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    reader.join(10)
    errors = process.stderr.read()
    assert code == 1, "".join(lines) + errors
    assert "interrupted after the run was prepared: cancelling it" in errors
    assert lines[-1].startswith("done: STOP: run") and "cancelled" in lines[-1], lines
    assert state(run_dir)["state"] == "STOP"
    record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
    assert record.result == "cancelled" and record.crates["01"].receiver_exit is not None
    assert not (run_dir / "crate01" / record.name).exists()
    assert list((run_dir / "crate01").iterdir()) == []
    assert crate.ioc.get("Online_CS_StartStop") == "Stop"


def test_a_second_run_directory_sees_the_run_of_the_first_and_can_stop_it(crate, tmp_path):
    first, second = tmp_path / "host-a", tmp_path / "host-b"
    started = crate.dgs_run(first, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    number = state(first)["run"]

    seen = crate.dgs_run(second, "status")
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert f"run control: RUN run {number} (run{number:05d}) as the IOCs show it" in seen.stdout
    refused = crate.dgs_run(second, "start")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stdout.startswith(
        f"refused: prepare_run refused: the IOCs are running run {number}"
    )

    ended = crate.dgs_run(second, "stop")
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert ended.stdout.splitlines()[-1].startswith(f"done: STOP: run {number} ended")
    crate.ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
    there = RunLog(second / RUN_LOG_FILE).records()[-1]
    assert (there.run, there.result, there.start) == (number, "ok", None)
    assert "started elsewhere" in there.message

    behind = crate.dgs_run(first, "status")
    assert f"RUN run {number}" in behind.stdout
    assert "the IOCs show Online_CS_StartStop = Stop (stopped elsewhere)" in behind.stdout
    finished = crate.dgs_run(first, "stop")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    here = RunLog(first / RUN_LOG_FILE).records()[-1]
    assert (here.run, here.result, here.crates["01"].receiver_exit) == (number, "ok", 0)
    assert state(first)["state"] == state(second)["state"] == "STOP"


def test_stop_force_ends_the_recorded_run_when_every_ioc_is_gone(tmp_path):
    doomed = Crate(tmp_path)
    run_dir = tmp_path / "ctl"
    try:
        started = doomed.dgs_run(run_dir, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        receiver = state(run_dir)["receivers"][0]["pid"]
        doomed.ioc.wait_numeric("DAQC01_CV_SenderBytes", lambda mib: mib > 0)
    finally:
        doomed.ioc.kill()

    stuck = doomed.dgs_run(run_dir, "stop")
    assert stuck.returncode == 1, stuck.stdout + stuck.stderr
    assert "still RUN" in stuck.stdout and "dgs-run stop --force" in stuck.stdout
    assert state(run_dir)["state"] == "RUN"

    forced = doomed.dgs_run(run_dir, "stop", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    last = forced.stdout.splitlines()[-1]
    assert last.startswith("done: STOP: run") and "by force" in last, forced.stdout
    assert "receiver-finished: crate 01" in forced.stdout
    assert state(run_dir)["state"] == "STOP"
    record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
    assert record.result == "forced" and "does not answer" in record.message
    wait_until(lambda: gone(receiver), 10, "the receiver to exit")


def test_stop_does_not_wait_for_the_receiver_of_a_crate_that_refused_the_start(tmp_path):
    """A crate refuses a Start whose data port it cannot bind: its receiver can never get
    anything, so stop ends it at once instead of waiting out the receivers timeout."""
    refusing = Crate(tmp_path)
    run_dir = tmp_path / "ctl"
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", refusing.ports.data))  # bound, not listening: connects fail
        started = refusing.dgs_run(run_dir, "--timeout", "8", "start")
        assert started.returncode == 1, started.stdout + started.stderr
        assert "not running within 8 s: crate 01: state Stopped" in started.stdout
        assert "data port cannot be bound" in refusing.ioc.log()
        receiver = state(run_dir)["receivers"][0]["pid"]

        began = time.monotonic()
        stopped = refusing.dgs_run(run_dir, "stop")
        took = time.monotonic() - began
        assert "crate 01 receiver exited with" in stopped.stdout, stopped.stdout
        assert "(stopped by the operator)" in stopped.stdout, stopped.stdout
        assert took < 30, f"stop waited {took:.0f} s for a receiver that could get nothing"
        assert state(run_dir)["state"] == "STOP"
        record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
        assert "never ran: crate 01" in record.message
        wait_until(lambda: gone(receiver), 10, "the receiver to exit")
    finally:
        holder.close()
        refusing.ioc.kill()


def test_dgs_run_finds_the_demo_of_make_run_with_or_without_its_configuration(start_ioc, tmp_path):
    demo = start_ioc("--demo")  # its PVA port reaches dgs-run as EPICS_PVA_SERVER_PORT

    def dgs_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runctl.cli", "--no-receivers", *args],
            env=demo.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    started = dgs_run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert DEMO_NOTE in started.stderr
    reader = Background(receiver(demo))  # the demo's data port is this test's, not 9001
    status = dgs_run("status")
    assert status.returncode == 0 and DEMO_NOTE not in status.stderr
    assert "run control: RUN run 1 (run00001)" in status.stdout, status.stdout
    stopped = dgs_run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert RunLog(tmp_path / "data" / RUN_LOG_FILE).records()[-1].result == "ok"
    reader.join()  # every board's end of run: the pool is whole for the next run

    other = ["--run-dir", str(tmp_path / "other")]
    demo_toml = str(REPO / "examples" / "demo.toml")
    started = dgs_run(*other, "--config", demo_toml, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    stopped = dgs_run(*other, "stop")  # the run directory remembers its configuration
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert DEMO_NOTE not in started.stderr + stopped.stderr
    record = RunLog(tmp_path / "other" / RUN_LOG_FILE).records()[-1]
    assert (record.run, record.result) == (2, "ok")


def test_stop_reports_the_data_lost_by_reason_and_exits_4(crate, tmp_path):
    run_dir = tmp_path / "ctl"
    started = crate.dgs_run(run_dir, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    crate.ioc.wait_numeric("DAQC01_CV_SenderBytes", lambda mib: mib > 0)
    # The next event gets a bad length: the checker discards its whole buffer (reason Check).
    crate.ioc.put_ok("VME01:MDIG1:SIM_Fault", "Bad length")
    crate.ioc.wait_numeric("DAQC01_OL_Errors0", lambda errors: errors > 0)

    def status_with_the_loss() -> str | None:
        shown = crate.dgs_run(run_dir, "status").stdout
        return shown if "(Check " in shown else None

    shown = wait_until(status_with_the_loss, 20, "status to show the loss", 0.5)
    assert "crate 01 lost " in shown and "(Check " in shown, shown

    stopped = crate.dgs_run(run_dir, "stop")
    assert stopped.returncode == 4, stopped.stdout + stopped.stderr
    (line,) = [ln for ln in stopped.stdout.splitlines() if ln.startswith("data-lost:")]
    assert line.startswith("data-lost: crate 01 lost ") and "(Check " in line, line
    last = stopped.stdout.splitlines()[-1]
    assert last.startswith("lost: STOP: run") and "DATA LOST: crate 01:" in last, last
    record = RunLog(run_dir / RUN_LOG_FILE).records()[-1]
    lost = record.crates["01"]
    assert record.result == "lost" and lost.receiver_exit == 0
    assert lost.lost_bytes["Check"] > 0 and lost.lost_events["Check"] > 0
    assert sum(lost.lost_bytes.values()) == lost.lost_bytes["Check"]
    table = crate.dgs_run(run_dir, "log").stdout
    assert f"{record.run:>6}  lost " in table and "(Check " in table, table

"""The Operator API on a real one-crate system: a globals IOC and crate 01 following it.

Real IOC processes on isolated loopback ports, the real receiver as a child
process; the globals are checked with the real `caget`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ioc_harness import READY_LINE, START_TIMEOUT_S, IocProcess, Ports, wait_until

from ioc.config import SystemConfig, parse_config
from runctl.operator import (
    ACKNOWLEDGED,
    CRATE_DRAINED,
    CRATE_READY,
    CRATE_RUNNING,
    DEFAULT_RECEIVER_COMMAND,
    DONE,
    RECEIVER_FINISHED,
    RECEIVER_STARTED,
    REFUSED,
    RUN_LOG_FILE,
    RUN_NUMBER,
    STATE_FILE,
    TIMEOUT,
    Operator,
    Progress,
    RunState,
    Timeouts,
)
from runctl.runlog import RunLog

TIMEOUTS = Timeouts(connect_s=3, ready_s=10, running_s=10, drain_s=20, receivers_s=30)


def stop_leftover_receivers(root: Path) -> None:
    """SIGTERM every receiver a state file under ``root`` still records, if it runs: a test
    that failed mid-run must not leave receivers waiting an hour for their crate."""
    for state_file in root.rglob(STATE_FILE):
        for receiver in json.loads(state_file.read_text()).get("receivers", []):
            try:
                command = Path(f"/proc/{receiver['pid']}/cmdline").read_bytes()
            except OSError:
                continue
            if receiver["exit_file"].encode() in command:
                os.kill(receiver["pid"], signal.SIGTERM)


@pytest.fixture(autouse=True)
def no_leftover_receivers(tmp_path: Path) -> Iterator[None]:
    yield
    stop_leftover_receivers(tmp_path)


def system_toml(globals_ca: int, crates: dict[str, Ports], event_rate_hz: float = 100) -> str:
    """A system with remote globals and two enabled digitizers per crate (package data
    NN1, NN2), every port taken from ``crates``; low rates keep the CPU free."""
    lines = ["[system]", 'globals = "remote"', f'globals_ca = "127.0.0.1:{globals_ca}"']
    for crate, ports in crates.items():
        lines += [
            "[[crate]]",
            f'crate = "{crate}"',
            f"ca_port = {ports.ca}",
            f"pva_port = {ports.pva}",
            f"data_port = {ports.data}",
            "sample_port = 0",
            'data_bind = "127.0.0.1"',
            f"seed = {int(crate)}",
        ]
        for card in range(2):
            lines += [
                "[[crate.board]]",
                f'name = "MDIG{card + 1}"',
                'kind = "digitizer_master"',
                f"card = {card}",
                f"slot = {card + 3}",
                f"package_data = {int(crate) * 100 + card + 1}",
                "enabled = true",
                "[crate.board.sim]",
                f"event_rate_hz = {event_rate_hz}",
                "trace_samples = 50",
            ]
    return "\n".join(lines) + "\n"


def kinds(responses: list[Progress]) -> list[str]:
    return [r.kind for r in responses]


class OneCrateSystem:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.globals_ports = Ports.allocate()
        self.crate_ports = Ports.allocate()
        self.toml = workdir / "system.toml"
        self.toml.write_text(system_toml(self.globals_ports.ca, {"01": self.crate_ports}))
        self.system: SystemConfig = parse_config(self.toml.read_text(), str(self.toml))
        self.globals_pva = f"127.0.0.1:{self.globals_ports.pva}"
        g = self.globals_ports
        state = str(workdir / "state")
        ports = ["--ca-port", str(g.ca), "--pva-port", str(g.pva)]
        self.globals_ioc = IocProcess(
            ["--globals-only", "--config", str(self.toml), "--state-dir", state, *ports],
            workdir,
            g,
        )
        self.crate_ioc = IocProcess(
            ["--config", str(self.toml), "--crate", "01", "--state-dir", state],
            workdir,
            self.crate_ports,
        )

    def start(self) -> OneCrateSystem:
        for ioc in (self.globals_ioc, self.crate_ioc):
            ioc.start(wait_ready=False)
        for ioc in (self.globals_ioc, self.crate_ioc):
            wait_until(lambda ioc=ioc: READY_LINE in ioc.log(), START_TIMEOUT_S, "IOC ready")
        self.crate_ioc.wait_value("DAQC01_CV_GlobalsConnected", "Connected")
        return self

    def run_number(self) -> int:
        return int(self.globals_ioc.getf("Online_CS_RunNumber"))

    def operator(self, control_dir: Path, **kwargs) -> Operator:
        kwargs.setdefault("globals_pva", self.globals_pva)
        kwargs.setdefault("timeouts", TIMEOUTS)
        return Operator(self.system, control_dir=control_dir, **kwargs)

    def stop(self) -> None:
        self.crate_ioc.kill()
        self.globals_ioc.kill()


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[OneCrateSystem]:
    one = OneCrateSystem(tmp_path_factory.mktemp("one-crate")).start()
    yield one
    one.stop()


def test_a_run_yields_the_documented_responses_in_order(system, tmp_path):
    before = system.run_number()
    with system.operator(tmp_path / "ctl", receiver_command=DEFAULT_RECEIVER_COMMAND) as op:
        prepared = list(op.prepare_run())
        assert kinds(prepared) == [ACKNOWLEDGED, CRATE_READY, RUN_NUMBER, RECEIVER_STARTED, DONE]
        assert [r.crate for r in prepared[1::2]] == ["01", "01"]
        assert op.state is RunState.READY
        assert system.run_number() == before + 1
        assert system.globals_ioc.get("Online_CS_SaveData") == "Save"

        begun = list(op.begin_run())
        assert kinds(begun) == [ACKNOWLEDGED, CRATE_RUNNING, DONE], begun
        assert op.state is RunState.RUN
        system.crate_ioc.wait_numeric("DAQC01_CV_SenderBytes", lambda mib: mib > 0)

        ended = list(op.end_run())
        assert kinds(ended) == [ACKNOWLEDGED, CRATE_DRAINED, RECEIVER_FINISHED, DONE], ended
        assert "exited with 0" in ended[2].message
        assert op.state is RunState.STOP
    assert system.globals_ioc.get("Online_CS_StartStop") == "Stop"
    assert system.run_number() == before + 1

    record = RunLog(tmp_path / "ctl" / RUN_LOG_FILE).records()[-1]
    assert (record.run, record.name, record.result) == (before + 1, f"run{before + 1:05d}", "ok")
    crate = record.crates["01"]
    run_dir = tmp_path / "ctl" / "crate01" / record.name
    files = [p for p in run_dir.iterdir() if p.suffix != ".json" and not p.name.startswith(".")]
    assert crate.receiver_exit == 0 and crate.files == len(files) > 0
    assert crate.file_bytes == sum(p.stat().st_size for p in files)
    assert crate.sender_bytes > 0 and crate.records > 0
    assert record.duration_s is not None and record.duration_s > 0
    # The receiver saved the crate's PVs at the begin and the end of the run.
    for when in ("begin", "end"):
        document = json.loads((run_dir / f"{record.name}.pvs_{when}.json").read_text())
        (snapshot,) = document["crates"]
        assert snapshot["crate"] == "01" and not snapshot["error"], snapshot
        assert {"DAQC01_CV_State", "VME01:MDIG1:CS_Ena"} <= set(snapshot["pvs"]), snapshot
        # Remote globals: the crate's IOC serves no Online_CS_ records, and the receiver
        # asks only for what it serves (asking for more waited out a 5-s timeout).
        assert snapshot["missing"] == [], snapshot["missing"]
    log = (tmp_path / "ctl" / "receivers" / f"{record.name}-crate01.log").read_text()
    assert "PV snapshot skipped" not in log


def test_calls_that_skip_a_state_are_refused_and_change_nothing(system, tmp_path):
    before = system.run_number()
    op = system.operator(tmp_path / "ctl", receiver_command=None)
    with op:
        refused = list(op.begin_run())
        assert kinds(refused) == [REFUSED]
        assert "no run is prepared" in refused[0].message
        assert "prepare_run first" in refused[0].message
        assert kinds(list(op.end_run())) == [REFUSED]
        assert system.run_number() == before
        assert system.globals_ioc.get("Online_CS_StartStop") == "Stop"

        busy = op.prepare_run()
        assert next(busy).kind == ACKNOWLEDGED  # holds the lock until it finishes
        with system.operator(tmp_path / "ctl", receiver_command=None) as other:
            blocked = list(other.prepare_run())
        assert kinds(blocked) == [REFUSED] and "another operator" in blocked[0].message
        assert [r.kind for r in busy][-1] == DONE
        assert op.state is RunState.READY

        again = list(op.prepare_run())
        assert kinds(again) == [REFUSED] and "already prepared" in again[0].message

        cancelled = list(op.end_run())
        assert kinds(cancelled) == [ACKNOWLEDGED, DONE] and "cancelled" in cancelled[-1].message
        assert op.state is RunState.STOP
        assert kinds(list(op.begin_run())) == [REFUSED]
    assert system.run_number() == before + 1  # the cancelled run used its number
    assert RunLog(tmp_path / "ctl" / RUN_LOG_FILE).records()[-1].result == "cancelled"


def test_a_crate_that_is_down_times_out_with_a_clear_message(system, tmp_path):
    down = Ports.allocate()
    toml = system_toml(system.globals_ports.ca, {"01": system.crate_ports, "02": down})
    two_crates = parse_config(toml, "two-crates.toml")
    before = system.run_number()
    quick = Timeouts(connect_s=1, ready_s=2)
    with Operator(
        two_crates,
        control_dir=tmp_path / "ctl",
        globals_pva=system.globals_pva,
        receiver_command=None,
        timeouts=quick,
    ) as op:
        started = time.monotonic()
        responses = list(op.prepare_run())
        elapsed = time.monotonic() - started
        assert kinds(responses) == [ACKNOWLEDGED, CRATE_READY, TIMEOUT], responses
        assert responses[1].crate == "01"
        message = responses[-1].message
        assert "crate 02" in message and "does not answer" in message
        assert f"127.0.0.1:{down.pva}" in message and "crate 01" not in message
        assert elapsed < 10
        assert op.state is RunState.STOP
    assert system.run_number() == before

    nowhere = Ports.allocate()
    with system.operator(
        tmp_path / "ctl2",
        globals_pva=f"127.0.0.1:{nowhere.pva}",
        receiver_command=None,
        timeouts=quick,
    ) as op:
        responses = list(op.prepare_run())
    assert kinds(responses) == [ACKNOWLEDGED, TIMEOUT]
    assert "global run-control records do not answer" in responses[-1].message


def test_run_numbers_in_use_are_skipped_and_a_cancelled_run_leaves_no_directory(system, tmp_path):
    control = tmp_path / "ctl"
    before = system.run_number()
    taken = control / "crate01" / f"run{before + 1:05d}"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("someone else's data\n")
    with system.operator(control) as op:
        prepared = list(op.prepare_run())
        assert kinds(prepared)[-1] == DONE, prepared
        (reserved,) = [r.message for r in prepared if r.kind == RUN_NUMBER]
        assert reserved.startswith(f"run {before + 2} reserved"), reserved
        assert f"skipped run{before + 1:05d}" in reserved
        assert system.run_number() == before + 2
        cancelled = list(op.end_run())
        assert kinds(cancelled) == [ACKNOWLEDGED, RECEIVER_FINISHED, DONE], cancelled
        assert not (control / "crate01" / f"run{before + 2:05d}").exists()

        # A run directory that holds data is never removed.
        prepared = list(op.prepare_run())
        assert kinds(prepared)[-1] == DONE, prepared
        kept = control / "crate01" / f"run{before + 3:05d}"
        (kept / f"run{before + 3:05d}.gtd_000_0101_0").write_bytes(b"data")
        cancelled = list(op.end_run())
        assert cancelled[-1].kind == DONE and f"kept {kept}" in cancelled[-1].message
    assert (kept / f"run{before + 3:05d}.gtd_000_0101_0").read_bytes() == b"data"
    assert (taken / "notes.txt").read_text() == "someone else's data\n"
    results = [(r.run, r.result) for r in RunLog(control / RUN_LOG_FILE).records()]
    assert results == [(before + 2, "cancelled"), (before + 3, "cancelled")]

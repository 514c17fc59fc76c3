"""The Operator API on a real one-crate system: a globals IOC and crate 01 following it.

Real IOC processes on isolated loopback ports, the real receiver as a child
process; the globals are checked with the real `caget`.
"""

from __future__ import annotations

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
    TIMEOUT,
    Operator,
    Progress,
    RunState,
    Timeouts,
)
from runctl.runlog import RunLog

TIMEOUTS = Timeouts(connect_s=3, ready_s=10, running_s=10, drain_s=20, receivers_s=30)


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
    run_dir = tmp_path / "ctl" / "data" / "crate01" / record.name
    files = [p for p in run_dir.iterdir() if p.suffix != ".json" and not p.name.startswith(".")]
    assert crate.receiver_exit == 0 and crate.files == len(files) > 0
    assert crate.file_bytes == sum(p.stat().st_size for p in files)
    assert crate.sender_bytes > 0 and crate.records > 0
    assert record.duration_s is not None and record.duration_s > 0


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

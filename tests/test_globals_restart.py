"""The global run state survives a restart of the globals IOC, and autosave forgets nothing.

Real processes on isolated loopback ports: a globals IOC (`dgs-ioc --globals-only`)
and crate 01 following it (`globals = "remote"`), driven like a DAQ host would
(the `Operator` with its real `dgs-receiver`, or the receiver client), with the
globals IOC killed and started again mid-run. The simulator's own counts
(`SIM_Generated`) are the reference for "nothing lost".
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dataflow import (
    Background,
    Pva,
    Watch,
    assert_channel_order,
    assert_end_of_run_last_and_once,
    assert_pool_whole,
    data_keys,
    epics_tool,
    receiver,
    sim_figures,
    start_run,
)
from ioc_harness import IocProcess, Ports, free_port, wait_until
from test_operator import system_toml
from test_system import count_records

from ioc.config import parse_config
from runctl.operator import DONE, RECEIVER_FINISHED, Operator, Progress, Timeouts

CRATE = "01"
BOARDS = {"MDIG1": 101, "MDIG2": 102}
TIMEOUTS = Timeouts(connect_s=5, ready_s=15, running_s=15, drain_s=20, receivers_s=30)
#: CA clients find a restarted server within this time (search back-off and beacons).
RECONNECT_S = 30.0


class RemoteGlobals:
    """A globals IOC and crate 01 following it, on their own loopback ports.

    The globals IOC takes both its ports from the configuration: its process
    environment names other ones, so a client that finds it on ``globals_pva``
    found it through the configuration. The two share a CA repeater port, so the
    crate hears a restarted globals IOC's beacons as an EPICS site would.
    """

    def __init__(self, workdir: Path, event_rate_hz: float = 200) -> None:
        self.workdir = workdir
        shared = Ports.allocate()
        self.globals_ports = dataclasses.replace(Ports.allocate(), ca_repeater=shared.ca_repeater)
        self.crate_ports = dataclasses.replace(Ports.allocate(), ca_repeater=shared.ca_repeater)
        self.globals_pva_port = free_port()
        text = system_toml(self.globals_ports.ca, {CRATE: self.crate_ports}, event_rate_hz)
        text = text.replace(
            "[[crate]]", f'globals_pva = "127.0.0.1:{self.globals_pva_port}"\n[[crate]]', 1
        )
        self.toml = workdir / "system.toml"
        self.toml.write_text(text)
        self.system = parse_config(text, str(self.toml))
        self.globals_state = workdir / "globals-state"
        self.globals_ioc = self._globals(workdir / "globals", self.globals_state)
        self.crate_ioc = IocProcess(
            ["--config", str(self.toml), "--crate", CRATE, "--state-dir", str(workdir / "crate")],
            workdir,
            self.crate_ports,
        )

    def _globals(self, workdir: Path, state: Path) -> IocProcess:
        workdir.mkdir(exist_ok=True)
        argv = ["--globals-only", "--config", str(self.toml), "--state-dir", str(state)]
        return IocProcess(argv, workdir, self.globals_ports)

    def start(self) -> RemoteGlobals:
        self.globals_ioc.start()
        self.crate_ioc.start()
        self.crate_ioc.wait_value(f"DAQC{CRATE}_CV_GlobalsConnected", "Connected")
        return self

    def kill_globals(self) -> None:
        """SIGKILL: no exit handler runs, what is not on disk is gone."""
        self.globals_ioc.kill()
        self.crate_ioc.wait_value(f"DAQC{CRATE}_CV_GlobalsConnected", "Disconnected")

    def restart_globals(self, name: str, state: Path | None = None) -> IocProcess:
        """The same IOC on the same ports; ``state`` another autosave directory (lost state)."""
        self.globals_ioc = self._globals(self.workdir / name, state or self.globals_state)
        self.globals_ioc.start()
        self.crate_ioc.wait_value(
            f"DAQC{CRATE}_CV_GlobalsConnected", "Connected", timeout=RECONNECT_S
        )
        return self.globals_ioc

    def operator(self, control_dir: Path) -> Operator:
        """As `dgs-run` would make it: everything from the configuration."""
        return Operator(self.system, control_dir=control_dir, timeouts=TIMEOUTS)

    def close(self) -> None:
        self.crate_ioc.kill()
        self.globals_ioc.kill()


@pytest.fixture
def remote(tmp_path) -> Iterator[RemoteGlobals]:
    system = RemoteGlobals(tmp_path).start()
    yield system
    system.close()


def steps(*generators) -> list[Progress]:
    return [response for generator in generators for response in generator]


def sender_mib(pva: Pva) -> float:
    return pva.number(f"DAQC{CRATE}_CV_SenderBytes")


def wait_more_sent(pva: Pva, what: str) -> None:
    before = sender_mib(pva)
    pva.wait(f"DAQC{CRATE}_CV_SenderBytes", lambda mib: mib > before + 0.05, 20, what)


def assert_every_event_delivered(pva: Pva, received: dict[int, int], ends: dict[int, int]):
    for name, board_id in BOARDS.items():
        figures = sim_figures(pva, name)
        assert (figures.dropped, figures.cleared) == (0, 0), name
        assert received[board_id] == figures.generated > 0, f"{name}: events received"
        assert ends[board_id] == 1, f"{name}: end-of-run header"
    lost = pva.numbers(
        f"DAQC{CRATE}_OL_TotalBufsLost",
        f"DAQC{CRATE}_CV_SenderRequeued",
        *(f"DAQC{CRATE}_OL_DataLost{card}" for card in range(len(BOARDS))),
    )
    assert lost == [0.0] * len(lost)


def test_a_globals_restart_mid_run_keeps_the_crate_running_and_loses_nothing(remote, tmp_path):
    crate = remote.crate_ioc
    with remote.operator(tmp_path / "ctl") as op:
        started = steps(op.prepare_run(), op.begin_run())
    assert started[-1].kind == DONE, started
    run = int(remote.globals_ioc.getf("Online_CS_RunNumber"))

    with Pva(crate) as pva:
        states = Watch(pva, f"DAQC{CRATE}_CV_State")
        wait_more_sent(pva, "data flowing to the receiver")
        remote.kill_globals()
        wait_more_sent(pva, "data flowing while the globals are away")
        assert crate.get(f"DAQC{CRATE}_CV_State") == "Running"

        restarted = remote.restart_globals("globals-again")
        assert restarted.caget(
            "Online_CS_StartStop", "Online_CS_SaveData", "Online_CS_RunNumber"
        ) == ["Start", "Save", str(run)]
        wait_until(lambda: "globals back: StartStop = Start" in crate.log(), 10, "reconnect seen")
        wait_more_sent(pva, "data flowing after the globals came back")
        assert [str(state) for state in states.seen()] == ["Running"], "the run was interrupted"
        states.close()

        with remote.operator(tmp_path / "ctl") as op:
            ended = list(op.end_run())
        assert ended[-1].kind == DONE, ended
        finished = [r for r in ended if r.kind == RECEIVER_FINISHED]
        assert len(finished) == 1 and "exited with 0" in finished[0].message

        run_dir = tmp_path / "ctl" / f"crate{CRATE}" / f"run{run:05d}"
        data, end_of_run, _total = count_records(run_dir)
        assert_every_event_delivered(pva, data, end_of_run)
    assert crate.log().count("run started") == 1, "a restored Start began a new run"
    assert "Traceback" not in crate.log() + restarted.log()
    assert_pool_whole(crate)


def test_globals_back_without_their_state_end_the_run_with_its_tail_delivered(remote):
    """The globals IOC comes back with Stop / No Save (its autosave directory is gone):
    the crate follows the Stop, and drains with the Save the run had."""
    crate, globals_ioc = remote.crate_ioc, remote.globals_ioc
    rx = Background(receiver(crate, pipeline=6), max_seconds=90)
    globals_ioc.put_ok("Online_CS_SaveData", "Save")
    globals_ioc.put_ok("Online_CS_StartStop", "Start")
    crate.wait_value(f"DAQC{CRATE}_CV_State", "Running")
    with Pva(crate) as pva:
        wait_more_sent(pva, "data flowing")
        remote.kill_globals()
        remote.restart_globals("globals-fresh", state=remote.workdir / "fresh-state")
        crate.wait_value(f"DAQC{CRATE}_CV_State", "Stopped", timeout=20)
        tally = rx.join(60)
        assert tally.all_done, "every board's end-of-run header arrived"
        received = {bid: data_keys(log.events).size for bid, log in tally.boards.items()}
        ends = {bid: log.end_of_run for bid, log in tally.boards.items()}
        assert_every_event_delivered(pva, received, ends)
        for board_id in BOARDS.values():
            assert_channel_order(tally.boards[board_id].events)
    log = crate.log()
    assert "globals back with StartStop = Stop (followed Start): following it" in log
    assert "this run keeps Save" in log or "this run ends with Save" in log


def test_no_save_arriving_while_draining_does_not_discard_the_runs_tail(demo_ioc):
    """Stop and No Save together: the drain keeps the run's Save (the rule is logged)."""
    ioc = demo_ioc
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    start_run(ioc)
    with Pva(ioc) as pva:
        pva.wait(f"DAQC{CRATE}_CV_SenderReplies", lambda v: v > 5, 20, "data flowing")
        pva.ctx.put(["Online_CS_StartStop", "Online_CS_SaveData"], [0, 0], timeout=10)
        tally = rx.join(60)
        assert tally.all_done, "every board's end-of-run header arrived"
        for name in ("MDIG1", "MDIG2", "MDIG3", "MDIG4"):
            figures = sim_figures(pva, name)
            events = tally.boards[100 + int(name[-1])].events
            assert data_keys(events).size == figures.generated > 0, name
            assert_end_of_run_last_and_once(events)
        assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == 0
    # Usually the No Save arrives while the crate drains (and the log says it waits for the
    # drain); on a busy host it may come after the drain: either way nothing was dropped.
    assert ioc.get("Online_CS_SaveData") == "No Save"
    start_run(ioc, save="No Save")  # the change took effect for the next run
    wait_until(lambda: "run started (No Save)" in ioc.log(), 10, "the No Save run's log line")


def caput_fast(ioc: IocProcess, name: str, value: str) -> None:
    """One completed CA put (`caput -w` waits for the record's processing to finish)."""
    out = subprocess.run(
        [epics_tool("caput"), "-w", "5", name, value],
        env=ioc.env,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert "New : " in out.stdout and value in out.stdout.split("New : ")[1], out.stdout


def put_then_kill(ioc: IocProcess, puts: list[tuple[str, str]]) -> float:
    """Make the puts, SIGKILL the IOC right after the last; seconds from its completion."""
    for name, value in puts:
        caput_fast(ioc, name, value)
    done = time.monotonic()
    ioc.proc.send_signal(signal.SIGKILL)
    elapsed = time.monotonic() - done
    ioc.proc.wait(5)
    return elapsed


def test_values_put_just_before_a_kill_come_back_on_a_globals_ioc(start_ioc):
    ioc = start_ioc("--demo", "--globals-only")
    state_dir = ioc.args[ioc.args.index("--state-dir") + 1]
    assert "Could not" not in ioc.log() and "nothing saved yet" in ioc.log()
    elapsed = put_then_kill(
        ioc,
        [("Online_CS_SaveData", "Save"), ("Online_CS_StartStop", "Start"),
         ("Online_CS_RunNumber", "4242")],
    )
    assert elapsed < 0.2
    again = start_ioc("--demo", "--globals-only", "--state-dir", state_dir, ports=ioc.ports)
    assert again.caget("Online_CS_RunNumber", "Online_CS_StartStop", "Online_CS_SaveData") == [
        "4242", "Start", "Save",
    ]
    assert f"autosave file {Path(state_dir) / 'globals.json'}: restored " in again.log()
    assert "Could not" not in again.log()


def test_a_standalone_crate_restores_its_globals_but_does_not_resume_a_run(start_ioc):
    ioc = start_ioc("--demo")
    state_dir = ioc.args[ioc.args.index("--state-dir") + 1]
    assert "Could not" not in ioc.log()
    ioc.wait_value(f"DAQC{CRATE}_CV_State", "Stopped")
    elapsed = put_then_kill(
        ioc,
        [("Online_CS_SaveData", "Save"), ("Online_CS_StartStop", "Start"),
         ("Online_CS_RunNumber", "17")],
    )
    assert elapsed < 0.2
    saved = json.loads((Path(state_dir) / "DAQC01.json").read_text())
    assert saved == {"Online_CS_RunNumber": 17, "Online_CS_SaveData": 1, "Online_CS_StartStop": 1}

    again = start_ioc("--demo", "--state-dir", state_dir)
    assert again.caget("Online_CS_RunNumber", "Online_CS_SaveData", "Online_CS_StartStop") == [
        "17", "Save", "Stop",
    ]
    assert "a standalone IOC does not resume a run" in again.log()
    time.sleep(1.0)  # a run, had one begun by itself, would show within this second
    assert again.get(f"DAQC{CRATE}_CV_State") == "Stopped"
    assert "run started" not in again.log()


def test_autosave_defaults_to_a_per_user_directory_whatever_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "dgs-crate-ioc" / "DAQC01.json"
    first_dir, second_dir = tmp_path / "here", tmp_path / "elsewhere"
    first_dir.mkdir()
    second_dir.mkdir()
    ports = Ports.allocate()
    argv = ["--demo", "--data-port", str(ports.data)]
    first = IocProcess(argv, first_dir, ports).start()
    try:
        assert f"autosave file {expected}: nothing saved yet" in first.log()
        first.put_ok("Online_CS_RunNumber", 31)
        assert first.stop() == 0
    finally:
        first.kill()
    assert not (first_dir / "autosave").exists()
    second = IocProcess(argv, second_dir, ports).start()
    try:
        assert second.get("Online_CS_RunNumber") == "31"
        assert f"autosave file {expected}: restored " in second.log()
    finally:
        second.kill()


def test_an_unwritable_state_dir_stops_start_up_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    ports = Ports.allocate()
    argv = ["--demo", "--data-port", str(ports.data), "--state-dir", str(blocker / "state")]
    ioc = IocProcess(argv, tmp_path, ports).start(wait_ready=False)
    code = ioc.proc.wait(30)
    problems = [line for line in ioc.log().splitlines() if line.startswith("dgs-ioc:")]
    assert code == 2
    assert problems == [f"dgs-ioc: cannot start: autosave directory {blocker / 'state'}: "
                        "Not a directory"]


def test_dgs_system_and_dgs_run_find_the_globals_pva_port_in_the_configuration(tmp_path):
    """No --globals-pva anywhere: `[system] globals_pva` is where both look."""
    remote = RemoteGlobals(tmp_path)
    env = {
        **os.environ,
        "EPICS_CA_REPEATER_PORT": str(remote.globals_ports.ca_repeater),
        "EPICS_PVAS_BROADCAST_PORT": str(remote.globals_ports.pva_broadcast),
        "EPICS_PVA_BROADCAST_PORT": str(remote.globals_ports.pva_broadcast),
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{remote.globals_ports.ca}",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "PYTHONUNBUFFERED": "1",
    }
    run_dir = tmp_path / "ctl"
    output = tmp_path / "dgs-system.out"
    with open(output, "w") as out:
        group = subprocess.Popen(
            [sys.executable, "-m", "runctl.system", "--config", str(remote.toml),
             "--run-dir", str(run_dir), "--state-dir", str(tmp_path / "state")],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(
            lambda: "dgs-system: ready;" in output.read_text() or group.poll() is not None,
            60,
            "dgs-system ready",
        )
        printed = output.read_text()
        assert group.poll() is None, printed
        assert f"PVA 127.0.0.1:{remote.globals_pva_port}" in printed
        status = subprocess.run(
            [sys.executable, "-m", "runctl.cli", "--config", str(remote.toml),
             "--run-dir", str(tmp_path / "other"), "--timeout", "10", "status"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"globals 127.0.0.1:{remote.globals_pva_port}: StartStop Stop" in status.stdout
    finally:
        group.send_signal(signal.SIGTERM)
        code = group.wait(60)
    assert code == 0, output.read_text()


def test_restored_values_are_checked_and_a_damaged_file_is_kept_aside(start_ioc, tmp_path):
    state = tmp_path / "damaged"
    state.mkdir()
    (state / "globals.json").write_text('{"Online_CS_RunNumber": -3, "Online_CS_SaveData": 1}')
    ioc = start_ioc("--demo", "--globals-only", "--state-dir", str(state))
    assert ioc.caget("Online_CS_RunNumber", "Online_CS_SaveData") == ["0", "Save"]
    assert "autosaved Online_CS_RunNumber = -3 not restored: -3 below 0" in ioc.log()
    ioc.kill()

    (state / "globals.json").write_text("Online_CS_RunNumber: 12\n")  # not JSON
    again = start_ioc("--demo", "--globals-only", "--state-dir", str(state), ports=ioc.ports)
    assert again.get("Online_CS_RunNumber") == "0"
    assert (state / "globals.json.bad").read_text() == "Online_CS_RunNumber: 12\n"
    assert "is unreadable" in again.log()
    assert json.loads((state / "globals.json").read_text())["Online_CS_RunNumber"] == 0


def test_a_put_that_cannot_be_saved_is_refused_and_changes_nothing(start_ioc, tmp_path):
    state = tmp_path / "vanishing"
    ioc = start_ioc("--demo", "--globals-only", "--state-dir", str(state))
    ioc.put_ok("Online_CS_RunNumber", 8)
    for path in state.iterdir():
        path.unlink()
    state.rmdir()
    assert ioc.put_refused("Online_CS_RunNumber", 9)
    assert ioc.get("Online_CS_RunNumber") == "8"
    assert (
        f"refused put Online_CS_RunNumber = 9: cannot autosave to {state / 'globals.json'}: "
        "No such file or directory" in ioc.log()
    )

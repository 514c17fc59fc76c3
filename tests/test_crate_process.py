"""The simulated crate as its own process (`dgs-sim`), seen from a running IOC.

Real processes throughout: `dgs-sim` serving a shared-memory window, `dgs-ioc`
attached to it or spawning its own, the CA tools and the project's receiver.
What a user notices: every generated event arrives; killing the crate process
shows read errors while the IOC keeps answering, and a new crate process takes
the next run; a crate process that stops answering shows its register readbacks
INVALID and a setting made meanwhile reaches it once it answers; stopping the
IOC leaves no process and no /dev/shm file behind.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dataflow import (
    CRATE,
    Background,
    crate_toml,
    data_keys,
    generated,
    receiver,
    start_run,
    stop_run,
)
from ioc_harness import BIN, IocProcess, wait_until

from ioc import backends
from ioc.config import load_config
from sim import attach

SHM = Path("/dev/shm")
#: A killed crate process shows within this (heartbeat 0.5 s, reads every 20 ms).
LOST_WITHIN_S = 5.0
#: What the IOC logs, once, when its crate process disappears.
LOST_LINE = "reads fail until it is back"
#: A setting (bits 0..13 of its register) and the register's readback.
THRESHOLD = "VME01:MDIG1:led_threshold0"
THRESHOLD_RBV = "VME01:MDIG1:reg_led_threshold0_RBV"
THRESHOLD_BITS = 0x3FFF
SEVERITIES = ("MINOR", "MAJOR", "INVALID")


class CrateSim:
    """One `dgs-sim --config` process."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.log_path = workdir / f"dgs-sim-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> CrateSim:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "dgs-sim"), "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(self._ready, 30, f"dgs-sim ready ({self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"dgs-sim exited: {self.log_path.read_text()}")
        return "dgs-sim: ready" in self.log_path.read_text()

    def end(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@pytest.fixture
def attach_config(tmp_path: Path) -> Path:
    """The demo crate with ``sim_process = "attach"`` on a window of its own."""
    window = f"dgs-test-{tmp_path.name}"
    path = tmp_path / "attach.toml"
    text = crate_toml().replace(
        "seed = 1\n", f'seed = 1\nsim_process = "attach"\nsim_window = "{window}"\n', 1
    )
    path.write_text(text)
    yield path
    assert not (SHM / window).exists(), "dgs-sim left its window behind"


@pytest.fixture
def crate_sims(attach_config: Path, tmp_path: Path) -> Iterator[list[CrateSim]]:
    """`dgs-sim` processes of the attach configuration; all ended afterwards."""
    sims: list[CrateSim] = []
    yield sims
    for sim in sims:
        sim.end()


def start_sim(sims: list[CrateSim], config: Path, workdir: Path) -> CrateSim:
    sim = CrateSim(config, workdir).start()
    sims.append(sim)
    return sim


def crate_children(ioc: IocProcess) -> list[int]:
    """The crate processes this IOC started (by parent pid and command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat[1]) == ioc.proc.pid and b"sim.process" in cmdline and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_delivers_every_event(ioc: IocProcess) -> None:
    """A short run with a receiver: every event the crate made arrives, per board."""
    rx = Background(receiver(ioc, pipeline=6), max_seconds=90)
    start_run(ioc)
    ioc.wait_numeric(f"DAQC{CRATE}_CV_InLoop1", lambda v: v >= 2, 30, "2 MiB read this run")
    stop_run(ioc)
    tally = rx.join(90)
    expected = generated(ioc)
    assert all(expected.values()), expected
    received = {bid: data_keys(tally.boards[bid].events).size for bid in expected}
    assert received == expected
    assert ioc.getf(f"DAQC{CRATE}_CV_ReadErrors") == 0


def test_an_ioc_attached_to_dgs_sim_receives_every_generated_event(
    start_ioc, attach_config, crate_sims, tmp_path
):
    start_sim(crate_sims, attach_config, tmp_path)
    ioc = start_ioc("--config", str(attach_config))
    assert crate_children(ioc) == [], "an attaching IOC starts no crate process"
    run_delivers_every_event(ioc)


def test_a_second_ioc_on_the_same_crate_window_is_refused_and_the_first_goes_on(
    start_ioc, attach_config, crate_sims, tmp_path
):
    start_sim(crate_sims, attach_config, tmp_path)
    first = start_ioc("--config", str(attach_config))
    second = start_ioc("--config", str(attach_config), wait_ready=False)
    assert second.proc.wait(30) == 2
    lines = second.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert "is already read by another IOC" in lines[0], lines
    assert f"(pid {first.proc.pid})" in lines[0], lines
    run_delivers_every_event(first)


def test_an_ioc_without_its_crate_process_stops_start_up_with_one_line(
    start_ioc, attach_config
):
    ioc = start_ioc("--config", str(attach_config), wait_ready=False)
    assert ioc.proc.wait(30) == 2
    lines = ioc.log().strip().splitlines()
    assert len(lines) == 1 and "no crate process serves window" in lines[0], lines
    assert "dgs-sim --config" in lines[0]


def test_a_killed_dgs_sim_shows_read_errors_and_a_restarted_one_takes_the_next_run(
    start_ioc, attach_config, crate_sims, tmp_path
):
    sim = start_sim(crate_sims, attach_config, tmp_path)
    ioc = start_ioc("--config", str(attach_config))
    start_run(ioc, save="No Save")  # nothing of this run waits for the next run's receiver
    ioc.wait_numeric(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > 0, 30, "data read")

    sim.end(signal.SIGKILL)
    ioc.wait_numeric(f"DAQC{CRATE}_CV_ReadErrors", lambda v: v > 0, LOST_WITHIN_S, "read errors")
    asked = time.monotonic()
    assert ioc.get(f"DAQC{CRATE}_CV_State") == "Running"
    assert time.monotonic() - asked < 2.0, "the IOC answers promptly without its crate"
    stop_run(ioc)
    assert ioc.log().count(LOST_LINE) == 1, "the loss is logged once"

    start_sim(crate_sims, attach_config, tmp_path)
    run_delivers_every_event(ioc)


def test_a_start_looks_for_a_restarted_crate_process_at_once(
    attach_config, crate_sims, tmp_path, monkeypatch
):
    """Reads look for a lost crate process only now and then; a Start must not wait for
    the next look, or a run started as soon as the crate is back begins with read errors."""
    monkeypatch.setattr(attach, "RETRY_S", 3600.0)
    first = start_sim(crate_sims, attach_config, tmp_path)
    crate = backends.build(load_config(attach_config).crates[0])
    try:
        first.end(signal.SIGKILL)
        wait_until(lambda: crate.live_window() is None, LOST_WITHIN_S, "the crate lost")
        start_sim(crate_sims, attach_config, tmp_path)
        assert crate.live_window() is None, "reads look again only after RETRY_S"
        crate.before_run()
        assert crate.lost is None
        assert crate.live_window() is not None
    finally:
        crate.close()


def test_a_spawned_crate_process_that_dies_is_started_again(start_ioc):
    ioc = start_ioc("--demo")
    [first] = crate_children(ioc)
    start_run(ioc, save="No Save")
    ioc.wait_numeric(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > 0, 30, "data read")
    subprocess.run(["kill", "-9", str(first)], check=True)
    ioc.wait_numeric(f"DAQC{CRATE}_CV_ReadErrors", lambda v: v > 0, LOST_WITHIN_S, "read errors")
    stop_run(ioc)
    wait_until(lambda: [pid for pid in crate_children(ioc) if pid != first], 15, "a new crate")
    wait_until(lambda: "settings restored" in ioc.log(), 15, "the IOC to re-attach")
    run_delivers_every_event(ioc)


def threshold_shown(ioc: IocProcess) -> tuple[int, str]:
    """The threshold's readback: (its bits, severity) as `caget -a` prints them."""
    fields = ioc.tool("caget", "-a", "-w", "5", THRESHOLD_RBV).stdout.split()
    assert fields and fields[0] == THRESHOLD_RBV, f"caget -a: {fields}"
    severity = fields[-1] if fields[-1] in SEVERITIES else "NO_ALARM"
    return int(fields[3]) & THRESHOLD_BITS, severity


def test_a_frozen_crate_process_shows_invalid_readbacks_and_gets_the_setting_made_meanwhile(
    start_ioc, attach_config, crate_sims, tmp_path
):
    sim = start_sim(crate_sims, attach_config, tmp_path)
    ioc = start_ioc("--config", str(attach_config))
    ioc.put_ok(THRESHOLD, 1234)
    wait_until(lambda: threshold_shown(ioc) == (1234, "NO_ALARM"), 5, "the readback")

    assert sim.proc is not None
    sim.proc.send_signal(signal.SIGSTOP)  # alive but silent, as a hung bus bridge
    try:
        wait_until(lambda: threshold_shown(ioc)[1] == "INVALID", LOST_WITHIN_S,
                   "the readback INVALID")
        ioc.put_ok(THRESHOLD, 777)
        assert threshold_shown(ioc) == (1234, "INVALID")
    finally:
        sim.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: threshold_shown(ioc) == (777, "NO_ALARM"), 15,
               "the setting applied and the readback valid")
    assert "registers answer again" in ioc.log()
    run_delivers_every_event(ioc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_ended_ioc_leaves_no_crate_process_and_no_window(start_ioc, sig):
    ioc = start_ioc("--demo")
    [child] = crate_children(ioc)
    window = SHM / f"dgs-sim-{CRATE}-ioc{ioc.proc.pid}"
    assert window.exists()
    start_run(ioc)
    if sig == signal.SIGTERM:
        assert ioc.stop(sig, timeout=15) == 0
    else:
        ioc.kill()
    wait_until(lambda: gone(child), 10, "the crate process to end")
    wait_until(lambda: not window.exists(), 10, "the window file to go")

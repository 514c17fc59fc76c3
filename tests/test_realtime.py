"""inLoop under the real-time policy, where the host permits it (issue 15, part 4).

With ``[crate.inloop] realtime_priority`` set, the reader thread runs under
SCHED_FIFO at that priority so busy neighbours cannot keep it from the FIFOs,
and the IOC's other ordinary threads (Python's; EPICS runs its own under the
real-time policy where it may) at priority 1, below it, so none is pre-empted
by a neighbour while holding the interpreter lock the reader needs;
an operator sees it in ``DAQC01_CV_RealTime``. Without the privilege the IOC says
so once, shows "Refused" with a MINOR alarm, and reads on.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from dataflow import CRATE, Pva, write_config
from ioc_harness import IocProcess, Ports

from ioc.realtime import frozen_heap

SCHED_FIFO = 1
#: DAQC01_CV_RealTime states.
ON, REFUSED = 1, 2
PRIORITY = 20
REALTIME = f"DAQC{CRATE}_CV_RealTime"
STATE = f"DAQC{CRATE}_CV_State"
POLLS = f"DAQC{CRATE}_CV_InLoop3"
SIM_PRIORITY = 30
SETTINGS = {"realtime_priority": PRIORITY, "run_switch_interval_s": 0.001}
#: Runs a command without the privilege to change scheduling policies, even as root.
WITHOUT_SYS_NICE = ("setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice")


def host_permits_realtime() -> bool:
    """Whether a process started like the IOC may use SCHED_FIFO here."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def thread_policies(pid: int) -> dict[str, list[tuple[int, int]]]:
    """By thread name: (policy, real-time priority) of the threads of ``pid`` (proc(5))."""
    policies: dict[str, list[tuple[int, int]]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name, _, rest = (task / "stat").read_text().partition(" (")[2].rpartition(")")
        fields = rest.split()
        policies.setdefault(name, []).append((int(fields[41 - 3]), int(fields[40 - 3])))
    return policies


def crate_processes(pid: int) -> list[int]:
    """The crate processes (`sim.process`) among the children of ``pid`` (proc(5))."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"sim.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def crate(tmp_path: Path, launcher: tuple[str, ...] = ()) -> Iterator[IocProcess]:
    config = write_config(tmp_path, inloop=SETTINGS)
    config.write_text(config.read_text().replace(
        "[[crate]]\n", f"[[crate]]\nsim_realtime_priority = {SIM_PRIORITY}\n", 1))
    ports = Ports.allocate()
    argv = ["--config", str(config), "--data-port", str(ports.data),
            "--state-dir", str(tmp_path / "state")]
    ioc = IocProcess(argv, tmp_path, ports, launcher=launcher).start()
    try:
        yield ioc
    finally:
        ioc.kill()


def start_reading(pva: Pva) -> None:
    """A Start polls the boards, whatever the policy."""
    pva.put("Online_CS_SaveData", 0)
    pva.put("Online_CS_StartStop", 1)
    pva.wait(STATE, lambda v: v == 1, 15, "Running")
    pva.wait(POLLS, lambda polls: polls > 10, 15, "inLoop polling the boards")


def stop_reading(pva: Pva) -> None:
    pva.put("Online_CS_StartStop", 0)
    pva.wait(STATE, lambda v: v == 0, 30, "Stopped")


def test_the_reader_runs_above_every_other_thread_and_they_above_ordinary_processes(tmp_path):
    permitted = host_permits_realtime()
    for ioc in crate(tmp_path):
        with Pva(ioc) as pva:
            pva.wait(REALTIME, lambda state: state == (ON if permitted else REFUSED), 10,
                     "the real-time state published")
            start_reading(pva)  # every thread started by then is placed for the run
            threads = thread_policies(ioc.proc.pid)
            assert threads["inLoop"] == [(SCHED_FIFO, PRIORITY) if permitted else (0, 0)]
            lowest = (SCHED_FIFO, 1) if permitted else (0, 0)
            assert threads["outLoop"] == threads["sender"] == [lowest]
            assert set(threads["python"]) == {lowest}  # the main thread and softioc's
            if permitted:  # EPICS's own threads keep the policy EPICS gave them
                assert all(policy == SCHED_FIFO for name in threads
                           for policy, _ in threads[name]), threads
            # the simulated boards make their events on time, as hardware would
            (crate_process,) = crate_processes(ioc.proc.pid)
            main_thread = thread_policies(crate_process)["python"][0]
            assert main_thread == ((SCHED_FIFO, SIM_PRIORITY) if permitted else (0, 0))
            stop_reading(pva)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv can drop the privilege only as root")
def test_without_the_privilege_the_ioc_says_so_and_reads_on(tmp_path):
    for ioc in crate(tmp_path, launcher=WITHOUT_SYS_NICE):
        with Pva(ioc) as pva:
            pva.wait(REALTIME, lambda state: state == REFUSED, 10, "Refused published")
            assert pva.get(REALTIME).severity == 1  # MINOR: the operator sees it on the screen
            assert thread_policies(ioc.proc.pid)["inLoop"] == [(0, 0)]
            start_reading(pva)
            stop_reading(pva)
        refusals = [line for line in ioc.log().splitlines() if "inLoop: real-time priority" in line]
        assert len(refusals) == 1 and "refused" in refusals[0]


def test_a_run_keeps_what_existed_at_start_out_of_the_collectors_reach_and_collects_its_own():
    """A full collection walks only what the run created (inLoop's lock stays short),
    and the run's own garbage cycles are still collected."""

    class Node:
        pass

    before = Node()
    before.self = before  # a cycle that exists at Start
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        during = Node()
        during.self = during
        gone = weakref.ref(during)
        del during
        gc.collect()
        assert gone() is None  # the run's own cycle is collected
    assert gc.get_freeze_count() == 0
    kept = weakref.ref(before)
    del before
    gc.collect()
    assert kept() is None  # thawed at the end: collected as usual again

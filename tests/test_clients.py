"""The IOC with the clients operators and scripts use: pyepics and camonitor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

from ioc_harness import BIN, wait_until

PYEPICS_SCRIPT = textwrap.dedent(
    """
    import json, time
    import epics

    def wait(predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            time.sleep(0.05)

    rates = []
    rate = epics.PV("DAQC01_OL_DataRate2", callback=lambda value=None, **_: rates.append(value))
    epics.caput("Online_CS_SaveData", "No Save", wait=True)
    epics.caput("Online_CS_StartStop", "Start", wait=True)
    wait(lambda: epics.caget("DAQC01_CV_State", as_string=True) == "Running", 15)
    wait(lambda: any(r and r > 0 for r in rates), 15)
    enum_strs = epics.cainfo("Online_CS_StartStop", print_out=False)
    epics.caput("Online_CS_StartStop", 0, wait=True)
    wait(lambda: epics.caget("DAQC01_CV_State", as_string=True) == "Stopped", 20)
    print(json.dumps({
        "max_rate": max(r for r in rates if r is not None),
        "free": epics.caget("DAQC01_CV_BuffersAvail"),
        "start_stop": epics.caget("Online_CS_StartStop", as_string=True),
        "info_has_enums": "Start" in enum_strs,
    }))
    """
)


def test_pyepics_script_runs_a_crate(demo_ioc):
    out = subprocess.run(
        [sys.executable, "-c", PYEPICS_SCRIPT],
        env=demo_ioc.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_rate"] > 0
    assert result["start_stop"] == "Stop"
    assert result["info_has_enums"]
    wait_until(lambda: demo_ioc.getf("DAQC01_CV_BuffersAvail") == 200, 10, "pool whole")


def test_camonitor_follows_a_run_through_draining_to_stopped(demo_ioc):
    ioc = demo_ioc
    monitor = subprocess.Popen(
        [str(BIN / "camonitor"), "-t", "n", "DAQC01_CV_State"],
        env=ioc.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(monitor.stdout), daemon=True)
    reader.start()

    def states() -> list[str]:
        return [line.split()[-1] for line in list(lines) if line.startswith("DAQC01_CV_State")]

    try:
        wait_until(states, 20, "camonitor's first value")  # connected before the run starts
        ioc.put_ok("Online_CS_StartStop", "Start")
        ioc.wait_value("DAQC01_CV_State", "Running")
        ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 5)
        ioc.put_ok("Online_CS_StartStop", "Stop")
        ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
        wait_until(lambda: states()[-1:] == ["Stopped"] and len(states()) > 1, 10,
                   "camonitor to show Stopped")
    finally:
        os.killpg(monitor.pid, signal.SIGKILL)  # the AppImage tool ignores SIGTERM
        monitor.wait(10)
        reader.join(10)
    seen = states()
    assert seen[0] == "Stopped"
    assert seen[1:] == ["Running", "Draining", "Stopped"]


def test_the_readme_tools_exit_non_zero_when_they_fail(demo_ioc):
    """`export PATH=$PWD/.venv/bin:$PATH` then `caget ...`, as the README says: a script can
    tell a failure from its exit code, and the message goes to stderr."""
    env = {**demo_ioc.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=30
        )

    for command in ("caget -w 1 NO_SUCH_PV", "caput -w 1 NO_SUCH_PV 1", "pvget -w 1 NO_SUCH_PV"):
        failed = shell(command)
        assert failed.returncode != 0, f"{command}: {failed.stdout}{failed.stderr}"
    assert "NO_SUCH_PV" in shell("caget -w 1 NO_SUCH_PV").stderr
    found = shell("caget -t DAQC01_CV_State")
    assert (found.returncode, found.stdout.strip()) == (0, "Stopped"), found.stderr

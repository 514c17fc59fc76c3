"""Access security enforced by the IOC (db/dgs.acf, db/dgs-run-protect.acf).

By default, as in the original, the crate set-up (RUNPROTECT group: board
enables, FifoNum, package data, check enables) is writable at any time and
applies at the next Start; the crate screen shows that a change is pending.
With ``run_protect = true`` those records refuse writes while
``Online_CS_StartStop`` = Start. Statistics refuse writes always, run control
stays writable, and every accepted write is logged with who made it.
"""

from __future__ import annotations

from pathlib import Path

from dataflow import crate_toml
from ioc_harness import IocProcess, wait_until

PROTECTED = {
    "VME01:MDIG1:CS_Ena": ("Disable", "Enable"),
    "VME01:MDIG2:FifoNum": ("MONFIFO 3", "MAIN DATA FIFO"),
    "VME01:MDIG3:user_package_data": ("113", "103"),
    "DAQC01_OL_HeaderCheckEnable": ("0", "1"),
}
ALWAYS_WRITABLE = (
    "Online_CS_StartStop",
    "Online_CS_SaveData",
    "Online_CS_RunNumber",
    "DAQC01_CS_TraceBd",
    "VME01:MDIG1:SIM_Fault",
    "VME01:MDIG1:SIM_EventRate",
)
STATISTICS = ("DAQC01_OL_DataRate0", "DAQC01_CV_BuffersAvail", "DAQC01_CV_State")
DENIED = "Write access denied"


def access(ioc: IocProcess, *names: str) -> str | list[str]:
    """The access rights a CA client gets, as `cainfo` prints them ("read, write")."""
    out = ioc.tool("cainfo", "-w", "5", *names)
    assert out.returncode == 0, out.stdout + out.stderr
    rights = [
        line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if "Access:" in line
    ]
    assert len(rights) == len(names), out.stdout
    return rights[0] if len(names) == 1 else rights


def refused(ioc: IocProcess, name: str, value: str) -> bool:
    out = ioc.caput(name, value)
    return DENIED in out.stdout + out.stderr


def wait_access(ioc: IocProcess, name: str, rights: str) -> None:
    wait_until(lambda: access(ioc, name) == rights, 10, f"{name} access {rights!r}", 0.1)


def run_protected_config(directory: Path) -> Path:
    """The demo crate as a file, with ``[system] run_protect = true``."""
    path = directory / "protected.toml"
    path.write_text(crate_toml().replace("[system]", "[system]\nrun_protect = true", 1))
    return path


def test_with_run_protect_set_up_is_refused_during_a_run_and_accepted_after_stop(
    start_ioc, tmp_path
):
    ioc = start_ioc("--config", str(run_protected_config(tmp_path)))
    wait_access(ioc, "VME01:MDIG1:CS_Ena", "read, write")
    ioc.put_ok("VME01:MDIG1:CS_Ena", "Disable")
    assert ioc.get("VME01:MDIG1:CS_Ena") == "Disable"
    ioc.put_ok("VME01:MDIG1:CS_Ena", "Enable")

    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")
    wait_access(ioc, "VME01:MDIG1:CS_Ena", "read, no write")
    for name, (changed, _) in PROTECTED.items():
        assert refused(ioc, name, changed), name
    assert ioc.caget(*PROTECTED) == [boot for _, boot in PROTECTED.values()]
    pva = ioc.tool("pvput", "-w", "5", "VME01:MDIG1:CS_Ena", "Disable")
    assert "not permitted" in pva.stdout + pva.stderr
    assert ioc.get("VME01:MDIG1:CS_Ena") == "Enable"
    assert access(ioc, *ALWAYS_WRITABLE) == ["read, write"] * len(ALWAYS_WRITABLE)
    ioc.put_ok("DAQC01_CS_TraceBd", 2)
    assert ioc.get("DAQC01_CS_TraceBd") == "2"
    for name in STATISTICS:
        assert refused(ioc, name, "5"), name

    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
    wait_access(ioc, "VME01:MDIG1:CS_Ena", "read, write")
    for name, (changed, _) in PROTECTED.items():
        ioc.put_ok(name, changed)
    assert ioc.caget(*PROTECTED) == [changed for changed, _ in PROTECTED.values()]
    for name in STATISTICS:
        assert refused(ioc, name, "5"), name
    assert ioc.getf("DAQC01_CV_BuffersAvail") == 200

    log = ioc.log()
    assert "put VME01:MDIG1:CS_Ena by " in log
    assert "Enable -> Disable" in log and "Disable -> Enable" in log
    assert "put VME01:MDIG3:user_package_data by" in log and ": 103 -> 113" in log
    assert "put Online_CS_StartStop by" in log and "Stop -> Start" in log


def test_only_values_are_writable_never_record_configuration(shared_demo_ioc):
    ioc = shared_demo_ioc
    assert refused(ioc, "DAQC01_CS_TraceBd.DESC", "renamed")
    assert refused(ioc, "Online_CS_StartStop.ZNAM", "Halt")
    assert ioc.get("Online_CS_StartStop.ZNAM") == "Stop"


def test_remote_globals_protect_the_crate_and_an_unreachable_globals_ioc_freezes_it(
    start_ioc, tmp_path
):
    globals_ioc = start_ioc("--demo", "--globals-only")
    crate = start_ioc(
        "--config", str(run_protected_config(tmp_path)),
        "--globals", "remote", "--globals-ca", f"127.0.0.1:{globals_ioc.ports.ca}",
    )
    wait_access(crate, "VME01:MDIG1:FifoNum", "read, write")
    globals_ioc.put_ok("Online_CS_StartStop", "Start")
    wait_access(crate, "VME01:MDIG1:FifoNum", "read, no write")
    assert refused(crate, "VME01:MDIG1:FifoNum", "MONFIFO 2")
    globals_ioc.put_ok("Online_CS_StartStop", "Stop")
    wait_access(crate, "VME01:MDIG1:FifoNum", "read, write")
    crate.put_ok("VME01:MDIG1:FifoNum", "MONFIFO 2")
    assert "put Online_CS_StartStop by" in globals_ioc.log()

    globals_ioc.stop()
    wait_access(crate, "VME01:MDIG1:FifoNum", "read, no write")
    assert access(crate, "DAQC01_CS_TraceBd") == "read, write"


def test_by_default_set_up_is_writable_in_a_run_and_applies_at_the_next_start(demo_ioc):
    """A board disabled during a run keeps taking data until the next Start, where it
    stops; the crate shows the change as pending meanwhile."""
    ioc = demo_ioc
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")
    assert access(ioc, *PROTECTED) == ["read, write"] * len(PROTECTED)
    assert ioc.get("DAQC01_CV_SetupPending") == "Applied"
    for name, (changed, _) in PROTECTED.items():
        ioc.put_ok(name, changed)
    assert ioc.caget(*PROTECTED) == [changed for changed, _ in PROTECTED.values()]
    ioc.wait_value("DAQC01_CV_SetupPending", "Pending until next Start")
    before = ioc.getf("DAQC01_OL_Data0")
    ioc.wait_numeric("DAQC01_OL_Data0", lambda mib: mib > before, what="MDIG1 still read")
    for name in STATISTICS:
        assert refused(ioc, name, "5"), name

    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
    assert ioc.get("DAQC01_CV_SetupPending") == "Applied"
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")
    ioc.wait_numeric("DAQC01_OL_Data0", lambda mib: mib == 0, what="the new run's counters")
    first = ioc.wait_numeric("DAQC01_OL_Data2", lambda mib: mib > 0, what="MDIG3 read")
    ioc.wait_numeric("DAQC01_OL_Data2", lambda mib: mib > first, what="more from MDIG3")
    assert ioc.getf("DAQC01_OL_Data0") == 0, "the disabled board was read in the new run"
    assert ioc.getf("VME01:MDIG1:SIM_Generated") == 0
    assert ioc.get("DAQC01_CV_SetupPending") == "Applied"
    ioc.put_ok("VME01:MDIG1:CS_Ena", "Enable")
    ioc.wait_value("DAQC01_CV_SetupPending", "Pending until next Start")
    ioc.put_ok("VME01:MDIG1:CS_Ena", "Disable")  # as the run started: nothing pending
    ioc.wait_value("DAQC01_CV_SetupPending", "Applied")
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
    assert "put VME01:MDIG1:CS_Ena by " in ioc.log()

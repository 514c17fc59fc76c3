"""Access security enforced by the IOC (db/dgs.acf): the crate set-up is frozen during a run.

RUNPROTECT records refuse writes while ``Online_CS_StartStop`` = Start, statistics
refuse them always, run control stays writable, and every accepted write is
logged with who made it.
"""

from __future__ import annotations

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


def test_set_up_is_refused_during_a_run_and_accepted_after_stop(demo_ioc):
    ioc = demo_ioc
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


def test_remote_globals_protect_the_crate_and_an_unreachable_globals_ioc_freezes_it(start_ioc):
    globals_ioc = start_ioc("--demo", "--globals-only")
    crate = start_ioc(
        "--demo", "--globals", "remote", "--globals-ca", f"127.0.0.1:{globals_ioc.ports.ca}"
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

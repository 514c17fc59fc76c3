"""Display limits and alarm severities as clients see them (caget of fields, caget -a).

The original's limits (TraceBd 0..15, TraceChan 0..9, TraceLen -5..1024) and the
table's ranges reach LOPR/HOPR; a healthy crate shows NO_ALARM, and a read
error, a fatal check error or lost globals raise the severity a Phoebus border
and an alarm server show.
"""

from __future__ import annotations

from ioc_harness import IocProcess, Ports, free_port, wait_until
from test_operator import system_toml

LIMITS = {
    "DAQC01_CS_TraceBd": (0, 15),
    "DAQC01_CS_TraceChan": (0, 9),
    "DAQC01_CV_TraceLen": (-5, 1024),
    "VME01:MDIG1:user_package_data": (0, 4094),
    "VME01:MDIG1:SIM_TraceLength": (0, 992),
    "DAQC01_OL_BufLostPerecnt": (0, 100),
    "Online_CS_RunNumber": (0, 2147483647),
}
SEVERITIES = ("MINOR", "MAJOR", "INVALID")
WATCHED = (
    "DAQC01_CV_BuffersOK",
    "DAQC01_CV_GlobalsConnected",
    "DAQC01_CV_State",
    "DAQC01_CV_ReadErrors",
    "DAQC01_OL_Errors1",
    "DAQC01_OL_DataLost2",
    "DAQC01_OL_BufLostPerecnt",
    "DAQC01_OL_TotalBufsLost",
    "DAQC01_OL_LostCheck",
    "DAQC01_OL_LostEventsCheck",
    "DAQC01_CV_InLoop4",
)


def severity(ioc: IocProcess, name: str) -> str:
    """The alarm severity `caget -a` prints after the value (nothing when NO_ALARM)."""
    out = ioc.tool("caget", "-a", "-w", "5", name)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.split()[-1]
    return last if last in SEVERITIES else "NO_ALARM"


def wait_severity(ioc: IocProcess, name: str, expected: str, timeout: float = 15.0) -> None:
    wait_until(lambda: severity(ioc, name) == expected, timeout, f"{name} in {expected}", 0.2)


def test_display_limits_of_the_original_and_of_the_table(shared_demo_ioc):
    ioc = shared_demo_ioc
    for name, (low, high) in LIMITS.items():
        lopr, hopr = (float(v) for v in ioc.caget(f"{name}.LOPR", f"{name}.HOPR"))
        assert (lopr, hopr) == (low, high), name
    # The limits do not clamp: an out-of-range write is still refused, value unchanged.
    assert ioc.put_refused("DAQC01_CS_TraceBd", 16)
    assert ioc.get("DAQC01_CS_TraceBd") == "0"


def test_alarm_thresholds_of_the_loss_percentage(shared_demo_ioc):
    fields = shared_demo_ioc.caget(*(f"DAQC01_OL_BufLostPerecnt.{f}"
                                     for f in ("HIGH", "HSV", "HIHI", "HHSV")))
    assert [float(fields[0]), fields[1], float(fields[2]), fields[3]] == [1, "MINOR", 10, "MAJOR"]


def test_a_healthy_crate_shows_no_alarm_and_faults_raise_severities(demo_ioc):
    ioc = demo_ioc
    ioc.wait_value("DAQC01_CV_GlobalsConnected", "Connected")
    for name in WATCHED:
        assert severity(ioc, name) == "NO_ALARM", name
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")
    # faults are accepted for the boards inLoop reads in this run: wait until it reads them
    ioc.wait_numeric("DAQC01_CV_InLoop3", lambda v: v > 0, what="inLoop polling this run")
    ioc.put_ok("VME01:MDIG2:SIM_Fault", "Read error")
    ioc.wait_numeric("DAQC01_CV_ReadErrors", lambda v: v >= 1, what="the read error counted")
    wait_severity(ioc, "DAQC01_CV_ReadErrors", "MINOR")
    ioc.put_ok("VME01:MDIG2:SIM_Fault", "Bad marker")
    wait_severity(ioc, "DAQC01_OL_Errors1", "MINOR")
    ioc.put_ok("VME01:MDIG3:SIM_Fault", "Bad length")
    for name in ("DAQC01_OL_DataLost2", "DAQC01_OL_LostCheck", "DAQC01_OL_LostEventsCheck"):
        wait_severity(ioc, name, "MINOR")
    assert severity(ioc, "DAQC01_CV_BuffersOK") == "NO_ALARM"
    assert severity(ioc, "DAQC01_OL_Errors0") == "NO_ALARM"
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
    ioc.put_ok("Online_CS_StartStop", "Start")  # a new run starts clean
    ioc.wait_value("DAQC01_CV_State", "Running")
    for name in ("DAQC01_CV_ReadErrors", "DAQC01_OL_Errors1", "DAQC01_OL_LostCheck"):
        wait_severity(ioc, name, "NO_ALARM")
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)


def test_unreachable_globals_are_a_major_alarm(start_ioc, tmp_path):
    ports = Ports.allocate()
    config = tmp_path / "system.toml"
    config.write_text(system_toml(free_port(), {"01": ports}))
    ioc = start_ioc("--config", str(config), "--crate", "01", ports=ports)
    assert ioc.get("DAQC01_CV_GlobalsConnected") == "Disconnected"
    assert severity(ioc, "DAQC01_CV_GlobalsConnected") == "MAJOR"

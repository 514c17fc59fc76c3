"""Run control and the data path up to qSender, on a real demo crate process."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from dataflow import Pva, sim_figures
from ioc_harness import wait_until
from p4p.client.thread import Context

ENABLED = ("MDIG1", "MDIG2", "MDIG3", "MDIG4")
#: EPICS alarm severity MINOR, as p4p reports it.
MINOR = 1


def start_run(ioc, save: str = "No Save") -> None:
    ioc.put_ok("Online_CS_SaveData", save)
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")


def stop_run(ioc) -> None:
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)


def test_start_by_string_and_by_number_and_only_enabled_boards_deliver(demo_ioc):
    ioc = demo_ioc
    ioc.put_ok("VME01:MDIG2:CS_Ena", "Disable")
    start_run(ioc)
    for card in (0, 2, 3):
        ioc.wait_numeric(f"DAQC01_OL_Data{card}", lambda v: v > 0, what=f"card {card} data")
        ioc.wait_numeric(f"DAQC01_OL_DataRate{card}", lambda v: v > 0)
    assert ioc.get("DAQC01:inLoop_Running") == "Running"
    assert ioc.getf("VME01:MDIG2:SIM_Generated") == 0
    # Set-up is sampled at Start: enabling a board during a run applies at the next one.
    ioc.put_ok("VME01:MDIG2:CS_Ena", "Enable")
    assert ioc.get("VME01:MDIG2:CS_Ena") == "Enable"
    ioc.wait_numeric("DAQC01_OL_Data0", lambda v: v > 1, what="more data from card 0")
    assert ioc.getf("DAQC01_OL_Data1") == 0
    assert ioc.getf("DAQC01_OL_DataRate1") == 0
    stop_run(ioc)

    ioc.put_ok("Online_CS_StartStop", 1)
    ioc.wait_value("DAQC01_CV_State", "Running")
    ioc.wait_numeric("DAQC01_OL_Data1", lambda v: v > 0, what="card 1 data after re-enable")
    assert ioc.getf("VME01:MDIG2:SIM_Generated") > 0
    ioc.put_ok("Online_CS_StartStop", 0)
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)


def test_stop_drains_with_one_end_of_run_header_per_board_and_pool_whole(demo_ioc):
    ioc = demo_ioc
    states: list[str] = []
    start_run(ioc)
    ioc.wait_numeric("DAQC01_CV_InLoop1", lambda v: v >= 0)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 10)
    ctx = Context("pva", conf=ioc.ports.p4p_conf(), useenv=False)
    sub = ctx.monitor("DAQC01_CV_State", lambda v: states.append(str(v)))
    try:
        before = ioc.getf("DAQC01_CV_InLoop2")
        ioc.put_ok("Online_CS_StartStop", "Stop")
        ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
        wait_until(lambda: "Stopped" in states[1:], 5, "Stopped seen by the monitor")
    finally:
        sub.close()
        ctx.close()
    assert "Draining" in states
    assert states.index("Draining") < len(states) - 1 - states[::-1].index("Stopped")
    after = ioc.getf("DAQC01_CV_InLoop2")
    # Exactly one 0xD per enabled board, plus at most one 0xE per board in the drain.
    assert len(ENABLED) <= after - before <= 2 * len(ENABLED)
    assert ioc.get("DAQC01:inLoop_Running") == "Stopped"
    ioc.wait_value("DAQC01_CV_BuffersAvail", "200")
    assert ioc.get("DAQC01_CV_BuffersOK") == "OK"
    assert ioc.getf("DAQC01_OL_TotalBufsLost") == 0
    assert ioc.getf("DAQC01_OL_BufLostPerecnt") == 0
    for card in range(7):  # rates are forced to 0 at the next publication after the drain
        ioc.wait_numeric(f"DAQC01_OL_DataRate{card}", lambda rate: rate == 0, 5)


def test_save_without_a_receiver_keeps_the_memory_budget_then_counts_what_it_discards(demo_ioc):
    """Nobody takes data: the crate keeps >= 180 MiB (not 100 buffers) with no FIFO
    overflow, then discards whole buffers, counted per board as memory losses; the
    trace stays live. The next Start drops what nobody took, counted as superseded."""
    ioc = demo_ioc
    with Pva(ioc) as pva:  # no tool processes beside the crate while it runs
        for name in ("MDIG1", "MDIG2", "MDIG3", "MDIG4"):
            pva.put(f"VME01:{name}:SIM_EventRate", 2000)
        pva.put("Online_CS_SaveData", 1)
        pva.put("Online_CS_StartStop", 1)
        pva.wait("DAQC01_OL_TotalBufsLost", lambda v: v > 0, 60, "the first discard")
        kept = pva.number("DAQC01_CV_Retained")
        assert kept >= 180, f"only {kept:.1f} MiB kept before discarding"
        wait_until(lambda: all(pva.get("DAQC01_OL_LostMemory")[:4] > 0), 10,
                   "discards on every board")
        lost_memory = pva.get("DAQC01_OL_LostMemory")
        assert not any(lost_memory[4:])
        assert all(pva.get("DAQC01_OL_LostEventsMemory")[:4] > 0)
        lost = [pva.number(f"DAQC01_OL_DataLost{card}") for card in range(4)]
        assert lost == pytest.approx(list(lost_memory[:4]), abs=0.01)
        assert pva.number("DAQC01_OL_BufLostPerecnt") > 0
        for name in ("DAQC01_OL_LostMemory", "DAQC01_OL_TotalBufsLost", "DAQC01_OL_DataLost0"):
            assert pva.get(name).severity == MINOR, f"{name} shows no alarm"
        trace_before = pva.get("DAQC01_CV_Trace").copy()
        wait_until(lambda: not np.array_equal(pva.get("DAQC01_CV_Trace"), trace_before), 10,
                   "the trace to keep updating while data are discarded")
        for name in ("MDIG1", "MDIG2", "MDIG3", "MDIG4"):
            figures = sim_figures(pva, name)
            assert figures.cleared == figures.dropped == 0, f"{name} FIFO overflowed"
    stop_run(ioc)
    assert ioc.get("DAQC01_CV_BuffersOK") == "OK"
    assert ioc.getf("DAQC01_CV_Retained") >= 180, "stopping threw away the retained data"
    start_run(ioc, save="Save")
    with Pva(ioc) as pva:
        wait_until(lambda: sum(pva.get("DAQC01_OL_LostSuperseded")) >= 180, 10,
                   "the dropped leftovers counted as superseded")
        assert pva.number("DAQC01_OL_TotalBufsLost") == 0, "the new run starts counting at 0"
    assert "counted as superseded" in ioc.log()
    stop_run(ioc)


def test_out_of_range_and_unknown_enum_writes_are_refused(shared_demo_ioc):
    ioc = shared_demo_ioc
    cases = {
        "Online_CS_StartStop": ["2", "-1", "Go"],
        "Online_CS_SaveData": ["2", "Maybe"],
        "Online_CS_RunNumber": ["-1", "2147483648"],
        "VME01:MDIG1:CS_Ena": ["2", "On"],
        "VME01:MDIG1:FifoNum": ["16", "-1", "MONFIFO 9"],
        "VME01:MDIG1:user_package_data": ["4095", "-1", "102"],
        "VME01:X:CS_Ena": ["1"],
        "VME01:X:FifoNum": ["3"],
        "DAQC01_CS_TraceBd": ["16", "-1"],
        "DAQC01_CS_TraceChan": ["10", "-1"],
        "DAQC01_CS_TraceHorns": ["2", "Maybe"],
        "DAQC01_OL_HeaderCheckEnable": ["2", "0.5", "-1"],
        "DAQC01_OL_TimestampCheckEnable": ["2"],
        "DAQC01_OL_DeepCheckEnable": ["3"],
        "DAQC01_OL_HeaderSummaryPrescale": ["-1"],
        "VME01:MDIG1:SIM_EventRate": ["-1", "1000001"],
        "VME01:MDIG1:SIM_TraceLength": ["993", "-2", "201", "1000"],
        "VME01:MDIG1:SIM_HeaderType": ["2", "XYZ"],
        "VME01:MDIG1:SIM_Fault": ["7", "Meteor", "Bad marker"],  # not running: refused
    }
    for name, values in cases.items():
        before = ioc.get(name)
        for value in values:
            assert ioc.put_refused(name, value), f"{name} = {value} was accepted"
            assert ioc.get(name) == before, f"{name} changed after refused {value}"
    ioc.put_ok("VME01:MDIG1:SIM_TraceLength", 100)
    assert ioc.get("VME01:MDIG1:SIM_TraceLength") == "100"
    ioc.put_ok("VME01:MDIG1:SIM_TraceLength", 200)


def test_trace_length_and_horns(demo_ioc):
    ioc = demo_ioc
    ioc.put_ok("VME01:MDIG3:SIM_TraceLength", 120)
    ioc.put_ok("DAQC01_CS_TraceBd", 2)
    ioc.put_ok("DAQC01_CS_TraceChan", 4)
    start_run(ioc)
    ioc.wait_numeric("DAQC01_CV_TraceLen", lambda v: v == 120, what="TraceLen 120")
    ctx = Context("pva", conf=ioc.ports.p4p_conf(), useenv=False)
    try:
        hidden = np.asarray(ctx.get("DAQC01_CV_Trace")).astype(np.uint16)
        assert hidden.size == 120, "the trace holds its valid samples only (X: 0..TraceLen)"
        assert hidden.any()
        assert (hidden & 0xC000 == 0).all()
        ioc.put_ok("DAQC01_CS_TraceHorns", "Show")
        ioc.put_ok("VME01:MDIG3:SIM_TraceLength", 0)
        ioc.wait_numeric("DAQC01_CV_TraceLen", lambda v: v == 0, what="TraceLen 0")
        assert np.asarray(ctx.get("DAQC01_CV_Trace")).size == 0
    finally:
        ctx.close()
    stop_run(ioc)


def test_each_fault_shows_in_the_right_card(demo_ioc):
    ioc = demo_ioc
    start_run(ioc)
    ioc.put_ok("VME01:MDIG2:SIM_Fault", "Bad marker")
    ioc.wait_value("VME01:MDIG2:SIM_Fault", "None")  # a command: it returns to None
    ioc.wait_numeric("DAQC01_OL_Errors1", lambda v: v >= 1, what="code 2 counted")

    def first_error(card: int) -> list[float]:
        return [float(x) for x in ioc.pva(f"DAQC01_OL_FirstError{card}")]

    assert first_error(1)[0] == 2
    assert first_error(1)[3] == 0xDEADBEEF
    ioc.put_ok("DAQC01_CS_TraceBd", 5)
    ioc.wait_numeric("DAQC01_CV_OutLoop0", lambda v: v == 2, what="OutLoop0 shows code 2")

    ioc.put_ok("VME01:MDIG3:SIM_Fault", "Bad length")
    ioc.wait_numeric("DAQC01_OL_DataLost2", lambda v: v > 0, what="fatal discard counted")
    assert first_error(2)[0] == 5 and first_error(2)[3] == 600

    ioc.put_ok("VME01:MDIG4:SIM_Fault", "Timestamp regression")
    ioc.wait_numeric("DAQC01_OL_Errors3", lambda v: v >= 1, what="code 8 counted")
    assert first_error(3)[0] == 8
    assert first_error(3)[2] > first_error(3)[3]
    assert ioc.getf("DAQC01_OL_DataLost3") == 0

    f_before = ioc.getf("DAQC01_CV_InLoop2")
    ioc.put_ok("VME01:MDIG1:SIM_Fault", "FIFO overflow")
    ioc.wait_numeric("VME01:MDIG1:SIM_Cleared", lambda v: v > 0, what="overflow cleared")
    ioc.wait_numeric("DAQC01_CV_InLoop2", lambda v: v > f_before, what="0xF header")

    ioc.put_ok("VME01:MDIG1:SIM_Fault", "Read error")
    ioc.wait_numeric("DAQC01_CV_ReadErrors", lambda v: v == 1, what="read error counted")
    generated = ioc.getf("VME01:MDIG1:SIM_Generated")
    ioc.wait_numeric("VME01:MDIG1:SIM_Generated", lambda v: v > generated, what="re-enabled")
    ioc.put_ok("VME01:MDIG1:SIM_Fault", "FIFO underflow")
    ioc.wait_value("VME01:MDIG1:SIM_Fault", "None")  # back to None after every injection
    ioc.wait_numeric("DAQC01_CV_InLoop4", lambda v: v > 0, what="transfers resume")
    stop_run(ioc)
    assert ioc.get("DAQC01_CV_BuffersOK") == "OK"
    ioc.wait_value("DAQC01_CV_BuffersAvail", "200")


def test_sigterm_during_a_run_exits_zero_within_five_seconds(demo_ioc):
    start_run(demo_ioc)
    demo_ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 0)
    t0 = time.monotonic()
    code = demo_ioc.stop(signal.SIGTERM, timeout=10)
    assert code == 0
    assert time.monotonic() - t0 < 5.0
    assert "Traceback" not in demo_ioc.log()


def test_run_number_survives_a_restart(start_ioc):
    ioc = start_ioc("--demo")
    ioc.put_ok("Online_CS_RunNumber", 42)  # saved before the put completes
    assert ioc.stop() == 0
    again = start_ioc("--demo", "--state-dir", ioc.args[ioc.args.index("--state-dir") + 1])
    assert again.get("Online_CS_RunNumber") == "42"


def test_remote_globals_follow_disconnect_and_reconnect(start_ioc, tmp_path):
    globals_ioc = start_ioc("--demo", "--globals-only")
    crate = start_ioc(
        "--demo", "--globals", "remote", "--globals-ca", f"127.0.0.1:{globals_ioc.ports.ca}"
    )
    crate.wait_value("DAQC01_CV_GlobalsConnected", "Connected")
    # The crate does not serve the globals itself: they live in the globals IOC only.
    missing = crate.tool("caget", "-w", "1", "Online_CS_StartStop")
    assert "not found" in missing.stdout + missing.stderr
    globals_ioc.put_ok("Online_CS_StartStop", "Start")
    crate.wait_value("DAQC01_CV_State", "Running")
    assert globals_ioc.stop() == 0
    crate.wait_value("DAQC01_CV_GlobalsConnected", "Disconnected")
    assert crate.get("DAQC01_CV_State") == "Running"
    restarted = start_ioc("--demo", "--globals-only", ports=globals_ioc.ports)
    crate.wait_value("DAQC01_CV_GlobalsConnected", "Connected", timeout=30)
    restarted.put_ok("Online_CS_StartStop", "Stop")
    crate.wait_value("DAQC01_CV_State", "Stopped", timeout=20)

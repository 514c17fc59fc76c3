"""Every PV of spec 03 on a running demo crate: names, record types, enums, boot values.

The expected names are written out here literally (not derived from the PV
table) so that a renamed PV fails this test.
"""

from __future__ import annotations

import numpy as np
from p4p.client.thread import Context

BOARDS = ("MDIG1", "MDIG2", "MDIG3", "MDIG4")

GLOBALS = {
    "Online_CS_StartStop": ("bo", "Stop"),
    "Online_CS_SaveData": ("bo", "No Save"),
    "Online_CS_RunNumber": ("longout", "0"),
}


def crate_pvs() -> dict[str, tuple[str, str | None]]:
    """name -> (record type, boot value as `caget -t` prints it, or None = any)."""
    pvs: dict[str, tuple[str, str | None]] = {
        "DAQC01_CV_CRATENUM": ("ai", "1"),
        "DAQC01_CV_InLoop1": ("ai", "0"),
        "DAQC01_CV_InLoop2": ("ai", "0"),
        "DAQC01_CV_InLoop3": ("ai", "0"),
        "DAQC01_CV_InLoop4": ("ai", "0"),
        "DAQC01:inLoop_Running": ("bi", "Stopped"),
        "DAQC01_CV_BuffersAvail": ("ai", "200"),
        "DAQC01_CV_NumSendBuffers": ("ai", "0"),
        "DAQC01_OL_NumFreeBuffers": ("ai", "200"),
        "DAQC01_OL_NumWrittenBuffers": ("ai", "0"),
        "DAQC01_OL_NumSendBuffers": ("ai", "0"),
        "DAQC01_OL_TotalBufsWritten": ("ai", "0"),
        "DAQC01_OL_TotalFBufsWritten": ("ai", "0"),
        "DAQC01_OL_TotalBufsLost": ("ai", "0"),
        "DAQC01_OL_BufLostPerecnt": ("ai", "0"),
        "DAQC01_CV_SendRate": ("ai", "0"),
        "DAQC01_CV_Trace": ("waveform", None),
        "DAQC01_CV_TraceLen": ("longin", "0"),
        "DAQC01_CS_TraceBd": ("longout", "0"),
        "DAQC01_CS_TraceChan": ("longout", "0"),
        "DAQC01_CS_TraceHorns": ("bo", "Hide"),
        "DAQC01_OL_HeaderCheckEnable": ("ao", "1"),
        "DAQC01_OL_TimestampCheckEnable": ("ao", "1"),
        "DAQC01_OL_DeepCheckEnable": ("ao", "1"),
        "DAQC01_OL_HeaderSummaryEnable": ("ao", "0"),
        "DAQC01_OL_HeaderSummaryPrescale": ("ao", "4096"),
        "DAQC01_OL_HeaderSummaryEventPrescale": ("ao", "256"),
        "DAQC01_CV_SenderRunning": ("bi", "Stopped"),
        "DAQC01_CV_State": ("mbbi", "Stopped"),
        "DAQC01_CV_BuffersTotal": ("longin", "200"),
        "DAQC01_CV_BuffersHeld": ("longin", "0"),
        "DAQC01_CV_BuffersOK": ("bi", "OK"),
        "DAQC01_CV_SenderClient": ("stringin", None),
        "DAQC01_CV_SenderReplies": ("ai", "0"),
        "DAQC01_CV_SenderBytes": ("ai", "0"),
        "DAQC01_CV_SenderWireRate": ("ai", "0"),
        "DAQC01_CV_SenderRequeued": ("ai", "0"),
        "DAQC01_CV_ReadErrors": ("ai", "0"),
        "DAQC01_CV_GlobalsConnected": ("bi", "Connected"),
        "VME01:X:CS_Ena": ("bo", "Disable"),
        "VME01:X:FifoNum": ("mbbo", "MAIN DATA FIFO"),
    }
    for n in range(7):
        pvs[f"DAQC01_BoardType{n}"] = ("mbbi", "AMD" if 2 <= n <= 5 else "0?")
        pvs[f"DAQC01_CV_OutLoop{n}"] = ("ai", "0")
        pvs[f"DAQC01_OL_DataRate{n}"] = ("ai", "0")
        pvs[f"DAQC01_OL_Data{n}"] = ("ai", "0")
        pvs[f"DAQC01_OL_DataLost{n}"] = ("ai", "0")
        pvs[f"DAQC01_OL_Errors{n}"] = ("ai", "0")
        pvs[f"DAQC01_OL_FirstError{n}"] = ("waveform", None)
    for i, board in enumerate(BOARDS):
        pvs[f"VME01:{board}:CS_Ena"] = ("bo", "Enable")
        pvs[f"VME01:{board}:FifoNum"] = ("mbbo", "MAIN DATA FIFO")
        pvs[f"VME01:{board}:user_package_data"] = ("longout", str(101 + i))
        pvs[f"VME01:{board}:SIM_EventRate"] = ("ao", "500")
        pvs[f"VME01:{board}:SIM_TraceLength"] = ("longout", "200")
        pvs[f"VME01:{board}:SIM_HeaderType"] = ("mbbo", "LED")
        pvs[f"VME01:{board}:SIM_Fault"] = ("mbbo", "None")
        pvs[f"VME01:{board}:SIM_Generated"] = ("ai", "0")
        pvs[f"VME01:{board}:SIM_Dropped"] = ("ai", "0")
        pvs[f"VME01:{board}:SIM_Cleared"] = ("ai", "0")
    return pvs


def _number_or_text(text: str) -> str:
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def test_every_pv_answers_caget_with_its_record_type_and_boot_value(shared_demo_ioc):
    demo_ioc = shared_demo_ioc
    expected = {**GLOBALS, **crate_pvs()}
    names = sorted(expected)
    rtyp = demo_ioc.caget(*(f"{n}.RTYP" for n in names))
    values = demo_ioc.caget(*names)
    demo_ioc.wait_value("DAQC01_CV_GlobalsConnected", "Connected")
    assert dict(zip(names, rtyp)) == {n: expected[n][0] for n in names}
    for name, value in zip(names, values):
        boot = expected[name][1]
        if boot is not None and name != "DAQC01_CV_GlobalsConnected":
            assert _number_or_text(value.strip()) == _number_or_text(boot), name


def test_every_pv_answers_pvget(shared_demo_ioc):
    demo_ioc = shared_demo_ioc
    names = sorted({**GLOBALS, **crate_pvs()})
    ctx = Context("pva", conf=demo_ioc.ports.p4p_conf(), useenv=False)
    try:
        values = ctx.get(names, timeout=10.0)
    finally:
        ctx.close()
    assert len(values) == len(names)
    by_name = dict(zip(names, values))
    assert int(by_name["DAQC01_CV_BuffersTotal"]) == 200
    assert by_name["Online_CS_StartStop"].raw.value.choices == ["Stop", "Start"]
    trace = np.asarray(by_name["DAQC01_CV_Trace"])
    assert trace.dtype == np.int16  # only the valid samples: none before a run
    assert trace.shape == (int(by_name["DAQC01_CV_TraceLen"]),)
    assert np.asarray(by_name["DAQC01_OL_FirstError0"]).shape == (4,)


ENUMS = {
    "Online_CS_StartStop": ["Stop", "Start"],
    "Online_CS_SaveData": ["No Save", "Save"],
    "VME01:MDIG1:CS_Ena": ["Disable", "Enable"],
    "VME01:MDIG1:FifoNum": [
        "MONFIFO 1", "MONFIFO 2", "MONFIFO 3", "MONFIFO 4", "MONFIFO 5", "MONFIFO 6",
        "MAIN DATA FIFO", "MONFIFO 8", "CHAN A FIFO", "CHAN B FIFO", "CHAN C FIFO",
        "CHAN D FIFO", "CHAN E FIFO", "CHAN F FIFO", "CHAN G FIFO", "CHAN H FIFO",
    ],
    "DAQC01_BoardType0": [
        "0?", "GRT", "GMT", "GD", "DMT", "5?", "DRT", "7?", "MYR", "9?", "10?", "11?",
        "AMD", "ASD", "14?", "15?",
    ],
    "DAQC01_CS_TraceHorns": ["Hide", "Show"],
    "DAQC01_CV_State": ["Stopped", "Running", "Draining", "No boards"],
    "DAQC01:inLoop_Running": ["Stopped", "Running"],
    "DAQC01_CV_BuffersOK": ["Leak", "OK"],
    "DAQC01_CV_GlobalsConnected": ["Disconnected", "Connected"],
    "DAQC01_CV_SenderRunning": ["Stopped", "Running"],
    "VME01:MDIG1:SIM_HeaderType": ["LED", "CFD"],
    "VME01:MDIG1:SIM_Fault": [
        "None", "Bad marker", "Bad length", "Timestamp regression", "FIFO overflow",
        "FIFO underflow", "Read error",
    ],
}  # fmt: skip


def test_enum_strings(shared_demo_ioc):
    names = sorted(ENUMS)
    ctx = Context("pva", conf=shared_demo_ioc.ports.p4p_conf(), useenv=False)
    try:
        values = ctx.get(names, timeout=10.0)
    finally:
        ctx.close()
    assert {n: v.raw.value.choices for n, v in zip(names, values)} == ENUMS

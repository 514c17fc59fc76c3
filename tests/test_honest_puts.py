"""A refused put is reported to every kind of client and changes nothing.

Put-callback clients (``caput -c``, pyepics at the put-callback level, p4p) used
to hear "done" for a refused value; plain ``caput`` of 1e10, 3.7 or nan was
converted by Channel Access and stored. Each case below must be refused with
an error the client sees, leave the value as it was and raise no alarm; good
values must still go through the same paths.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ioc_harness import IocProcess

#: (record, refused value as a client types it, why the original IOC setup refuses it)
REFUSED = (
    ("VME01:MDIG1:FifoNum", "16", "past the last FIFO"),
    ("VME01:MDIG1:CS_Ena", "2", "past Enable"),
    ("DAQC01_CS_TraceBd", "16", "above 15"),
    ("Online_CS_RunNumber", "-1", "below 0"),
    ("VME01:MDIG1:user_package_data", "102", "MDIG2's board id"),
)
#: Values Channel Access would convert silently: refused before the conversion.
CONVERTED = (
    ("VME01:MDIG1:user_package_data", "1e10"),
    ("VME01:MDIG1:user_package_data", "3.7"),
    ("VME01:MDIG1:CS_Ena", "nan"),
)
GOOD = (("DAQC01_CS_TraceBd", "3", "3"), ("VME01:MDIG1:FifoNum", "5", "MONFIFO 6"))

#: pyepics drops the put-callback status (its handler never reads ``args.status``), so
#: ``caput(wait=True)`` returns 1 for any put the server answers, refused or not; the
#: script asks libca through pyepics for the status the IOC sent, as any put-callback
#: client (caproto, ophyd's put_complete) receives it.
PYEPICS_SCRIPT = r"""
import ctypes, json, sys, time
import epics
from epics import ca, dbr

results = {}
statuses = {}

@ctypes.CFUNCTYPE(None, dbr.event_handler_args)
def done(args):
    statuses[args.usr] = args.status

for index, (name, value) in enumerate(json.loads(sys.argv[1])):
    pv = epics.PV(name)
    assert pv.wait_for_connection(10), name
    before = epics.caget(name)
    chid = pv.chid
    ftype = ca.field_type(chid)
    data = (dbr.Map[ftype] * 1)(value)
    ca.libca.ca_array_put_callback(ftype, 1, chid, data, done, ctypes.py_object(index))
    ca.flush_io()
    deadline = time.monotonic() + 10
    while index not in statuses and time.monotonic() < deadline:
        ca.poll(0.01)
    results[name + "=" + str(value)] = {
        "status": statuses.get(index),
        "message": ca.message(statuses[index]) if index in statuses else "no answer",
        "before": before,
        "value": epics.caget(name),
    }
print(json.dumps(results))
"""


def caget_severity(ioc: IocProcess, name: str) -> str:
    return ioc.tool("caget", "-t", "-w", "5", f"{name}.SEVR").stdout.strip()


@pytest.fixture(scope="module")
def crate(tmp_path_factory):
    from dataflow import ioc_process

    with ioc_process(tmp_path_factory.mktemp("puts"), "--demo") as ioc:
        yield ioc


def test_caput_with_callback_reports_every_refusal_and_changes_nothing(crate):
    ioc = crate
    names = [name for name, _, _ in REFUSED]
    before = ioc.caget(*names)
    for name, value, why in REFUSED:
        out = ioc.tool("caput", "-c", "-w", "5", name, value)
        assert "failed" in out.stdout + out.stderr, f"caput -c {name} {value} ({why}): {out.stdout}"
        assert caget_severity(ioc, name) == "NO_ALARM", name
    assert ioc.caget(*names) == before
    assert ioc.log().count("refused put") >= len(REFUSED)


def test_values_channel_access_would_convert_are_refused_before_conversion(crate):
    ioc = crate
    for name, value in CONVERTED:
        before = ioc.get(name)
        for flags in ((), ("-c",)):
            out = ioc.tool("caput", *flags, "-w", "5", name, value)
            report = out.stdout + out.stderr
            assert "failed" in report, f"caput {flags} {name} {value}: {report}"
        assert ioc.get(name) == before, f"{name} changed by {value}"
        assert caget_severity(ioc, name) == "NO_ALARM"


def test_good_values_still_go_through_with_and_without_callback(crate):
    ioc = crate
    for name, value, shown in GOOD:
        out = ioc.tool("caput", "-c", "-w", "5", name, value)
        assert "failed" not in out.stdout + out.stderr, out.stdout
        assert ioc.get(name) == shown
    ioc.put_ok("VME01:MDIG1:FifoNum", "MAIN DATA FIFO")


def test_a_put_callback_client_gets_the_failure_status(crate):
    """pyepics over libca: ECA_PUTFAIL for each refused value, ECA_NORMAL for a good one."""
    ioc = crate
    puts = [(name, int(value)) for name, value, _ in REFUSED] + [("DAQC01_CS_TraceBd", 4)]
    out = subprocess.run(
        [sys.executable, "-c", PYEPICS_SCRIPT, json.dumps(puts)],
        env=ioc.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    good = results.pop("DAQC01_CS_TraceBd=4")
    assert good["message"].startswith("Normal") and good["value"] == 4
    for put, result in results.items():
        assert result["message"] == "Channel write request failed", put  # ECA_PUTFAIL
        assert result["value"] == result["before"], put


def test_p4p_puts_of_refused_values_raise(crate):
    from p4p.client.thread import Context, RemoteError

    ioc = crate
    ctx = Context("pva", conf=ioc.ports.p4p_conf(), useenv=False)
    try:
        for name, value, why in REFUSED:
            before = ioc.get(name)
            with pytest.raises(RemoteError):
                ctx.put(name, int(value), timeout=10.0)
            assert ioc.get(name) == before, f"{name} ({why})"
        ctx.put("DAQC01_CS_TraceBd", 2, timeout=10.0)
        assert ioc.get("DAQC01_CS_TraceBd") == "2"
        ctx.put("DAQC01_CS_TraceBd", 0, timeout=10.0)
    finally:
        ctx.close()
    assert ioc.proc.poll() is None

"""R5 (spec 06): bad puts through the real `caput` and `pvput`, on every writable record.

The list of writable records comes from the PV table for a crate with four
digitizers and a master trigger, so a record added later is covered too. For
each one the bad values follow from its row: a wrong type, one step outside
its range, an unknown enum string and an enum index past the last state, an
odd trace length, a 0/1 switch set to 0.5, and the run-time rules (unique
package data, faults only on enabled boards of a run). Each must be refused
as spec 03 defines: the tool reports a failed write and the value stays.

Not asserted, because Channel Access converts the value before any record
sees it (as it did in the original IOC): `caput` of "1.5" to a longout writes
1, and `caput` of "nan" to a bo/mbbo writes state 0. `pvput` refuses both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from dataflow import (
    CRATE,
    DEMO_SPECS,
    TRIGGER_SPEC,
    ioc_process,
    run_tool,
    start_run,
    stop_run,
    write_config,
)
from ioc_harness import IocProcess

from ioc.hardware import BoardKind
from ioc.pvs import PV, BoardRef, Instance, expand

BOARD_SPECS = (*DEMO_SPECS, TRIGGER_SPEC)
TOOLS = ("caput", "pvput")
#: What the tools print when a write is refused (by the IOC, or by the tool for a bad string).
REFUSAL_MARKS = ("failed", "Error", "invalid")
WORKERS = 4


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r5")
    with ioc_process(workdir, "--config", str(write_config(workdir, BOARD_SPECS))) as ioc:
        yield ioc


def writable_records() -> list[Instance]:
    refs = tuple(BoardRef(b.name, BoardKind(b.kind)) for b in BOARD_SPECS)
    return [i for i in expand(CRATE, refs, with_globals=True, sim=True) if i.pv.writable]


def bad_values(inst: Instance) -> list[str]:
    """Values spec 03 refuses for this record while no run is active."""
    pv: PV = inst.pv
    values: list[str] = []
    if pv.enums:
        values += ["NoSuchState", str(len(pv.enums)), "-1"]
    else:
        values.append("abc")
    if not pv.enums and pv.low is not None:
        values.append(_number(pv.low - 1))
    if not pv.enums and pv.high is not None:
        values.append(_number(pv.high + 1))
    if pv.enums and pv.high is not None and pv.high < len(pv.enums) - 1:  # placeholders
        values.append(str(int(pv.high) + 1))
    if pv.record == "ao" and pv.high == 1:
        values.append("0.5")
    if pv.even:
        values.append("201")
    if pv.key == "PackageData":
        values += [str(b.package_data) for b in BOARD_SPECS if b.name != inst.board][:1]
    if pv.key == "SimFault":
        values += ["Bad marker", "FIFO overflow", "6"]
    return values


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def refused(output: str) -> bool:
    return any(mark in output for mark in REFUSAL_MARKS)


def test_every_writable_record_refuses_bad_values_through_caput_and_pvput(crate):
    ioc = crate
    records = writable_records()
    assert len(records) > 40
    names = [inst.name for inst in records]
    before = ioc.caget(*names)
    plan = {inst.name: bad_values(inst) for inst in records}
    assert all(plan.values()), [name for name, values in plan.items() if not values]

    def put_all(name: str) -> list[str]:
        accepted = []
        for value in plan[name]:
            for tool in TOOLS:
                out = run_tool(ioc, tool, "-w", "5", name, value)
                if not refused(out.stdout + out.stderr):
                    accepted.append(f"{tool} {name} {value}: {out.stdout.strip()}")
        return accepted

    with ThreadPoolExecutor(WORKERS) as pool:
        accepted = [line for lines in pool.map(put_all, names) for line in lines]
    assert not accepted, "bad puts accepted:\n" + "\n".join(accepted)
    after = ioc.caget(*names)
    changed = [(n, a, b) for n, a, b in zip(names, before, after, strict=True) if a != b]
    assert not changed, f"values changed by refused puts: {changed}"

    # Healthy: good puts still work and a run starts and stops.
    ioc.put_ok(f"DAQC{CRATE}_CS_TraceBd", 2)
    assert ioc.get(f"DAQC{CRATE}_CS_TraceBd") == "2"
    ioc.put_ok(f"DAQC{CRATE}_CS_TraceBd", 0)
    start_run(ioc, save="No Save")
    ioc.wait_numeric(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > 10)
    stop_run(ioc)
    assert ioc.proc.poll() is None
    assert "Traceback" not in ioc.log()


def test_faults_are_refused_on_a_disabled_board_and_packet_faults_on_a_trigger(crate):
    ioc = crate
    disabled = DEMO_SPECS[-1].name
    ioc.put_ok(f"VME{CRATE}:{disabled}:CS_Ena", "Disable")
    start_run(ioc, save="No Save")
    try:
        cases = {
            f"VME{CRATE}:{disabled}:SIM_Fault": ["Bad marker", "FIFO overflow", "6"],
            f"VME{CRATE}:{TRIGGER_SPEC.name}:SIM_Fault": [
                "Bad marker", "Bad length", "Timestamp regression", "3",
            ],
        }
        for name, values in cases.items():
            for value in values:
                for tool in TOOLS:
                    out = run_tool(ioc, tool, "-w", "5", name, value)
                    assert refused(out.stdout + out.stderr), f"{tool} {name} {value} accepted"
                    assert ioc.get(name) == "None"
        # Allowed while running: the fault is injected once and the record returns to None.
        ioc.put_ok(f"VME{CRATE}:{TRIGGER_SPEC.name}:SIM_Fault", "FIFO underflow")
        ioc.wait_value(f"VME{CRATE}:{TRIGGER_SPEC.name}:SIM_Fault", "None")
    finally:
        stop_run(ioc)
        ioc.put_ok(f"VME{CRATE}:{disabled}:CS_Ena", "Enable")
    assert ioc.proc.poll() is None


def test_a_refused_non_finite_number_leaves_the_record_without_an_alarm(crate):
    """A refused put must leave the record as it was, alarm state included: an operator
    screen shows an INVALID record in magenta although its value is fine."""
    ioc = crate
    floats = [inst.name for inst in writable_records() if inst.pv.record == "ao"]
    before = ioc.caget(*floats)
    stuck = defaultdict(list)
    for value in ("nan", "inf"):

        def put(name: str, value: str = value) -> str | None:
            out = run_tool(ioc, "caput", "-w", "5", name, value)
            return None if refused(out.stdout + out.stderr) else f"caput {name} {value}"

        with ThreadPoolExecutor(WORKERS) as pool:
            accepted = [line for line in pool.map(put, floats) if line]
        assert not accepted, f"non-finite puts accepted: {accepted}"
        assert ioc.caget(*floats) == before
        shown = run_tool(ioc, "caget", "-a", "-w", "5", *floats).stdout.splitlines()
        assert len(shown) == len(floats), shown
        for line in shown:
            fields = line.split()
            if "INVALID" in fields:
                stuck[fields[0]].append(value)
    assert not stuck, f"records left in INVALID alarm by a refused put: {dict(stuck)}"

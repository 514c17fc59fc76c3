"""The original crate IOC's whole record set, from the register map, on a running IOC.

The expected names come from the project's register map (``ioc/registermap``,
facts of the original databases) for the demo crate: crate 01, MDIG1..MDIG4,
globals served locally. A real pyepics client reads every name's record type.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from dataflow import DEMO_SPECS, TRIGGER_SPEC, write_config
from ioc_harness import wait_until

from ioc import dbfiles, screens
from ioc.config import demo_config
from ioc.hardware import BoardKind
from ioc.register_db import Bound
from ioc.register_io import merged, shown
from ioc.registermap import BOARD_MAPS, CRATE_MAP, GLOBALS_MAP, PER_BOARD_MAP, load, resolve
from ioc.registermap import Binding as MapBinding

CAGET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import epics

    channels = json.load(sys.stdin)
    values = epics.caget_many(channels, as_string=True, connection_timeout=10.0)
    print(json.dumps(dict(zip(channels, values))))
    """
)
THRESHOLD = "VME01:MDIG1:led_threshold0"
COARSE = "VME01:MDIG1:coarse_threshold0"
REGISTER_RBV = "VME01:MDIG1:reg_led_threshold0_RBV"


def expected_demo_records() -> dict[str, str]:
    """Name -> record type of every record the original crate IOC and globals IOC served
    for the demo crate, from the register map."""
    crate = demo_config().crates[0]
    boards = [b.name for b in crate.boards]
    expected: dict[str, str] = {}
    for board in crate.boards:
        for record in (*load(PER_BOARD_MAP), *load(BOARD_MAPS[board.kind])):
            expected[resolve(record.name, crate.crate, board.name)] = record.rtype
    for record in load(CRATE_MAP):
        name = resolve(record.name, crate.crate)
        owner = re.match(r"VME\d+:([^:]+):", name)
        if owner is None or owner.group(1) in ["GLBL", *boards]:
            expected[name] = record.rtype
    for record in load(GLOBALS_MAP):
        expected[record.name] = record.rtype
    return expected


def caget_many(ioc, channels: list[str]) -> dict[str, str | None]:
    """Channel -> value as a string (None: not connected), all at once with pyepics."""
    out = subprocess.run(
        [sys.executable, "-c", CAGET_SCRIPT],
        input=json.dumps(channels),
        env=ioc.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def record_types(ioc, names: list[str]) -> dict[str, str | None]:
    types = caget_many(ioc, [f"{name}.RTYP" for name in names])
    return {name: types[f"{name}.RTYP"] for name in names}


def test_the_original_record_set_connects_with_the_original_types(shared_demo_ioc):
    expected = expected_demo_records()
    assert len(expected) > 9000  # 4 x 1,745 board records, the crate's, the globals'
    served = record_types(shared_demo_ioc, sorted(expected))
    matching = [name for name, rtype in expected.items() if served.get(name) == rtype]
    missing = sorted(set(expected) - set(matching))
    assert len(matching) / len(expected) >= 0.99, missing[:20]
    for name in ("VME01:MDIG1:clk_select", "VME01:MDIG4:user_package_data_RBV", "ScriptStage",
                 "Setup_Script_State", "VME01:GLBL:clk_select", THRESHOLD):
        assert served[name] == expected[name], name


def test_the_ioc_serves_the_records_of_db_registers_files(shared_demo_ioc):
    records = dbfiles.parse_db(
        (dbfiles.DB_DIR / "registers_digitizer_master.db").read_text(),
        {"CRATE": "01", "BOARD": "MDIG3"},
    ) + dbfiles.parse_db((dbfiles.DB_DIR / "registers_crate.db").read_text(), {"CRATE": "01"})
    channels = {f"{r.name}.RTYP": r.rtype for r in records}
    channels |= {f"{r.name}.ASG": r.field("ASG") or "" for r in records}  # "": DEFAULT
    channels |= {f"{r.name}.EGU": r.field("EGU") for r in records if r.field("EGU")}
    served = caget_many(shared_demo_ioc, sorted(channels))
    wrong = [f"{c}: {served[c]!r} != {want!r}" for c, want in channels.items() if served[c] != want]
    assert wrong == [], wrong[:10]


def test_a_trigger_board_serves_the_trigger_register_records(start_ioc, tmp_path):
    config = write_config(tmp_path, (*DEMO_SPECS, TRIGGER_SPEC))
    ioc = start_ioc("--config", str(config))
    trigger = {
        resolve(record.name, "01", TRIGGER_SPEC.name): record.rtype
        for record in load(BOARD_MAPS[BoardKind.TRIGGER_MASTER])
    }
    served = record_types(ioc, sorted(trigger))
    assert [name for name, rtype in trigger.items() if served[name] != rtype] == []


def test_the_register_screen_opens_from_the_crate_screen_and_names_served_records(
    shared_demo_ioc,
):
    macros = screens.crate_macros(demo_config().crates[0])
    crate = screens.scan_screen(screens.OPI_DIR / "crate.bob", macros)
    opened = {(path.name, m["BOARD"]) for path, m in crate.opens if "BOARD" in m}
    assert ("registers_digitizer.bob", "MDIG2") in opened
    screen = screens.scan_screen(
        screens.OPI_DIR / "registers_digitizer.bob", {"CRATE": "01", "BOARD": "MDIG2"}
    )
    assert screen.unresolved == set() and len(screen.pvs) > 1000
    served = record_types(shared_demo_ioc, sorted(screen.pvs))
    assert [name for name, rtype in served.items() if rtype is None] == []


def test_a_threshold_write_lands_in_the_register_and_keeps_its_other_bits(shared_demo_ioc):
    ioc = shared_demo_ioc
    ioc.put_ok(THRESHOLD, 1234)
    ioc.wait_value(REGISTER_RBV, "1234", timeout=5)
    ioc.put_ok(COARSE, 5)
    ioc.wait_value(REGISTER_RBV, str(5 << 24 | 1234), timeout=5)
    ioc.put_ok(THRESHOLD, 77)
    ioc.wait_value(REGISTER_RBV, str(5 << 24 | 77), timeout=5)
    wait_until(lambda: ioc.getf(f"{THRESHOLD}_RBV") == 77, 5, "user-level readback")
    assert ioc.getf(f"{COARSE}_RBV") == 5


def test_a_pv_access_write_lands_in_the_register_too(shared_demo_ioc):
    from p4p.client.thread import Context

    context = Context("pva", conf=shared_demo_ioc.ports.p4p_conf(), useenv=False)
    try:
        context.put("VME01:MDIG1:led_threshold0", 4321, timeout=5.0)
    finally:
        context.close()
    wait_until(
        lambda: int(shared_demo_ioc.get(REGISTER_RBV)) & 0x3FFF == 4321, 5, "PVA write applied"
    )


def test_readbacks_refuse_client_writes(shared_demo_ioc):
    assert shared_demo_ioc.put_refused(REGISTER_RBV, 3)
    assert shared_demo_ioc.put_refused(f"{THRESHOLD}_RBV", 3)


def test_a_crate_fan_out_sets_every_board(shared_demo_ioc):
    shared_demo_ioc.put_ok("VME01:GLBL:clk_select", 1)
    for board in ("MDIG1", "MDIG2"):  # the boards the original's fan-out names
        shared_demo_ioc.wait_value(f"VME01:{board}:clk_select", "OSC", timeout=5)


def test_setup_script_records_are_writable(shared_demo_ioc):
    shared_demo_ioc.put_ok("ScriptStage", 3)
    shared_demo_ioc.wait_value("ScriptStage", "3", timeout=5)
    shared_demo_ioc.put_ok("Setup_Script_State", "DIG OK")
    shared_demo_ioc.wait_value("Setup_Script_State", "DIG OK", timeout=5)


def test_the_globals_ioc_serves_the_setup_script_records(start_ioc):
    globals_ioc = start_ioc("--demo", "--globals-only")
    globals_ioc.put_ok("ScriptStage", 2)
    globals_ioc.wait_value("ScriptStage", "2", timeout=5)
    assert globals_ioc.get("GLBL:DIG:F00:clk_select.RTYP") == "dfanout"


def _bound(rtype: str, mask: int, shift: int, states: tuple[int, ...] = ()) -> Bound:
    return Bound("x", "B", rtype, MapBinding("reg", mask, shift, rtype.endswith("o")), states)


@pytest.mark.parametrize(
    ("rtype", "mask", "shift", "states", "value", "register", "expected"),
    [
        ("bo", 0x0800_0000, 27, (), 1, 0x0000_00FF, 0x0800_00FF),
        ("bo", 0x0800_0000, 27, (), 0, 0xFFFF_FFFF, 0xF7FF_FFFF),
        ("mbbo", 0x3800_0000, 27, (0, 1, 2, 3, 4, 5, 6, 7), 6, 0x0000_0001, 0x3000_0001),
        ("longout", 0xFF00_0000, 24, (), 0x1FF, 0x0000_1234, 0xFF00_1234),
        ("longout", 0x0000_3FFF, 0, (), 1234, 0xAB00_0000, 0xAB00_04D2),
    ],
)
def test_bit_fields_follow_the_original_device_support(
    rtype, mask, shift, states, value, register, expected
):
    assert merged(register, _bound(rtype, mask, shift, states), value) == expected


def test_readbacks_show_their_bit_field():
    assert shown(_bound("bi", 0x0400_0000, 26), 0x0400_0000) == 1
    assert shown(_bound("mbbi", 0x3800_0000, 27, (0, 2, 6)), 0x3000_0000) == 2
    assert shown(_bound("mbbi", 0x3800_0000, 27, (0, 2)), 0x3000_0000) is None
    assert shown(_bound("longin", 0xFF00_0000, 24), 0x0500_04D2) == 5
    assert shown(_bound("longin", 0xFFFF_FFFF, 0), 0xFFFF_FFFF) == -1


def test_every_board_kind_has_a_register_map():
    assert set(BOARD_MAPS) == set(BoardKind)
    for kind in BoardKind:
        assert any(record.binding for record in load(BOARD_MAPS[kind]))

"""db/: the record list and access-security file equal what the table and the IOC give.

Regenerate with ``python -m ioc.dbfiles --write`` after changing ioc/pvs.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

from ioc import dbfiles
from ioc.pvs import expand

REGENERATE = "db/ is out of date: run `python -m ioc.dbfiles --write` and commit db/"
DEMO_MACROS = {"CRATE": "01"}


def _records(name: str) -> list[dbfiles.DbRecord]:
    return dbfiles.parse_db((dbfiles.DB_DIR / name).read_text(), DEMO_MACROS)


def test_db_files_equal_what_the_pv_table_generates():
    assert dbfiles.stale_files() == [], REGENERATE


def test_crate_db_lists_exactly_the_records_the_table_expands_for_the_demo_crate():
    demo = dbfiles.demo_crate()
    table = [
        (i.name, i.pv.record)
        for i in expand("01", dbfiles.board_refs(demo), with_globals=False)
    ]
    assert [(r.name, r.rtype) for r in _records("crate.db")] == table
    assert [(r.name, r.rtype) for r in _records("globals.db")] == [
        ("Online_CS_StartStop", "bo"),
        ("Online_CS_SaveData", "bo"),
        ("Online_CS_RunNumber", "longout"),
    ]


def test_every_record_names_a_group_that_the_acf_defines():
    acf = (dbfiles.DB_DIR / "dgs.acf").read_text()
    groups = {r.field("ASG") for r in _records("crate.db") + _records("globals.db")}
    assert groups == {"DEFAULT", "RUNPROTECT", "READONLY"}
    for group in groups:
        assert f"ASG({group})" in acf
    protected = {r.name for r in _records("crate.db") if r.field("ASG") == "RUNPROTECT"}
    assert "VME01:MDIG1:CS_Ena" in protected and "VME01:MDIG4:user_package_data" in protected
    assert "DAQC01_OL_DeepCheckEnable" in protected and "VME01:X:FifoNum" in protected
    assert "VME01:MDIG1:SIM_Fault" not in protected


def _same_field(served: str, written: str) -> bool:
    """Equal text, or the same number (caget prints doubles with 6 digits: 1e+06)."""
    if served == written:
        return True
    try:
        return math.isclose(float(served), float(written), rel_tol=1e-5)
    except ValueError:
        return False


def test_the_running_ioc_serves_every_record_with_the_type_and_fields_of_db(shared_demo_ioc):
    records = _records("crate.db") + _records("globals.db")
    channels, expected = [], []
    for record in records:
        channels.append(f"{record.name}.RTYP")
        expected.append(record.rtype)
        for name, value in record.fields:
            channels.append(f"{record.name}.{name}")
            expected.append(value)
    answered = shared_demo_ioc.caget(*channels)
    assert len(answered) == len(channels)
    mismatched = [
        f"{channel}: IOC {got.strip()!r}, db/ {want!r}"
        for channel, got, want in zip(channels, answered, expected)
        if not _same_field(got.strip(), want)
    ]
    assert mismatched == [], REGENERATE + "\n" + "\n".join(mismatched[:20])


def test_db_files_load_into_epics_and_the_acf_parses():
    """The files are real EPICS input, not just text that looks like it."""
    script = textwrap.dedent(
        f"""
        import ctypes
        from softioc import softioc
        from epicscorelibs.ioc import dbCore
        softioc.dbLoadDatabase({str(dbfiles.DB_DIR / "crate.db")!r}, substitutions="CRATE=01")
        softioc.dbLoadDatabase({str(dbfiles.DB_DIR / "globals.db")!r})
        init_file = dbCore.asInitFile
        init_file.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
        init_file.restype = ctypes.c_long
        for name in ("dgs.acf", "dgs-run-protect.acf"):
            path = {str(dbfiles.DB_DIR)!r} + "/" + name
            print(name, "status", init_file(path.encode(), None))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "dgs.acf status 0" in out.stdout, out.stdout + out.stderr
    assert "dgs-run-protect.acf status 0" in out.stdout, out.stdout + out.stderr


def test_write_regenerates_and_check_reports_a_stale_file(tmp_path: Path, capsys):
    assert dbfiles.main(["--write", "--dir", str(tmp_path)]) == 0
    for name in ("crate.db", "globals.db", "dgs.acf", "dgs-run-protect.acf",
                 "registers_crate.db"):
        assert (tmp_path / name).read_text() == (dbfiles.DB_DIR / name).read_text()
    assert dbfiles.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "crate.db").write_text("# hand edited\n")
    assert dbfiles.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "crate.db is out of date" in capsys.readouterr().out


def test_register_files_load_into_epics():
    """The register-map files are real EPICS input for a crate with every board kind."""
    loads = [
        f"softioc.dbLoadDatabase({str(dbfiles.DB_DIR / f'registers_{kind}.db')!r}, "
        f"substitutions='CRATE=01,BOARD={board}')"
        for kind, board in (
            ("digitizer_master", "MDIG1"), ("digitizer_slave", "SDIG1"), ("trigger_master", "MTRG"),
        )
    ]
    loads += [
        f"softioc.dbLoadDatabase({str(dbfiles.DB_DIR / 'registers_crate.db')!r}, "
        "substitutions='CRATE=01')",
        f"softioc.dbLoadDatabase({str(dbfiles.DB_DIR / 'registers_globals.db')!r})",
    ]
    script = "from softioc import softioc\n" + "\n".join(loads) + "\nprint('loaded')\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr

"""opi/: the Phoebus screens parse, use known widgets, and name only PVs that exist.

Regenerate with ``python -m ioc.screens --write`` after changing ioc/pvs.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from ioc import screens
from ioc.dbfiles import board_refs
from ioc.pvs import PV_TABLE, expand

REGENERATE = "opi/ is out of date: run `python -m ioc.screens --write` and commit opi/"
SYSTEMS = screens.example_systems()


def _crate_screen_scans(system_file: str) -> list[tuple[dict, screens.ScreenScan]]:
    """Each crate screen as the system screen opens it, with the macros it passes."""
    system = screens.scan_screen(screens.OPI_DIR / system_file, {})
    assert system.unresolved == set()
    assert [path.name for path, _ in system.opens] == ["crate.bob"] * len(
        SYSTEMS[system_file].crates
    )
    return [(macros, screens.scan_screen(path, macros)) for path, macros in system.opens]


def test_screens_equal_what_the_pv_table_generates():
    assert screens.stale_screens() == [], REGENERATE


def test_every_screen_parses_with_known_widget_types_versions_and_integer_geometry():
    files = sorted(screens.OPI_DIR.glob("*.bob"))
    assert {f.name for f in files} == set(screens.generated_screens())
    problems = [problem for path in files for problem in screens.check_screen(path)]
    assert problems == []


def test_a_widget_of_unknown_type_or_fractional_geometry_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.bob"
    bad.write_text(
        '<display version="2.0.0"><width>10</width><height>10</height>'
        '<widget type="fancy_gauge" version="2.0.0"><name>g</name>'
        "<x>0</x><y>0</y><width>5</width><height>5</height></widget>"
        '<widget type="label" version="2.0.0"><name>l</name>'
        "<x>1.5</x><y>0</y><width>5</width><height>5</height></widget></display>"
    )
    problems = screens.check_screen(bad)
    assert any("unknown widget type 'fancy_gauge'" in p for p in problems)
    assert any("x '1.5' is not an integer" in p for p in problems)


@pytest.mark.parametrize("system_file", sorted(SYSTEMS))
def test_every_pv_of_every_crate_screen_is_a_record_of_that_crate(system_file):
    """Checked against the PV table for each example configuration (no IOC needed)."""
    system = SYSTEMS[system_file]
    for crate, (macros, scan) in zip(system.crates, _crate_screen_scans(system_file)):
        assert macros == screens.crate_macros(crate)
        assert scan.unresolved == set()
        records = {
            i.name for i in expand(crate.crate, board_refs(crate), with_globals=True)
        }
        assert scan.pvs - records == set()
        for board in crate.boards:
            assert f"VME{crate.crate}:{board.name}:CS_Ena" in scan.pvs
            assert f"VME{crate.crate}:{board.name}:SIM_Fault" in scan.pvs
        for card in range(7):
            assert f"DAQC{crate.crate}_OL_DataRate{card}" in scan.pvs


def test_every_pv_the_demo_screens_name_answers_on_a_running_ioc(shared_demo_ioc):
    system = screens.scan_screen(screens.OPI_DIR / "system.bob", {})
    names = set(system.pvs)
    for _, scan in _crate_screen_scans("system.bob"):
        names |= scan.pvs
    names = sorted(names)
    assert len(names) > 100
    answered = shared_demo_ioc.caget(*(f"{name}.RTYP" for name in names))
    assert len(answered) == len(names)


def test_run_control_buttons_ask_for_confirmation():
    root = ET.parse(screens.OPI_DIR / "crate.bob").getroot()
    buttons = [
        w for w in root.iter("widget")
        if w.get("type") == "action_button"
        and w.findtext("pv_name") in ("Online_CS_StartStop", "Online_CS_SaveData")
    ]
    assert sorted(w.findtext("text") for w in buttons) == ["No Save", "Save", "Start", "Stop"]
    for button in buttons:
        assert button.findtext("confirm_dialog") == "true"
        assert button.findtext("confirm_message")


def test_a_renamed_pv_reaches_the_generated_screens(monkeypatch):
    renamed = tuple(
        dataclasses.replace(pv, template="DAQC{crate}_OL_CardRate{n}")
        if pv.key == "DataRate" else pv
        for pv in PV_TABLE
    )
    monkeypatch.setattr(screens, "PV_TABLE", renamed)
    row = screens.board_row("digitizer")
    assert "DAQC$(CRATE)_OL_CardRate$(CARD)" in row
    assert "_OL_DataRate" not in row
    assert "row_digitizer.bob" in screens.stale_screens()


def test_url_opens_the_crate_screen_with_every_macro_it_needs():
    out = subprocess.run(
        [sys.executable, "-m", "ioc.screens", "--url", "--config", "examples/three-crates.toml",
         "--crate", "02"],
        capture_output=True, text=True, timeout=60, cwd=screens.OPI_DIR.parent,
    )
    assert out.returncode == 0, out.stderr
    url = urlsplit(out.stdout.strip())
    assert url.scheme == "file" and url.path.endswith("/opi/crate.bob")
    macros = dict(parse_qsl(url.query))
    assert macros["CRATE"] == "02" and macros["BOARD1"] == "SDIG1" and macros["KIND6"] == "empty"
    scan = screens.scan_screen(Path(url.path), macros)
    assert scan.unresolved == set()
    assert "VME02:SDIG1:user_package_data" in scan.pvs


def test_the_trace_plot_autoscales_with_samples_on_x():
    """Phoebus's default axes are a fixed 0..100: a trace at ~1000 counts would fall
    off. X is the element index of the trace, whose length is TraceLen."""
    root = ET.parse(screens.OPI_DIR / "crate.bob").getroot()
    (plot,) = (widget for widget in root.iter("widget") if widget.get("type") == "xyplot")
    (trace,) = plot.find("traces")
    assert trace.findtext("y_pv") == "DAQC$(CRATE)_CV_Trace"
    assert trace.findtext("x_pv") == "", "X must be the sample index"
    x_axis = plot.find("x_axis")
    (y_axis,) = plot.find("y_axes")
    for axis in (x_axis, y_axis):
        assert axis.findtext("autoscale") == "true"
        assert axis.findtext("log_scale") == "false"
    assert x_axis.findtext("title") == "Sample"
    assert float(x_axis.findtext("minimum")) == 0
    assert float(x_axis.findtext("maximum")) == 1024

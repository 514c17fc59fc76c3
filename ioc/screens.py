"""Phoebus operator screens (``opi/*.bob``), generated from `ioc.pvs.PV_TABLE`.

Every PV a screen names is formed from a table row found by its key, so a
renamed PV changes the generated screen instead of silently breaking it (the
tests regenerate and compare, then check every name against a live IOC).

One ``crate.bob`` serves every crate through macros: ``CRATE`` (two digits) and,
for each card index N = 0..6, ``BOARDN`` (board name, ``X`` if empty) and
``KINDN`` (``digitizer``, ``trigger`` or ``empty``), which picks the row
displays ``row_<kind>.bob`` and ``sim_<kind>.bob``. Phoebus lets a display's
own macros override those it is opened with, so the generic screens define
none: the system screen (one per configuration) passes them all, and
``python -m ioc.screens --url`` prints the resource URL for one crate.

The module also reads screens back (`scan_screen`, `check_screen`) for tests.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ioc.config import ConfigError, CrateConfig, SystemConfig, demo_config, load_config
from ioc.dbfiles import stale, write_or_check
from ioc.hardware import BoardKind
from ioc.pool import POOL_SIZE
from ioc.pvs import CARDS, DIGITIZERS, PV, PV_TABLE, SLOTS

OPI_DIR = Path(__file__).resolve().parent.parent / "opi"
EXAMPLES_DIR = OPI_DIR.parent / "examples"
DISPLAY_VERSION = "2.0.0"
#: Widget types used here and their file-format versions (Phoebus display builder).
WIDGET_VERSIONS = {
    "action_button": "3.0.0",
    "bool_button": "2.0.0",
    "combo": "2.0.0",
    "embedded": "2.0.0",
    "group": "2.0.0",
    "label": "2.0.0",
    "navtabs": "2.0.0",
    "progressbar": "2.0.0",
    "textentry": "3.0.0",
    "textupdate": "2.0.0",
    "xyplot": "3.0.0",
}
KINDS = ("digitizer", "trigger", "empty")
PLACEHOLDER = "X"
TRACE_CHANNELS = 10
#: The trace waveform's capacity and the 14-bit ADC range: where the autoscaling
#: trace axes start before the first trace arrives.
TRACE_SAMPLES = next(pv.length for pv in PV_TABLE if pv.key == "Trace")
ADC_FULL_SCALE = 1 << 14
ROW_HEIGHT = 30
ROW_WIDTH = 1200

Macros = dict[str, str]


# PV names from the table.


def _row(key: str, kind: BoardKind | None = None) -> PV:
    for pv in PV_TABLE:
        if pv.key == key and (kind is None or kind in pv.kinds):
            return pv
    raise KeyError(f"no PV table row {key!r}" + (f" for {kind.name}" if kind else ""))


def pv_name(key: str, *, n: int | str = "$(CARD)", kind: BoardKind | None = None) -> str:
    """The PV of table row ``key`` with the crate and board as macros."""
    return _row(key, kind).name("$(CRATE)", n=n, board="$(BOARD)")


def placeholder_name(key: str) -> str:
    return _row(key).name("$(CRATE)")


def kind_name(kind: BoardKind) -> str:
    return "digitizer" if kind in DIGITIZERS else "trigger"


def crate_macros(crate: CrateConfig) -> Macros:
    """Every macro ``crate.bob`` needs for this crate."""
    macros = {"CRATE": crate.crate}
    for card in range(CARDS):
        board = crate.board_by_card(card)
        macros[f"BOARD{card}"] = board.name if board else PLACEHOLDER
        macros[f"KIND{card}"] = kind_name(board.kind) if board else "empty"
    return macros


def resource_url(crate: CrateConfig, opi_dir: Path = OPI_DIR) -> str:
    """``phoebus -resource`` argument that opens the crate screen with its macros."""
    query = "&".join(f"{k}={quote(v)}" for k, v in crate_macros(crate).items())
    return f"{(opi_dir / 'crate.bob').resolve().as_uri()}?{query}"


# Widgets.


def _add(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _widget(kind: str, name: str, x: int, y: int, w: int, h: int) -> ET.Element:
    element = ET.Element("widget", type=kind, version=WIDGET_VERSIONS[kind])
    _add(element, "name", name)
    for tag, value in (("x", x), ("y", y), ("width", w), ("height", h)):
        _add(element, tag, str(int(value)))
    return element


def _font(element: ET.Element, size: int) -> None:
    outer = _add(element, "font")
    _add(outer, "font", family="Liberation Sans", style="BOLD", size=f"{size}.0")


def label(text: str, x: int, y: int, w: int, h: int = 25, *, size: int = 0) -> ET.Element:
    element = _widget("label", f"Label {text}", x, y, w, h)
    _add(element, "text", text)
    if size:
        _font(element, size)
    return element


def text_update(pv: str, x: int, y: int, w: int, h: int = 25) -> ET.Element:
    element = _widget("textupdate", f"Value {pv}", x, y, w, h)
    _add(element, "pv_name", pv)
    return element


def text_entry(pv: str, x: int, y: int, w: int, h: int = 25) -> ET.Element:
    element = _widget("textentry", f"Entry {pv}", x, y, w, h)
    _add(element, "pv_name", pv)
    _add(element, "show_units", "false")
    return element


def combo(pv: str, x: int, y: int, w: int, h: int = 25, items: Iterable[str] = ()):
    """A drop-down: the PV's enum strings, or the given items for a number."""
    element = _widget("combo", f"Choice {pv}", x, y, w, h)
    _add(element, "pv_name", pv)
    items = list(items)
    if items:
        listed = _add(element, "items")
        for item in items:
            _add(listed, "item", item)
        _add(element, "items_from_pv", "false")
    return element


def bool_button(pv: str, x: int, y: int, w: int, h: int = 25) -> ET.Element:
    """Toggles a two-state PV; the labels are its enum strings (or Off/On for numbers)."""
    element = _widget("bool_button", f"Toggle {pv}", x, y, w, h)
    _add(element, "pv_name", pv)
    _add(element, "off_label", "Off")
    _add(element, "on_label", "On")
    _add(element, "labels_from_pv", "true")
    return element


def write_button(pv: str, value: str, text: str, confirm: str, x: int, y: int, w: int, h: int):
    """A button writing one value after the operator confirms."""
    element = _widget("action_button", f"Button {text}", x, y, w, h)
    actions = _add(element, "actions")
    action = _add(actions, "action", type="write_pv")
    _add(action, "pv_name", "$(pv_name)")
    _add(action, "value", value)
    _add(action, "description", text)
    _add(element, "pv_name", pv)
    _add(element, "text", text)
    _add(element, "confirm_dialog", "true")
    _add(element, "confirm_message", confirm)
    return element


def open_button(file: str, macros: Macros, text: str, x: int, y: int, w: int, h: int):
    element = _widget("action_button", f"Open {text}", x, y, w, h)
    actions = _add(element, "actions")
    action = _add(actions, "action", type="open_display")
    _add(action, "file", file)
    listed = _add(action, "macros")
    for name, value in macros.items():
        _add(listed, name, value)
    _add(action, "target", "tab")
    _add(action, "description", text)
    _add(element, "text", text)
    return element


def progress_bar(pv: str, maximum: float, x: int, y: int, w: int, h: int = 20) -> ET.Element:
    element = _widget("progressbar", f"Level {pv}", x, y, w, h)
    _add(element, "pv_name", pv)
    _add(element, "limits_from_pv", "false")
    _add(element, "minimum", "0.0")
    _add(element, "maximum", f"{float(maximum)}")
    return element


def _plot_axis(parent: ET.Element, tag: str, title: str, maximum: float) -> None:
    """An autoscaling axis (Phoebus's default is a fixed 0..100); ``maximum`` is
    where it starts before the first value."""
    axis = _add(parent, tag)
    _add(axis, "title", title)
    _add(axis, "autoscale", "true")
    _add(axis, "log_scale", "false")
    _add(axis, "minimum", "0.0")
    _add(axis, "maximum", f"{float(maximum)}")
    _add(axis, "show_grid", "true")
    _add(axis, "visible", "true")


def xy_plot(pv: str, title: str, x: int, y: int, w: int, h: int, *, x_title: str,
            x_max: float, y_title: str, y_max: float) -> ET.Element:
    """A waveform against its element index: both axes autoscale."""
    element = _widget("xyplot", f"Plot {pv}", x, y, w, h)
    _add(element, "title", title)
    _add(element, "show_legend", "false")
    _plot_axis(element, "x_axis", x_title, x_max)
    _plot_axis(_add(element, "y_axes"), "y_axis", y_title, y_max)
    traces = _add(element, "traces")
    trace = _add(traces, "trace")
    _add(trace, "name", title)
    _add(trace, "x_pv", "")
    _add(trace, "y_pv", pv)
    _add(trace, "err_pv", "")
    _add(trace, "axis", "0")
    _add(trace, "trace_type", "1")
    color = _add(trace, "color")
    _add(color, "color", red="0", green="0", blue="255")
    _add(trace, "line_width", "1")
    _add(trace, "point_type", "0")
    _add(trace, "point_size", "4")
    _add(trace, "visible", "true")
    return element


def embedded(file: str, macros: Macros, name: str, x: int, y: int, w: int, h: int):
    element = _widget("embedded", name, x, y, w, h)
    _add(element, "file", file)
    listed = _add(element, "macros")
    for key, value in macros.items():
        _add(listed, key, value)
    return element


def navigation_tabs(name: str, tabs: list[tuple[str, str, Macros]], x: int, y: int, w: int,
                    h: int) -> ET.Element:
    """Tabs that each embed ``file`` with its macros: a selector of macro-driven displays."""
    element = _widget("navtabs", name, x, y, w, h)
    listed = _add(element, "tabs")
    for title, file, macros in tabs:
        tab = _add(listed, "tab")
        _add(tab, "name", title)
        _add(tab, "file", file)
        tab_macros = _add(tab, "macros")
        for key, value in macros.items():
            _add(tab_macros, key, value)
        _add(tab, "group_name", "")
    return element


def group(title: str, x: int, y: int, w: int, h: int, children: Iterable[ET.Element]):
    """A titled box; children use coordinates relative to it."""
    element = _widget("group", title, x, y, w, h)
    element.extend(children)
    return element


def display(name: str, w: int, h: int, widgets: Iterable[ET.Element]) -> str:
    root = ET.Element("display", version=DISPLAY_VERSION)
    _add(root, "name", name)
    _add(root, "width", str(w))
    _add(root, "height", str(h))
    root.extend(widgets)
    ET.indent(root, "  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


# The crate screen.


def _pairs(rows: Iterable[tuple[str, ET.Element | list[ET.Element]]], y0: int = 5):
    """Label + value rows 30 px apart (the value widgets are made at y 0 and moved)."""
    out: list[ET.Element] = []
    for i, (text, value) in enumerate(rows):
        y = y0 + 30 * i
        out.append(label(text, 10, y, 130))
        for element in value if isinstance(value, list) else [value]:
            element.find("y").text = str(y)
            out.append(element)
    return out


def _run_control(x: int, y: int, title: str = "Run control") -> ET.Element:
    start_stop, save = pv_name("StartStop"), pv_name("SaveData")
    children = [
        label("Run", 10, 5, 90),
        write_button(start_stop, "1", "Start", "Start a run on every crate?", 100, 3, 90, 28),
        write_button(start_stop, "0", "Stop", "Stop the run on every crate?", 200, 3, 90, 28),
        text_update(start_stop, 300, 5, 80),
        label("Data", 10, 40, 90),
        write_button(save, "1", "Save", "Send checked data to receivers (Save)?", 100, 38, 90, 28),
        write_button(save, "0", "No Save", "Stop sending data to receivers?", 200, 38, 90, 28),
        text_update(save, 300, 40, 80),
        label("Run number", 10, 75, 90),
        text_update(pv_name("RunNumber"), 100, 75, 110),
    ]
    return group(title, x, y, 400, 140, children)


def _crate_status(x: int, y: int) -> ET.Element:
    children = _pairs(
        [
            ("Crate state", text_update(pv_name("State"), 150, 0, 120)),
            ("inLoop", text_update(pv_name("InLoopRunning"), 150, 0, 120)),
            ("Global PVs", text_update(pv_name("GlobalsConnected"), 150, 0, 120)),
            ("Set-up", text_update(pv_name("SetupPending"), 150, 0, 230)),
        ]
    )
    return group("Crate", x, y, 400, 138, children)


def _buffers(x: int, y: int) -> ET.Element:
    def level(key: str) -> list[ET.Element]:
        name = pv_name(key)
        return [progress_bar(name, POOL_SIZE, 150, 0, 180), text_update(name, 340, 0, 60)]

    children = _pairs(
        [
            ("Free (qFree)", level("NumFreeBuffers")),
            ("Written (qWritten)", level("NumWrittenBuffers")),
            ("Sender (qSender)", level("NumSendBuffers")),
            ("Held by a stage", text_update(pv_name("BuffersHeld"), 150, 0, 80)),
            (
                "Pool",
                [
                    text_update(pv_name("BuffersTotal"), 150, 0, 80),
                    text_update(pv_name("BuffersOK"), 240, 0, 80),
                ],
            ),
            (
                "Lost %",
                [
                    progress_bar(pv_name("BufLostPerecnt"), 100, 150, 0, 180),
                    text_update(pv_name("BufLostPerecnt"), 340, 0, 60),
                ],
            ),
            (
                "Buffers checked / lost",
                [
                    text_update(pv_name("TotalBufsWritten"), 150, 0, 110),
                    text_update(pv_name("TotalBufsLost"), 270, 0, 110),
                ],
            ),
        ]
    )
    return group(f"Buffers (pool of {POOL_SIZE})", x, y, 420, 280, children)


def _sender(x: int, y: int) -> ET.Element:
    children = _pairs(
        [
            ("Receiver served", text_update(pv_name("SenderRunning"), 150, 0, 100)),
            ("Client", text_update(pv_name("SenderClient"), 150, 0, 220)),
            ("Into qSender", text_update(pv_name("SendRate"), 150, 0, 120)),
            ("On the wire", text_update(pv_name("SenderWireRate"), 150, 0, 120)),
            ("Replies", text_update(pv_name("SenderReplies"), 150, 0, 120)),
            ("Sent", text_update(pv_name("SenderBytes"), 150, 0, 120)),
            ("Re-queued", text_update(pv_name("SenderRequeued"), 150, 0, 120)),
        ]
    )
    return group("Sender", x, y, 400, 280, children)


BOARD_COLUMNS = (
    ("Card", 0, 40),
    ("Board", 45, 90),
    ("Enable", 140, 100),
    ("FIFO (trigger)", 245, 150),
    ("Package data", 400, 90),
    ("Rate", 495, 90),
    ("Total", 590, 90),
    ("Errors", 685, 80),
    ("Lost", 770, 90),
    ("FIFO peak", 865, 80),
    ("First error [code, offset, x1, x2]", 950, 130),
    ("Spectra", 1085, 55),
    ("Rates", 1145, 55),
)
SIM_COLUMNS = (
    ("Card", 0, 40),
    ("Board", 45, 90),
    ("Events/s", 140, 100),
    ("Trace samples", 245, 90),
    ("Header", 340, 90),
    ("Inject fault (running)", 435, 170),
    ("Generated", 610, 110),
    ("Dropped", 725, 100),
    ("Cleared", 830, 100),
)


def _column(columns: tuple, title: str) -> tuple[int, int]:
    for name, x, w in columns:
        if name == title:
            return x, w
    raise KeyError(title)


def _header(columns: tuple, y: int) -> list[ET.Element]:
    return [label(name, x + 10, y, w) for name, x, w in columns]


def _rows(prefix: str, columns: tuple, title: str, x: int, y: int, h: int) -> ET.Element:
    children = _header(columns, 0)
    for card in range(CARDS):
        macros = {"CARD": str(card), "BOARD": f"$(BOARD{card})"}
        children.append(
            embedded(
                f"{prefix}_$(KIND{card}).bob",
                macros,
                f"{prefix} card {card}",
                10,
                25 + ROW_HEIGHT * card,
                ROW_WIDTH,
                ROW_HEIGHT,
            )
        )
    return group(title, x, y, 1240, h, children)


def _trace(x: int, y: int) -> ET.Element:
    children = [
        label("Card", 10, 5, 40),
        combo(pv_name("TraceBd"), 50, 5, 70, items=[str(n) for n in range(CARDS)]),
        label("Channel", 135, 5, 60),
        combo(pv_name("TraceChan"), 195, 5, 70, items=[str(n) for n in range(TRACE_CHANNELS)]),
        label("Mark bits", 280, 5, 70),
        bool_button(pv_name("TraceHorns"), 350, 5, 80),
        label("Samples", 445, 5, 60),
        text_update(pv_name("TraceLen"), 505, 5, 80),
        xy_plot(pv_name("Trace"), "Trace", 10, 40, 600, 340, x_title="Sample",
                x_max=TRACE_SAMPLES, y_title="ADC counts", y_max=ADC_FULL_SCALE),
    ]
    return group("Trace", x, y, 630, 420, children)


def _inloop(x: int, y: int) -> ET.Element:
    rows = [
        ("Crate number", text_update(pv_name("CrateNum"), 150, 0, 110)),
        ("Read (MiB)", text_update(pv_name("InLoop1"), 150, 0, 110)),
        ("Type-F headers", text_update(pv_name("InLoop2"), 150, 0, 110)),
        ("Board polls", text_update(pv_name("InLoop3"), 150, 0, 110)),
        ("Last transfer", text_update(pv_name("InLoop4"), 150, 0, 110)),
        ("Longest poll gap", text_update(pv_name("ScanGapMax"), 150, 0, 110)),
        ("Real-time read", text_update(pv_name("RealTime"), 150, 0, 110)),
        ("Read errors", text_update(pv_name("ReadErrors"), 150, 0, 110)),
    ]
    slots = [
        (f"Slot {n + 1} board type", text_update(pv_name("BoardType", n=n), 150, 0, 110))
        for n in range(SLOTS)
    ]
    return group("inLoop", x, y, 300, 480, _pairs(rows + slots, y0=0))


def _checks(x: int, y: int) -> ET.Element:
    children = _pairs(
        [
            ("Header check", bool_button(pv_name("HeaderCheckEnable"), 150, 0, 90)),
            ("Timestamp check", bool_button(pv_name("TimestampCheckEnable"), 150, 0, 90)),
            ("Every event", bool_button(pv_name("DeepCheckEnable"), 150, 0, 90)),
        ]
    )
    children.append(label("Set-up changes apply at the next Start", 10, 95, 280, 20))
    return group("Checks", x, y, 300, 150, children)


def crate_screen() -> str:
    widgets = [
        label("DGS crate $(CRATE)", 10, 10, 600, 30, size=18),
        _run_control(10, 50),
        _crate_status(10, 200),
        _buffers(420, 50),
        _sender(850, 50),
        _rows("row", BOARD_COLUMNS, "Boards (by card index)", 10, 340, 270),
        _trace(10, 620),
        _inloop(650, 620),
        _checks(960, 620),
        _rows("sim", SIM_COLUMNS, "Simulation (sim backend only)", 10, 1110, 270),
    ]
    return display("DGS crate $(CRATE)", 1260, 1390, widgets)


# Row displays (one per board kind), embedded by the crate screen.


def _cell(columns: tuple, title: str, make, *args) -> ET.Element:
    x, w = _column(columns, title)
    return make(*args, x, 2, w)


def board_row(kind: str) -> str:
    """One card's row of the board table: set-up of the board, statistics of the card."""
    cells = [_cell(BOARD_COLUMNS, "Card", label, "$(CARD)")]
    if kind == "empty":
        cells.append(_cell(BOARD_COLUMNS, "Board", label, "(empty)"))
    else:  # the board's name opens its register screen (ioc/register_screens.py)
        x, w = _column(BOARD_COLUMNS, "Board")
        registers = {"CRATE": "$(CRATE)", "BOARD": "$(BOARD)"}
        cells.append(open_button(f"registers_{kind}.bob", registers, "$(BOARD)", x, 2, w, 25))
    if kind == "empty":
        placeholder = placeholder_name("PlaceholderEna")
        cells.append(_cell(BOARD_COLUMNS, "Enable", text_update, placeholder))
    else:
        board_kind = BoardKind.TRIGGER_MASTER if kind == "trigger" else BoardKind.DIGITIZER_MASTER
        cells.append(_cell(BOARD_COLUMNS, "Enable", bool_button, pv_name("CS_Ena")))
        if kind == "trigger":
            cells.append(_cell(BOARD_COLUMNS, "FIFO (trigger)", combo, pv_name("FifoNum")))
        package = pv_name("PackageData", kind=board_kind)
        cells.append(_cell(BOARD_COLUMNS, "Package data", text_entry, package))
        cells.append(_cell(BOARD_COLUMNS, "FIFO peak", text_update, pv_name("FifoPeak")))
    if kind == "digitizer":  # live monitoring screens (ioc/monitor_screens.py)
        board = {"CRATE": "$(CRATE)", "BOARD": "$(BOARD)"}
        for title, file in (("Spectra", "spectrum.bob"), ("Rates", "rates.bob")):
            x, w = _column(BOARD_COLUMNS, title)
            cells.append(open_button(file, board, title, x, 2, w, 25))
    for title, key in (
        ("Rate", "DataRate"),
        ("Total", "Data"),
        ("Errors", "Errors"),
        ("Lost", "DataLost"),
        ("First error [code, offset, x1, x2]", "FirstError"),
    ):
        cells.append(_cell(BOARD_COLUMNS, title, text_update, pv_name(key)))
    return display(f"Board row ({kind})", ROW_WIDTH, ROW_HEIGHT, cells)


def sim_row(kind: str) -> str:
    """One card's simulation controls (sim backend); nothing for an empty card."""
    cells = [_cell(SIM_COLUMNS, "Card", label, "$(CARD)")]
    if kind == "empty":
        cells.append(_cell(SIM_COLUMNS, "Board", label, "(empty)"))
        return display("Simulation row (empty)", ROW_WIDTH, ROW_HEIGHT, cells)
    cells += [
        _cell(SIM_COLUMNS, "Board", label, "$(BOARD)"),
        _cell(SIM_COLUMNS, "Events/s", text_entry, pv_name("SimEventRate")),
    ]
    if kind == "digitizer":
        cells += [
            _cell(SIM_COLUMNS, "Trace samples", text_entry, pv_name("SimTraceLength")),
            _cell(SIM_COLUMNS, "Header", combo, pv_name("SimHeaderType")),
        ]
    cells += [
        _cell(SIM_COLUMNS, "Inject fault (running)", combo, pv_name("SimFault")),
        _cell(SIM_COLUMNS, "Generated", text_update, pv_name("SimGenerated")),
        _cell(SIM_COLUMNS, "Dropped", text_update, pv_name("SimDropped")),
        _cell(SIM_COLUMNS, "Cleared", text_update, pv_name("SimCleared")),
    ]
    return display(f"Simulation row ({kind})", ROW_WIDTH, ROW_HEIGHT, cells)


# The system summary: one row per crate, each opening that crate's screen.

SUMMARY_COLUMNS = (
    ("Crate", 0, 60),
    ("State", 65, 100),
    ("Into sender", 170, 110),
    ("On the wire", 285, 110),
    ("Free buffers", 400, 160),
    ("Written", 565, 70),
    ("Sender", 640, 70),
    ("Lost %", 715, 80),
    ("Pool", 800, 70),
    ("Global PVs", 875, 110),
    ("", 990, 110),
)
SUMMARY_WIDTH = 1110


def crate_summary() -> str:
    """A crate's row of the system screen (macros as for crate.bob)."""
    macros = {"CRATE": "$(CRATE)"}
    for card in range(CARDS):
        macros[f"BOARD{card}"] = f"$(BOARD{card})"
        macros[f"KIND{card}"] = f"$(KIND{card})"

    def cell(title: str, make, *args) -> ET.Element:
        x, w = _column(SUMMARY_COLUMNS, title)
        return make(*args, x, 2, w)

    free_x, free_w = _column(SUMMARY_COLUMNS, "Free buffers")
    cells = [
        cell("Crate", label, "$(CRATE)"),
        cell("State", text_update, pv_name("State")),
        cell("Into sender", text_update, pv_name("SendRate")),
        cell("On the wire", text_update, pv_name("SenderWireRate")),
        progress_bar(pv_name("NumFreeBuffers"), POOL_SIZE, free_x, 4, free_w - 55),
        text_update(pv_name("NumFreeBuffers"), free_x + free_w - 50, 2, 50),
        cell("Written", text_update, pv_name("NumWrittenBuffers")),
        cell("Sender", text_update, pv_name("NumSendBuffers")),
        cell("Lost %", text_update, pv_name("BufLostPerecnt")),
        cell("Pool", text_update, pv_name("BuffersOK")),
        cell("Global PVs", text_update, pv_name("GlobalsConnected")),
        open_button("crate.bob", macros, "Crate $(CRATE)...", 990, 0, 110, ROW_HEIGHT),
    ]
    return display("Crate summary row", SUMMARY_WIDTH, ROW_HEIGHT, cells)


def system_screen(system: SystemConfig, title: str = "DGS system") -> str:
    """Global run control and one summary row per crate of the configuration."""
    top = 240
    widgets = [
        label(title, 10, 10, 600, 30, size=18),
        _run_control(10, 50, "Run control (every crate)"),
        *[label(name, x + 10, top - 30, w) for name, x, w in SUMMARY_COLUMNS if name],
    ]
    for i, crate in enumerate(system.crates):
        widgets.append(
            embedded(
                "crate_summary.bob",
                crate_macros(crate),
                f"Crate {crate.crate}",
                10,
                top + i * (ROW_HEIGHT + 5),
                SUMMARY_WIDTH,
                ROW_HEIGHT,
            )
        )
    height = top + len(system.crates) * (ROW_HEIGHT + 5) + 20
    return display(title, SUMMARY_WIDTH + 20, height, widgets)


def example_systems() -> dict[str, SystemConfig]:
    """System screens kept in ``opi/``: the demo and the three-crate example."""
    return {
        "system.bob": demo_config(),
        "three-crates.bob": load_config(EXAMPLES_DIR / "three-crates.toml"),
    }


def generated_screens() -> dict[str, str]:
    """File name in ``opi/`` -> contents: the generic screens and the example systems."""
    from ioc.monitor_screens import monitor_screens  # these build on this module's widgets
    from ioc.register_screens import register_screens

    files = {"crate.bob": crate_screen(), "crate_summary.bob": crate_summary()}
    files.update(register_screens())
    files.update(monitor_screens())
    for name, system in example_systems().items():
        title = "DGS demo system" if system.source == "demo" else f"DGS system ({name[:-4]})"
        files[name] = system_screen(system, title)
    for kind in KINDS:
        files[f"row_{kind}.bob"] = board_row(kind)
        files[f"sim_{kind}.bob"] = sim_row(kind)
    return files


# Reading screens back (tests, --check).

_MACRO = re.compile(r"\$\((\w+)\)|\$\{(\w+)\}")


def expand(text: str, macros: Macros) -> str:
    """Substitute ``$(NAME)`` / ``${NAME}``; unknown names stay as they are."""
    return _MACRO.sub(lambda m: macros.get(m.group(1) or m.group(2), m.group(0)), text)


def _macros_of(element: ET.Element | None, macros: Macros) -> Macros:
    if element is None:
        return {}
    return {child.tag: expand(child.text or "", macros) for child in element}


@dataclass
class ScreenScan:
    """What a screen names once its macros are expanded, embedded displays included."""

    pvs: set[str] = field(default_factory=set)
    opens: list[tuple[Path, Macros]] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)
    unresolved: set[str] = field(default_factory=set)


def scan_screen(path: Path, macros: Macros, scan: ScreenScan | None = None) -> ScreenScan:
    """Every PV name and display a screen refers to, following embedded displays."""
    scan = scan or ScreenScan()
    root = ET.parse(path).getroot()
    scan.files.add(path.resolve())
    macros = {**macros, **_macros_of(root.find("macros"), macros)}  # display's own win
    for widget in root.iter("widget"):
        own = expand(widget.findtext("pv_name") or "", macros)
        names = [own]
        for action in widget.iterfind("actions/action"):
            if action.get("type") == "write_pv":
                names.append(expand(action.findtext("pv_name") or "", {**macros, "pv_name": own}))
            elif action.get("type") == "open_display":
                target = path.parent / expand(action.findtext("file") or "", macros)
                scan.opens.append((target, _macros_of(action.find("macros"), macros)))
        for trace in widget.iterfind("traces/trace"):
            names += [expand(trace.findtext(tag) or "", macros) for tag in ("x_pv", "y_pv")]
        names += [expand(rule.text or "", macros) for rule in widget.iterfind("rules/rule/pv_name")]
        for name in filter(None, names):
            (scan.unresolved if "$" in name else scan.pvs).add(name)
        for tab in widget.iterfind("tabs/tab"):  # navigation tabs: embedded displays too
            inner = {**macros, **_macros_of(tab.find("macros"), macros)}
            scan_screen(path.parent / expand(tab.findtext("file") or "", inner), inner, scan)
        if widget.get("type") == "embedded":
            inner = {**macros, **_macros_of(widget.find("macros"), macros)}
            target = path.parent / expand(widget.findtext("file") or "", inner)
            if "$" in target.name:
                scan.unresolved.add(str(target))
            else:
                scan_screen(target, inner, scan)
    return scan


def check_screen(path: Path) -> list[str]:
    """Format problems: parse, display version, known widget types/versions, integer geometry."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        return [f"{path.name}: {error}"]
    problems = []
    if root.tag != "display" or root.get("version") != DISPLAY_VERSION:
        problems.append(f"{path.name}: root must be <display version={DISPLAY_VERSION!r}>")
    for widget in root.iter("widget"):
        kind, name = widget.get("type"), widget.findtext("name")
        if kind not in WIDGET_VERSIONS:
            problems.append(f"{path.name}: {name}: unknown widget type {kind!r}")
        elif widget.get("version") != WIDGET_VERSIONS[kind]:
            problems.append(f"{path.name}: {name}: {kind} must be version {WIDGET_VERSIONS[kind]}")
        for tag in ("x", "y", "width", "height"):
            text = widget.findtext(tag)
            if text is None or not text.isdigit():
                problems.append(f"{path.name}: {name}: {tag} {text!r} is not an integer >= 0")
    for tag in ("width", "height"):
        if not (root.findtext(tag) or "").isdigit():
            problems.append(f"{path.name}: display {tag} is not an integer")
    return problems


def stale_screens(directory: Path = OPI_DIR) -> list[str]:
    """Names of the screens in ``directory`` that differ from the generated ones."""
    return stale(generated_screens(), directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ioc.screens",
        description="Generate the Phoebus screens in opi/ from the PV table.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write the screens into opi/")
    action.add_argument("--check", action="store_true", help="fail if opi/ is out of date")
    action.add_argument(
        "--system", metavar="FILE", type=Path, help="write a system screen for --config"
    )
    action.add_argument("--url", action="store_true", help="print the crate screen's URL")
    parser.add_argument("--config", metavar="TOML", help="system configuration (default: demo)")
    parser.add_argument("--crate", metavar="NN", help="crate for --url")
    parser.add_argument("--dir", type=Path, default=OPI_DIR, help="screen directory (opi/)")
    args = parser.parse_args(argv)
    if args.write or args.check:
        return write_or_check(generated_screens(), args.dir, args.write, "python -m ioc.screens")
    system = load_config(args.config) if args.config else demo_config()
    if args.system:
        title = f"DGS system ({Path(args.config).stem if args.config else 'demo'})"
        args.system.write_text(system_screen(system, title))
        print(f"wrote {args.system} (open it from {args.dir}: it embeds crate_summary.bob)")
        return 0
    try:
        crate = system.crate(args.crate)
    except ConfigError as error:
        print(f"python -m ioc.screens: {error}", file=sys.stderr)
        return 2
    print(resource_url(crate, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

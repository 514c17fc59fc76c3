"""Register screens (Phoebus) per board kind, generated from the register map.

``opi/registers_<row kind>.bob`` (macros ``CRATE``, ``BOARD``) lists every
setting of a board as the original IOC served it: the record, a control
matching its type (toggle, drop-down or entry) and its readback (``..._RBV``)
next to it, then the readbacks with no setting (status). The board rows of the
crate screen open it from the board's name. Internal records of the original
(``...LONGOUT``, ``...LONGIN``, ``...CALC``) are not shown.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from ioc.hardware import BoardKind
from ioc.registermap import BOARD_MAPS, MapRecord, load
from ioc.screens import bool_button, combo, display, label, text_entry, text_update

#: Row kind of the crate screen (KINDn macro) -> the board kind whose map it shows
#: (a slave digitizer's records have the same names as a master's).
SCREEN_KINDS = {"digitizer": BoardKind.DIGITIZER_MASTER, "trigger": BoardKind.TRIGGER_MASTER}
INTERNAL_SUFFIXES = ("LONGOUT", "LONGIN", "CALC")
RAW_REGISTER_PREFIXES = ("reg_", "regin_")
PREFIX = "VME$(CRATE):$(BOARD):"
ROW_H = 24
NAME_W, VALUE_W = 250, 130
COLUMN_W = NAME_W + 2 * VALUE_W + 30
COLUMNS = 3
TOP = 50


def file_name(kind: str) -> str:
    return f"registers_{kind}.bob"


def _short(record: MapRecord) -> str:
    return record.name.rpartition(":")[2]


def _control(record: MapRecord, x: int, y: int) -> ET.Element:
    pv = PREFIX + _short(record)
    if record.rtype == "bo":
        return bool_button(pv, x, y, VALUE_W, ROW_H - 2)
    if record.rtype == "mbbo":
        return combo(pv, x, y, VALUE_W, ROW_H - 2)
    return text_entry(pv, x, y, VALUE_W, ROW_H - 2)


def _rows(records: tuple[MapRecord, ...]) -> list[tuple[MapRecord | None, MapRecord | None]]:
    """(setting, its readback) pairs, then (None, readback) for readbacks of no setting."""
    shown = [r for r in records if not _short(r).endswith(INTERNAL_SUFFIXES)]
    by_name = {_short(r): r for r in shown}
    settings = sorted(  # user-level settings first, whole registers (reg_*) after
        (r for r in shown if r.rtype in ("bo", "mbbo", "ao", "longout")),
        key=lambda r: _short(r).startswith(RAW_REGISTER_PREFIXES),
    )
    paired = {f"{_short(r)}_RBV" for r in settings}
    rows: list[tuple[MapRecord | None, MapRecord | None]] = [
        (r, by_name.get(f"{_short(r)}_RBV")) for r in settings
    ]
    rows += [(None, r) for r in shown if r not in settings and _short(r) not in paired]
    return rows


def register_screen(kind: str) -> str:
    """The register screen of one row kind of the crate screen."""
    rows = _rows(load(BOARD_MAPS[SCREEN_KINDS[kind]]))
    per_column = -(-len(rows) // COLUMNS)
    widgets = [label(f"$(BOARD) registers, crate $(CRATE) ({kind})", 10, 10, 800, 30, size=16)]
    for index, (setting, readback) in enumerate(rows):
        x = 10 + (index // per_column) * COLUMN_W
        y = TOP + (index % per_column) * ROW_H
        widgets.append(label(_short(setting or readback), x, y, NAME_W, ROW_H - 2))
        if setting is not None:
            widgets.append(_control(setting, x + NAME_W + 5, y))
        if readback is not None:
            widgets.append(
                text_update(PREFIX + _short(readback), x + NAME_W + VALUE_W + 10, y, VALUE_W,
                            ROW_H - 2)
            )
    width = 20 + COLUMNS * COLUMN_W
    return display("$(BOARD) registers", width, TOP + per_column * ROW_H + 20, widgets)


def register_screens() -> dict[str, str]:
    """File name in ``opi/`` -> contents, one per board row kind."""
    return {file_name(kind): register_screen(kind) for kind in SCREEN_KINDS}

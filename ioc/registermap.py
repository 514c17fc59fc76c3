"""The register map: the original crate IOC's record set, kept as data in ``ioc/registermap/``.

The JSON files are facts taken once from the original's databases by
``tools/extract_registermap.py``: per record its name (with ``{crate}`` /
``{board}`` placeholders), record type, the register bit field it is bound to,
links to other records, and the fields an operator sees. This module only
loads them; `ioc.register_db` turns them into records and `ioc.register_io`
moves values between those records and the boards.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ioc.hardware import BoardKind

MAP_DIR = Path(__file__).resolve().parent / "registermap"
#: Map file of each board kind (its register templates).
BOARD_MAPS = {
    BoardKind.DIGITIZER_MASTER: "digitizer_master.json",
    BoardKind.DIGITIZER_SLAVE: "digitizer_slave.json",
    BoardKind.TRIGGER_MASTER: "trigger_master.json",
}
#: Field-name prefixes of the 16 states of an mbbi/mbbo record (..ST string, ..VL value).
MBB_PREFIXES = (
    "ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV", "TT", "FT", "FF",
)  # fmt: skip
#: Records every board has (read-out enable and FIFO selector).
PER_BOARD_MAP = "board.json"
#: Crate-level records: the crate's read-out records and its global fan-outs.
CRATE_MAP = "crate.json"
#: The original globals soft IOC's records (ScriptStage, Setup_Script_State, fan-outs).
GLOBALS_MAP = "globals.json"


@dataclass(frozen=True)
class Binding:
    """A bit field of a 32-bit register; ``write`` for outputs, else a readback."""

    register: str
    mask: int
    shift: int
    write: bool


@dataclass(frozen=True)
class Link:
    """A link to another record: its name (placeholders unresolved), field and flags."""

    record: str
    field: str = ""
    flags: str = ""


@dataclass(frozen=True)
class MapRecord:
    """One record of the map, placeholders unresolved."""

    name: str
    rtype: str
    fields: dict[str, str] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    binding: Binding | None = None
    #: "Raw Soft Channel" in the original: the value passes through RVAL (ESLO/EOFF).
    raw: bool = False


    @property
    def state_values(self) -> tuple[int, ...]:
        """Values of the defined states of an mbbi/mbbo, in state order."""
        values = []
        for prefix in MBB_PREFIXES:
            if f"{prefix}ST" not in self.fields and f"{prefix}VL" not in self.fields:
                break
            values.append(int(self.fields.get(f"{prefix}VL", "0"), 0))
        return tuple(values)


def _record(entry: dict) -> MapRecord:
    register = entry.get("register")
    return MapRecord(
        name=entry["name"],
        rtype=entry["type"],
        fields=entry.get("fields", {}),
        links={name: Link(**link) for name, link in entry.get("links", {}).items()},
        binding=(
            Binding(register["name"], register["mask"], register["shift"], register["write"])
            if register
            else None
        ),
        raw=entry.get("raw", False),
    )


@functools.cache
def load(file_name: str) -> tuple[MapRecord, ...]:
    """The records of one map file, in the original's order."""
    document = json.loads((MAP_DIR / file_name).read_text())
    return tuple(_record(entry) for entry in document["records"])


def resolve(template: str, crate: str, board: str = "") -> str:
    """A record name with its placeholders filled in."""
    return template.replace("{crate}", crate).replace("{board}", board)

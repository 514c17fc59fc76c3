"""Write the register map (``ioc/registermap/*.json``) from the original crate IOC's databases.

Run once, when the original's databases change:

    git clone https://github.com/goluckyryan/ANLDAQ /tmp/ANLDAQ      # or use a bare mirror
    .venv/bin/python tools/extract_registermap.py --source /tmp/ANLDAQ
    .venv/bin/python tools/extract_registermap.py --git-dir /path/to/ANLDAQ.git

It keeps facts only, as data the IOC builds its own records from: per record its
name (``{crate}`` / ``{board}`` where the original had macros or, in the crate's
globals, the crate number), record type, the register it is bound to (register
name, bit mask, bit shift, direction), links to other records as structured
references, and the fields an operator sees (units, precision, conversion, enum
strings and values, limits, alarms, scan, description). No template text is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "ioc" / "registermap"

#: Output file -> (databases of the original, which crate number its names spell out).
SOURCES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "digitizer_master.json": (
        (
            "ioc/db/MDigRegisters.template",
            "ioc/db/MDigUser.template",
            "ioc/db/MDigRegistersVME.template",
            "ioc/db/MDigUserVME.template",
        ),
        None,
    ),
    "digitizer_slave.json": (
        (
            "ioc/db/SDigRegisters.template",
            "ioc/db/SDigUser.template",
            "ioc/db/SDigRegistersVME.template",
            "ioc/db/SDigUserVME.template",
        ),
        None,
    ),
    "trigger_master.json": (("ioc/db/MTrigRegisters.template", "ioc/db/MTrigUser.template"), None),
    "board.json": (("ioc/db/daqSegment2.template",), None),
    "crate.json": (("ioc/db/daqCrate.template", "ioc/db/dgsGlobals_DGS_VME01.db"), "01"),
    "globals.json": (
        ("EPICS/softIOC/db/JustGlobals.db", "EPICS/softIOC/db/dgsSupport.db"),
        None,
    ),
}

#: Fields holding links to other records (structured references in the map).
LINK_FIELDS = frozenset(
    {"INP", "OUT", "FLNK", "DOL", "SDIS", "SELL"}
    | {f"INP{c}" for c in "ABCDEFGHIJKL"}
    | {f"OUT{c}" for c in "ABCDEFGHIJKLMNOP"}
)
#: Fields the IOC decides itself (soft records, no hardware device support).
DROPPED_FIELDS = frozenset({"DTYP"})

_RECORD = re.compile(
    r'record\(\s*(\w+)\s*,\s*(?:"([^"]+)"|([^\s,)"]+))\s*\)\s*\{(.*?)\}', re.S
)
_FIELD = re.compile(r'field\(\s*(\w+)\s*,\s*(?:"([^"]*)"|([^)\s]*))\s*\)')
_ASYN = re.compile(r"@asynMask\(\s*[^,]+,\s*\d+\s*,\s*(0x[0-9a-fA-F]+|\d+)\s*,[^)]*\)\s*(\w+)")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
#: The original driver's tag for a bit field given as width and shift (0xaaaaWWSS).
FIELD_TAG = 0xAAAA0000


def _strip_comments(text: str) -> str:
    """Drop ``#`` comments (outside quotes) so commented-out records are not read."""
    lines = []
    for line in text.splitlines():
        quoted = False
        for index, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                line = line[:index]
                break
        lines.append(line)
    return "\n".join(lines)


def bit_field(mask_text: str) -> tuple[int, int]:
    """(mask, shift) of an asynMask mask: plain masks, or the driver's 0xaaaaWWSS field."""
    mask = int(mask_text, 0)
    if mask & 0xFFFF0000 == FIELD_TAG and mask != FIELD_TAG:
        width, shift = (mask >> 8) & 0xFF, mask & 0xFF
        return ((1 << width) - 1) << shift & 0xFFFFFFFF, shift
    shift = (mask & -mask).bit_length() - 1 if mask else 0
    return mask, shift


def _templated(name: str, crate: str | None) -> str:
    name = name.replace("$(CRATE)", "{crate}").replace("$(BOARD)", "{board}")
    if crate is not None:
        name = name.replace(f"VME{crate}:", "VME{crate}:").replace(f"DAQC{crate}", "DAQC{crate}")
    return name


def _link(value: str, crate: str | None) -> dict | None:
    """A link to another record as {record, field?, flags?}; None for constants."""
    parts = value.split()
    if not parts or _NUMBER.match(parts[0]):
        return None
    target, _, field = parts[0].partition(".")
    link = {"record": _templated(target, crate)}
    if field:
        link["field"] = field
    if parts[1:]:
        link["flags"] = " ".join(parts[1:])
    return link


def records_of(text: str, crate: str | None) -> list[dict]:
    """The facts of every record of one database file, in file order."""
    records = []
    for rtype, quoted_name, bare_name, body in _RECORD.findall(_strip_comments(text)):
        # EPICS 7 refuses blanks in names that older releases let through ("x _RBV").
        name = "".join((quoted_name or bare_name).split())
        record: dict = {"name": _templated(name, crate), "type": rtype}
        fields: dict[str, str] = {}
        links: dict[str, dict] = {}
        for field, quoted, bare in _FIELD.findall(body):
            value = (quoted if quoted or not bare else bare).strip()
            asyn = _ASYN.match(value)
            if asyn:
                mask, shift = bit_field(asyn.group(1))
                record["register"] = {
                    "name": asyn.group(2),
                    "mask": mask,
                    "shift": shift,
                    "write": field == "OUT",
                }
            elif field in LINK_FIELDS:
                link = _link(value, crate)
                if link is not None:
                    links[field] = link
                elif value:
                    fields[field] = value
            elif field not in DROPPED_FIELDS:
                fields[field] = _templated(value, crate)
            if field == "DTYP" and value == "Raw Soft Channel":
                record["raw"] = True
        if fields:
            record["fields"] = fields
        if links:
            record["links"] = links
        records.append(record)
    return records


def _git_reader(git_dir: Path):
    def read(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(git_dir), "show", f"HEAD:{path}"],
            check=True, capture_output=True, text=True,
        ).stdout

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", type=Path, help="a checkout of goluckyryan/ANLDAQ")
    where.add_argument("--git-dir", type=Path, help="a bare clone of goluckyryan/ANLDAQ")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    read = _git_reader(args.git_dir) if args.git_dir else (
        lambda path: (args.source / path).read_text(errors="replace")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for out_name, (paths, crate) in SOURCES.items():
        records: list[dict] = []
        seen: set[str] = set()
        for path in paths:
            for record in records_of(read(path), crate):
                if record["name"] not in seen:
                    seen.add(record["name"])
                    records.append(record)
        document = {"source": list(paths), "records": records}
        text = json.dumps(document, separators=(",", ":"), sort_keys=False)
        (args.out / out_name).write_text(text + "\n")
        print(f"{args.out / out_name}: {len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())

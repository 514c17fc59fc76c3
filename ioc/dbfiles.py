"""The EPICS database material in ``db/``, generated from `ioc.pvs.PV_TABLE`.

Engineers read the record list in ``db/`` rather than Python, and the IOC loads
the access-security rules written here, so both are derived from the one PV
table instead of being kept by hand:

- ``db/crate.db``: every record of a crate (the demo crate's boards, crate id
  as the macro ``$(CRATE)``), with the fields the IOC gives it;
- ``db/globals.db``: the three global run-control records;
- ``db/dgs.acf``: the access-security groups of the ASG fields, as the IOC
  loads them by default (set-up writable at any time, as in the original);
- ``db/dgs-run-protect.acf``: the same with ``run_protect = true``;
- ``db/registers_<board kind>.db``, ``db/registers_crate.db``,
  ``db/registers_globals.db``: the original IOCs' records the IOC builds from
  the register map (``ioc/registermap``, `ioc.register_db`), each register
  binding in a comment; records already in the files above are left out.

``python -m ioc.dbfiles --write`` regenerates them; ``--check`` fails when the
files on disk differ from what the table gives (the test does the same).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ioc.config import CrateConfig, demo_config
from ioc.hardware import BoardKind
from ioc.pvs import PV, PV_TABLE, Access, BoardRef, Instance, Scope, expand
from ioc.recfields import derived_fields
from ioc.register_db import build as build_register_db
from ioc.register_db import render as render_registers
from ioc.registermap import CRATE_MAP
from ioc.registermap import load as load_map

DB_DIR = Path(__file__).resolve().parent.parent / "db"
CRATE_MACRO = "$(CRATE)"
BOARD_MACRO = "$(BOARD)"
#: Characters of DESC an IOC keeps (a 40-byte field holding its terminating NUL).
DESC_MAX = 39
COMMENT_WIDTH = 96
#: Field names of the 16 states of an mbbi/mbbo record.
MBB_STATE_FIELDS = (
    "ZRST", "ONST", "TWST", "THST", "FRST", "FVST", "SXST", "SVST",
    "EIST", "NIST", "TEST", "ELST", "TVST", "TTST", "FTST", "FFST",
)  # fmt: skip
WAVEFORM_FTVL = {"int16": "SHORT", "int32": "LONG", "float64": "DOUBLE"}
#: The record whose value decides RUNPROTECT (0 = Stop).
RUN_CONTROL_PV = "Online_CS_StartStop"

#: Rules the IOC adds to the table's ranges at run time (app.py).
RUNTIME_RULES = {
    "PackageData": "unique in the system",
    "SimFault": "a fault only while running with the board enabled",
}
#: The register-map records (db/registers_*.db) in the access groups.
REGISTER_MEMBERS = {
    Access.DEFAULT: ("every other record of db/registers_*.db (the original had no rules)",),
    Access.READONLY: ("the register readbacks of db/registers_*.db (..._RBV)",),
}
ACCESS_NOTES = {
    Access.DEFAULT: "clients may write at any time",
    Access.RUNPROTECT: "crate set-up, sampled at Start: writable at any time; with "
    f"run_protect = true only while {RUN_CONTROL_PV} = Stop",
    Access.READONLY: "never writable by clients",
}


@dataclass(frozen=True)
class DbRecord:
    """One record of a ``.db`` file: name, record type and fields in file order."""

    name: str
    rtype: str
    fields: tuple[tuple[str, str], ...]

    def field(self, name: str) -> str | None:
        return dict(self.fields).get(name)


def record_fields(pv: PV) -> tuple[tuple[str, str], ...]:
    """The fields the IOC sets on a record of this table row (records.py)."""
    fields = [("DESC", pv.desc[:DESC_MAX]), ("ASG", pv.asg.value)]
    if pv.egu:
        fields.append(("EGU", pv.egu))
    if pv.prec is not None:
        fields.append(("PREC", str(pv.prec)))
    fields += derived_fields(pv)
    if pv.record in ("bi", "bo"):
        fields += [("ZNAM", pv.enums[0]), ("ONAM", pv.enums[1])]
    elif pv.record in ("mbbi", "mbbo"):
        fields += list(zip(MBB_STATE_FIELDS, pv.enums))
    elif pv.record == "waveform":
        fields += [("NELM", str(pv.length)), ("FTVL", WAVEFORM_FTVL[pv.dtype])]
    return tuple(fields)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def writes_note(pv: PV) -> str:
    """What a client may write, in words (the validator's rule), or '' for inputs."""
    if pv.asg is Access.READONLY:
        return ""
    if pv.enums:
        low = int(pv.low) if pv.low is not None else 0
        high = int(pv.high) if pv.high is not None else len(pv.enums) - 1
        if high - low < 4:
            text = " / ".join(f'{i} "{pv.enums[i]}"' for i in range(low, high + 1))
        else:
            text = f"index {low}..{high}"
    elif pv.low is not None and pv.high is not None:
        text = f"{_number(pv.low)}..{_number(pv.high)}"
    elif pv.low is not None:
        text = f">= {_number(pv.low)}"
    else:
        text = "any value"
    if pv.even:
        text += ", even"
    if pv.key in RUNTIME_RULES:
        text += f", {RUNTIME_RULES[pv.key]}"
    return f"writes {text}"


def _comment(pv: PV) -> list[str]:
    parts = [pv.desc, f"{pv.asg.value}: {ACCESS_NOTES[pv.asg]}"]
    note = writes_note(pv)
    if note:
        parts.append(note)
    if pv.scope is Scope.SIM:
        parts.append("sim backend only")
    return textwrap.wrap("; ".join(parts), COMMENT_WIDTH, initial_indent="# ",
                         subsequent_indent="#   ")


def render_records(instances: Iterable[Instance]) -> str:
    """Records in `.db` syntax, one comment per table row before its first record."""
    lines: list[str] = []
    last: PV | None = None
    for inst in instances:
        if inst.pv is not last:
            lines += ["", *_comment(inst.pv)]
            last = inst.pv
        lines.append(f'record({inst.pv.record}, "{inst.name}") {{')
        lines += [f'    field({name}, "{value}")' for name, value in record_fields(inst.pv)]
        lines.append("}")
    return "\n".join(lines) + "\n"


def board_refs(crate: CrateConfig) -> tuple[BoardRef, ...]:
    return tuple(BoardRef(b.name, b.kind) for b in sorted(crate.boards, key=lambda b: b.card))


def demo_crate() -> CrateConfig:
    return demo_config().crates[0]


def crate_db(crate: CrateConfig | None = None, crate_id: str = CRATE_MACRO) -> str:
    """Every crate record (not the globals) for the crate's boards, sim backend."""
    crate = crate or demo_crate()
    boards = ", ".join(f"{b.name} ({b.kind.name.lower()}, card {b.card})" for b in crate.boards)
    header = "\n".join(
        [
            "# Records of one crate IOC (dgs-ioc), generated from ioc/pvs.py by",
            "#   python -m ioc.dbfiles --write",
            "# Do not edit: change the PV table and regenerate (tests compare this file with",
            "# the table and with a running IOC).",
            *textwrap.wrap(f"Crate id {crate_id}; boards: {boards}.", COMMENT_WIDTH,
                           initial_indent="# ", subsequent_indent="#   "),
            "# Per-board records exist once per configured board; SIM_* only with the sim",
            "# backend; per-card arrays (...0 .. ...6) always all seven. ASG names the",
            "# access-security group of db/dgs.acf.",
        ]
    )
    body = render_records(expand(crate_id, board_refs(crate), with_globals=False))
    return header + "\n" + body


def globals_db() -> str:
    """The global run-control records (a standalone crate or `--globals-only` serves them)."""
    header = (
        "# Global run-control records: one place per system (a standalone crate IOC, or\n"
        "# `dgs-ioc --globals-only` for a multi-crate system). Generated from ioc/pvs.py by\n"
        "#   python -m ioc.dbfiles --write"
    )
    body = render_records(expand("", (), with_globals=True, with_crate=False))
    return header + "\n" + body


def _register_header(what: str) -> str:
    return "\n".join(
        [
            f"# {what}.",
            "# Records of the original IOCs, generated from the register map",
            "# (ioc/registermap, facts of the original databases) by",
            "#   python -m ioc.dbfiles --write",
            "# The IOC serves them as soft records; a client write to one bound to a register",
            "# is merged into that register of the board, readbacks (ASG READONLY) show it.",
            "# Records the IOC's own table defines (crate.db, globals.db) are not repeated.",
        ]
    )


def register_files() -> dict[str, str]:
    """The register-map records: one file per board kind, the crate level, the globals."""
    files = {}
    for kind in BoardKind:
        refs = (BoardRef(BOARD_MACRO, kind),)
        own = [inst.name for inst in expand(CRATE_MACRO, refs, with_globals=False)]
        database = build_register_db(
            CRATE_MACRO, [(BOARD_MACRO, kind)], with_globals=False, already_served=own,
            board_records=True, with_crate=False,
        )
        header = _register_header(f"Per board of kind {kind.value} (macros CRATE, BOARD)")
        files[f"registers_{kind.value}.db"] = header + "\n" + database.text(annotate=True)
    crate = demo_crate()
    own = [inst.name for inst in expand(CRATE_MACRO, board_refs(crate), with_globals=True)]
    boards = [(b.name, b.kind) for b in board_refs(crate)]
    crate = build_register_db(CRATE_MACRO, boards, with_globals=False, already_served=own)
    crate_level = {id(record) for record in load_map(CRATE_MAP)}
    names = ", ".join(name for name, _ in boards)
    header = _register_header(f"Crate level (macro CRATE; fan-outs for boards {names})")
    files["registers_crate.db"] = header + "\n" + render_registers(
        [record for record in crate.records if id(record.source) in crate_level],
        crate.pushed,
        annotate=True,
    )
    global_level = build_register_db(
        "", (), with_crate=False, with_globals=True, already_served=own, remote_prefixes=("VME",)
    )
    header = _register_header(
        "Globals IOC (ScriptStage, Setup_Script_State, fan-outs); the IOC keeps links to\n"
        "# the crates of its configuration only"
    )
    files["registers_globals.db"] = header + "\n" + global_level.text(annotate=True)
    return files


def _group_members(group: Access) -> list[str]:
    templates = []
    for pv in PV_TABLE:
        if pv.asg is group:
            name = pv.template.format(crate=CRATE_MACRO, n="$(N)", board="$(BOARD)")
            if name not in templates:
                templates.append(name)
    return templates


def _run_protect_rules(run_protect: bool) -> list[str]:
    if not run_protect:
        return ["    RULE(1, READ)", "    RULE(0, WRITE, TRAPWRITE)"]
    return [
        f'    INPA("{RUN_CONTROL_PV}")',
        "    RULE(1, READ)",
        "    RULE(0, WRITE, TRAPWRITE) {",
        '        CALC("A=0")',
        "    }",
    ]


def acf_text(run_protect: bool = False) -> str:
    """The access-security file the IOC loads before iocInit (ioc/access.py)."""
    if run_protect:
        mode = [
            "# run_protect = true: RUNPROTECT reads "
            f"{RUN_CONTROL_PV} over Channel Access and",
            "# refuses writes while it is Start; while that link is down (globals IOC",
            "# unreachable) the protected records refuse writes too.",
        ]
    else:
        mode = [
            "# run_protect = false (the default, as in the original): RUNPROTECT records are",
            "# writable at any time; a change applies at the next Start.",
        ]
    lines = [
        "# Access security of the DGS crate IOC, generated from ioc/pvs.py by",
        "#   python -m ioc.dbfiles --write",
        "# The IOC loads this text at start-up; every record's ASG field names its group.",
        "# Rules at level 0 allow writes to values only (VAL, PROC), never to record",
        "# configuration (DESC, EGU, ...). TRAPWRITE sends every write to the put log.",
        *mode,
    ]
    for group in Access:
        lines += ["", f"# {group.value}: {ACCESS_NOTES[group]}."]
        lines += [f"#   {name}" for name in _group_members(group)]
        lines += [f"#   {note}" for note in REGISTER_MEMBERS.get(group, ())]
    lines += [
        "",
        f"ASG({Access.DEFAULT.value}) {{",
        "    RULE(1, READ)",
        "    RULE(0, WRITE, TRAPWRITE)",
        "}",
        "",
        f"ASG({Access.RUNPROTECT.value}) {{",
        *_run_protect_rules(run_protect),
        "}",
        "",
        f"ASG({Access.READONLY.value}) {{",
        "    RULE(1, READ)",
        "}",
    ]
    return "\n".join(lines) + "\n"


def generated_files() -> dict[str, str]:
    """File name in ``db/`` -> contents."""
    return {
        "crate.db": crate_db(),
        "globals.db": globals_db(),
        "dgs.acf": acf_text(run_protect=False),
        "dgs-run-protect.acf": acf_text(run_protect=True),
        **register_files(),
    }


_RECORD = re.compile(r'record\(\s*(\w+)\s*,\s*"([^"]+)"\s*\)\s*\{(.*?)\}', re.S)
_FIELD = re.compile(r'field\(\s*(\w+)\s*,\s*"([^"]*)"\s*\)')


def parse_db(text: str, macros: dict[str, str] | None = None) -> list[DbRecord]:
    """Records of a `.db` file in file order, ``$(NAME)`` macros substituted."""
    for name, value in (macros or {}).items():
        text = text.replace(f"$({name})", value)
    return [
        DbRecord(name, rtype, tuple(_FIELD.findall(body)))
        for rtype, name, body in _RECORD.findall(text)
    ]


def stale(generated: dict[str, str], directory: Path) -> list[str]:
    """Names of the ``generated`` files that are missing or different in ``directory``."""
    return [
        name
        for name, text in generated.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]


def write_or_check(generated: dict[str, str], directory: Path, write: bool, command: str) -> int:
    """The ``--write`` / ``--check`` of a generator: write the files, or list the stale ones.

    Returns the exit code: 1 when checking found stale files, else 0.
    """
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in generated.items():
            (directory / name).write_text(text)
            print(f"wrote {directory / name}")
        return 0
    names = stale(generated, directory)
    for name in names:
        print(f"{directory / name} is out of date: run {command} --write")
    return 1 if names else 0


def stale_files(directory: Path = DB_DIR) -> list[str]:
    """Names of the files in ``directory`` that differ from the generated ones."""
    return stale(generated_files(), directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ioc.dbfiles", description="Regenerate or check db/ from the PV table."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write the files into db/")
    action.add_argument("--check", action="store_true", help="fail if db/ is out of date")
    parser.add_argument("--dir", type=Path, default=DB_DIR, help="directory (default db/)")
    args = parser.parse_args(argv)
    return write_or_check(generated_files(), args.dir, args.write, "python -m ioc.dbfiles")


if __name__ == "__main__":
    sys.exit(main())

"""The original crate IOC's records for the configured boards, as an EPICS database.

From the register map (`ioc.registermap`) this builds, for one IOC, every
record the original served: the boards' register records, the crate's records
and fan-outs, the globals soft IOC's records. They are plain soft records
loaded with ``dbLoadDatabase`` before iocInit (no Python device support, so
thousands of them cost milliseconds); the hardware bindings become the
`RegisterPlan` that `ioc.register_io` follows to reach the boards.

Records the IOC already serves from its own table (`ioc.pvs`) are left out,
and a link is kept only when its target is served here or by a crate IOC of
the system, so no link searches the network for a record nobody serves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ioc.hardware import BoardKind
from ioc.registermap import (
    BOARD_MAPS,
    CRATE_MAP,
    GLOBALS_MAP,
    PER_BOARD_MAP,
    Binding,
    MapRecord,
    load,
    resolve,
)

#: Links followed from a written record to the register records it sets.
OUTPUT_LINKS = frozenset({"OUT", *(f"OUT{c}" for c in "ABCDEFGHIJKLMNOP")})
#: Links by which a record reads another one (readers refreshed after a readback changes).
INPUT_LINKS = frozenset({"INP", *(f"INP{c}" for c in "ABCDEFGHIJKL")})
READONLY_ASG = "READONLY"
_BOARD_OF_NAME = re.compile(r"^VME[^:]+:([^:]+):")


@dataclass(frozen=True)
class Bound:
    """A record bound to a register bit field of one board."""

    name: str
    board: str
    rtype: str
    binding: Binding
    states: tuple[int, ...] = ()


@dataclass(frozen=True)
class Served:
    """One record of the generated database: its name, its map entry, resolved links."""

    name: str
    source: MapRecord
    board: str | None
    #: Link field -> link text; link field -> the record it names.
    links: dict[str, str]
    targets: dict[str, str]


@dataclass
class RegisterPlan:
    """What `ioc.register_io` needs: who writes which register, who reads it back."""

    #: Written record name -> the register outputs its value reaches (itself, OUT links).
    outputs: dict[str, tuple[Bound, ...]] = field(default_factory=dict)
    #: (board, register) -> the records showing that register.
    readbacks: dict[tuple[str, str], list[Bound]] = field(default_factory=dict)
    #: Readback record name -> records reading it through an input link (processed after).
    readers: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RegisterDatabase:
    """The records of one IOC from the register map, and the bindings among them."""

    records: list[Served]
    skipped: list[tuple[str, str]]  # (name, the map's record type) already in ioc.pvs
    plan: RegisterPlan
    #: Records `ioc.register_io` updates (readbacks and their readers): they do not scan.
    pushed: frozenset[str]

    def text(self, *, annotate: bool = False) -> str:
        return render(self.records, self.pushed, annotate=annotate)


def _candidates(
    crate: str,
    boards: Iterable[tuple[str, BoardKind]],
    *,
    board_records: bool,
    crate_records: bool,
    with_globals: bool,
) -> Iterable[tuple[str, MapRecord, str | None]]:
    boards = list(boards)
    if board_records:
        for board, kind in boards:
            for record in (*load(PER_BOARD_MAP), *load(BOARD_MAPS[kind])):
                yield resolve(record.name, crate, board), record, board
    if crate_records:
        names = {board for board, _ in boards} | {"GLBL"}
        for record in load(CRATE_MAP):
            name = resolve(record.name, crate)
            owner = _BOARD_OF_NAME.match(name)
            if owner is None or owner.group(1) in names:
                board = owner.group(1) if owner and owner.group(1) != "GLBL" else None
                yield name, record, board
    if with_globals:
        for record in load(GLOBALS_MAP):
            yield record.name, record, None


def build(
    crate: str,
    boards: Iterable[tuple[str, BoardKind]],
    *,
    with_crate: bool = True,
    with_globals: bool,
    already_served: Iterable[str] = (),
    remote_prefixes: tuple[str, ...] = (),
    board_records: bool | None = None,
) -> RegisterDatabase:
    """The register-map records of one IOC.

    ``with_crate``: the boards' and the crate's records; ``board_records`` overrides
    the first (the reference file of one board kind has no crate records);
    ``already_served``: names of the IOC's own records (kept, not duplicated);
    ``remote_prefixes``: name prefixes other IOCs of the system serve (links kept).
    """
    served_elsewhere = set(already_served)
    records: list[tuple[str, MapRecord, str | None]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, record, board in _candidates(
        crate,
        boards,
        board_records=with_crate if board_records is None else board_records,
        crate_records=with_crate,
        with_globals=with_globals,
    ):
        if name in served_elsewhere:
            skipped.append((name, record.rtype))
        elif name not in seen:
            seen.add(name)
            records.append((name, record, board))
    reachable = seen | served_elsewhere

    def kept(target: str) -> bool:
        return target in reachable or target.startswith(remote_prefixes)

    served = []
    for name, record, board in records:
        links, targets = {}, {}
        for link_field, link in record.links.items():
            target = resolve(link.record, crate, board or "")
            if kept(target):
                text = f"{target}.{link.field}" if link.field else target
                links[link_field] = f"{text} {link.flags}".strip()
                targets[link_field] = target
        served.append(Served(name, record, board, links, targets))
    plan = _plan(served)
    pushed = {bound.name for shown in plan.readbacks.values() for bound in shown}
    pushed.update(reader for readers in plan.readers.values() for reader in readers)
    return RegisterDatabase(served, skipped, plan, frozenset(pushed))


def _plan(records: list[Served]) -> RegisterPlan:
    plan = RegisterPlan()
    by_name = {record.name: record for record in records}
    bound = {
        r.name: Bound(r.name, r.board, r.source.rtype, r.source.binding, r.source.state_values)
        for r in records
        if r.source.binding is not None and r.board is not None
    }
    for record in bound.values():
        if not record.binding.write:
            plan.readbacks.setdefault((record.board, record.binding.register), []).append(record)

    reached: dict[str, tuple[Bound, ...]] = {}

    def outputs_of(name: str, path: frozenset[str]) -> tuple[Bound, ...]:
        if name in reached:
            return reached[name]
        found = [bound[name]] if name in bound and bound[name].binding.write else []
        record = by_name.get(name)
        for link_field, target in record.targets.items() if record else ():
            if link_field in OUTPUT_LINKS and target not in path:
                found += outputs_of(target, path | {target})
        reached[name] = tuple(dict.fromkeys(found))
        return reached[name]

    for record in records:
        outputs = outputs_of(record.name, frozenset({record.name}))
        if outputs:
            plan.outputs[record.name] = outputs
        for link_field, source in record.targets.items():
            if link_field in INPUT_LINKS and source in bound:
                plan.readers.setdefault(source, []).append(record.name)
    return plan


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def record_fields(record: Served, pushed: bool) -> list[tuple[str, str]]:
    """The fields of a served record: the map's facts, as soft records; ``pushed``
    records are updated when their register changes instead of scanning."""
    source = record.source
    readback = source.binding is not None and not source.binding.write
    fields = [
        (name, value)
        for name, value in source.fields.items()
        if not (pushed and name == "SCAN")
    ]
    if source.raw:
        fields.append(("DTYP", "Raw Soft Channel"))
    if readback or record.name.endswith("_RBV"):
        fields.append(("ASG", READONLY_ASG))
    fields += list(record.links.items())
    return fields


def _binding_note(binding: Binding) -> str:
    direction = "written" if binding.write else "read back"
    return f"# {binding.register} bits 0x{binding.mask:08x} (shift {binding.shift}), {direction}"


def render(records: Iterable[Served], pushed: frozenset[str], *, annotate: bool = False) -> str:
    """The records in ``.db`` syntax; ``annotate`` puts each register binding in a comment."""
    lines = []
    for record in records:
        if annotate and record.source.binding is not None:
            lines.append(_binding_note(record.source.binding))
        lines.append(f'record({record.source.rtype}, "{record.name}") {{')
        lines += [
            f'    field({name}, "{_quoted(value)}")'
            for name, value in record_fields(record, record.name in pushed)
        ]
        lines.append("}")
    return "\n".join(lines) + "\n"


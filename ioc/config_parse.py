"""Reading a TOML document into the configuration types, table by table.

Strict on purpose: an unknown key (with the closest known one as a hint), a
value of the wrong type or out of range stops with ONE line naming the file,
crate, board and key. Every key is optional except a crate's ``crate`` id and
a board's name, kind, card, slot and package data, so old files keep working
when keys are added. The rules that span boards and crates are
`ioc.config_checks`'. Choices where spec 01 is silent:

- legal but probably unintended files load with warnings (``CrateConfig.warnings``,
  one line each): a crate id written as an integer, a crate without boards, a
  crate whose boards are all disabled;
- ``[crate.replay]`` (the replay backend): ``source`` is a path or an array of
  paths; ``speed = "max"`` is kept as 0; whether the files are a recording is
  checked when the backend is built.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from ioc import backends
from ioc.config_schema import (
    BOARD_KEYS,
    CRATE_KEYS,
    HEADER_TYPES,
    INLOOP_KEYS,
    MAX_REPLAY_SPEED,
    REPLAY_KEYS,
    REPLAY_SPEED_MAX,
    SENDER_KEYS,
    SIM_KEYS,
    SYSTEM_KEYS,
    Key,
    checked_value,
    describe_value,
)
from ioc.config_types import (
    BoardConfig,
    ConfigError,
    CrateConfig,
    InLoopConfig,
    ReplayConfig,
    SenderConfig,
    SimBoardConfig,
    SystemConfig,
    normalize_crate_id,
    show_value,
)
from ioc.hardware import BoardKind

_BOARD_REQUIRED = ("name", "kind", "card", "slot", "package_data")
#: [crate.replay] keys that take more than one TOML type, read by `_parse_replay` itself.
_REPLAY_SPECIAL_KEYS = ("source", "speed")


def system_from_toml(text: str, source: str) -> SystemConfig:
    """The system a TOML text describes, each key checked; ``source`` names it in messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: invalid TOML: {error}") from None
    _reject_unknown(source, document, ("system", "crate"), "the top level")
    system_values = _read_keys(
        f"{source}: [system]", _subtable(source, document, "system"), SYSTEM_KEYS, "[system]"
    )
    crate_tables = _table_list(source, document, "crate", "crate")
    if not crate_tables:
        raise ConfigError(f"{source}: no [[crate]] table: a system needs at least one crate")
    crates = tuple(_parse_crate(source, n, table) for n, table in enumerate(crate_tables, 1))
    return SystemConfig(**system_values, crates=crates, source=source)


def _reject_unknown(where: str, table: Mapping[str, Any], known: Iterable[str], name: str):
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            table_name = "" if name in where else f" in {name}"
            raise ConfigError(f"{where}: unknown key {key!r}{table_name}{hint}")


def _read_keys(
    where: str,
    table: Mapping[str, Any],
    rules: Mapping[str, Key],
    name: str,
    subtables: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The checked values of ``rules`` present in ``table``; unknown keys are errors."""
    _reject_unknown(where, table, [*rules, *subtables], name)
    return {
        key: checked_value(where, key, table[key], rule)
        for key, rule in rules.items()
        if key in table
    }


def _subtable(where: str, table: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table, got {describe_value(value)}")
    return value


def _table_list(where: str, table: Mapping[str, Any], key: str, name: str) -> list[Any]:
    """An array of tables (``[[name]]``); a single ``[name]`` table counts as one."""
    value = table.get(key, [])
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{where}: {key} must be an array of tables [[{name}]]")
    return value


def _parse_sim(where: str, table: Mapping[str, Any]) -> SimBoardConfig:
    values = _read_keys(where, table, SIM_KEYS, "[crate.board.sim]")
    if "header_type" in values:
        values["header_type"] = HEADER_TYPES[values["header_type"]]
    return SimBoardConfig(**values)


def _parse_replay(where: str, table: Mapping[str, Any]) -> ReplayConfig:
    """``[crate.replay]``: ``source`` is a path or an array of paths, ``speed`` a number
    or "max"; the files themselves are checked when the backend is built."""
    _reject_unknown(where, table, [*_REPLAY_SPECIAL_KEYS, *REPLAY_KEYS], "[crate.replay]")
    values: dict[str, Any] = _read_keys(
        where, {k: v for k, v in table.items() if k in REPLAY_KEYS}, REPLAY_KEYS,
        "[crate.replay]",
    )
    if "source" in table:
        source = table["source"]
        paths = [source] if isinstance(source, str) else source
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(
                f"{where}: source must be a path or an array of paths, got {describe_value(source)}"
            )
        if not paths or not all(p.strip() for p in paths):
            raise ConfigError(f"{where}: source must name at least one file or directory")
        values["source"] = tuple(paths)
    if "speed" in table:
        values["speed"] = _replay_speed(where, table["speed"])
    return ReplayConfig(**values)


def _replay_speed(where: str, value: Any) -> float:
    """A pace factor 0 < speed <= MAX_REPLAY_SPEED, or 0 / "max" for as fast as read."""
    if value == REPLAY_SPEED_MAX:
        return 0.0
    wanted = f'must be a number 0..{MAX_REPLAY_SPEED:g} or "max"'
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: speed {wanted}, got {describe_value(value)}")
    if not math.isfinite(value) or not 0 <= value <= MAX_REPLAY_SPEED:
        raise ConfigError(f"{where}: speed {wanted}, got {show_value(value)}")
    return float(value)


def _parse_board(crate_where: str, index: int, table: Mapping[str, Any]) -> BoardConfig:
    where = f"{crate_where} board #{index}"
    if "name" in table:
        name = checked_value(where, "name", table["name"], BOARD_KEYS["name"])
        where = f"{crate_where} board {name}"
    values = _read_keys(where, table, BOARD_KEYS, "[crate.board]", subtables=("sim",))
    for key in _BOARD_REQUIRED:
        if key not in values:
            raise ConfigError(f"{where}: missing required key {key!r}")
    values["kind"] = BoardKind(values["kind"])
    for key in ("cal_gain", "cal_offset"):
        if key in values:
            values[key] = tuple(float(x) for x in values[key])
    sim_where = f"{where} [crate.board.sim]"
    return BoardConfig(**values, sim=_parse_sim(sim_where, _subtable(where, table, "sim")))


def _parse_crate(source: str, index: int, table: Mapping[str, Any]) -> CrateConfig:
    where = f"{source}: crate #{index}"
    if "crate" not in table:
        raise ConfigError(f"{where}: missing required key 'crate' (the two-digit crate id)")
    try:
        crate_id = normalize_crate_id(table["crate"])
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    where = f"{source}: crate {crate_id}"
    values = _read_keys(
        where,
        table,
        CRATE_KEYS,
        "[[crate]]",
        subtables=("crate", "sender", "inloop", "replay", "board"),
    )
    sender_where = f"{where} [crate.sender]"
    inloop_where = f"{where} [crate.inloop]"
    sender = _read_keys(
        sender_where, _subtable(where, table, "sender"), SENDER_KEYS, "[crate.sender]"
    )
    inloop = _read_keys(
        inloop_where, _subtable(where, table, "inloop"), INLOOP_KEYS, "[crate.inloop]"
    )
    replay = _parse_replay(f"{where} [crate.replay]", _subtable(where, table, "replay"))
    if values.get("backend") == backends.REPLAY_NAME and not replay.source:
        raise ConfigError(
            f'{where}: backend "replay" needs [crate.replay] source = "<run directory or files>"'
        )
    boards = tuple(
        _parse_board(where, number, board)
        for number, board in enumerate(_table_list(where, table, "board", "crate.board"), 1)
    )
    if "allowed_receivers" in values:
        values["allowed_receivers"] = tuple(values["allowed_receivers"])
    return CrateConfig(
        crate=crate_id,
        **values,
        sender=SenderConfig(**sender),
        inloop=InLoopConfig(**inloop),
        replay=replay,
        boards=boards,
        warnings=_crate_warnings(where, table["crate"], crate_id, boards),
    )


def _crate_warnings(
    where: str, written_id: Any, crate_id: str, boards: tuple[BoardConfig, ...]
) -> tuple[str, ...]:
    """Settings that load but probably do not say what was meant."""
    warnings = []
    if isinstance(written_id, int):
        warnings.append(
            f"{where}: crate = {written_id} is an integer; write the two-digit string "
            f'crate = "{crate_id}"'
        )
    if not boards:
        warnings.append(f"{where}: no [[crate.board]]: the IOC serves its PVs but no data")
    elif not any(board.enabled for board in boards):
        warnings.append(
            f"{where}: every board is disabled (enabled = false): no data until one is "
            f"enabled (VME{crate_id}:<board>:CS_Ena)"
        )
    return tuple(warnings)

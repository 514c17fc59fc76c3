"""Writing a configuration back out as TOML.

`parse_config` reads the text back to an equal system. Values that are None
(a key left out) are left out again; ``[crate.replay]`` is written only when
it differs from the default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ioc.config_schema import BOARD_KEYS, CRATE_KEYS, HEADER_TYPES, REPLAY_SPEED_MAX, SYSTEM_KEYS
from ioc.config_types import ReplayConfig, SystemConfig


def dump_config(system: SystemConfig) -> str:
    """The system as TOML that `parse_config` reads back to an equal system."""
    header_names = {code: name for name, code in HEADER_TYPES.items()}
    lines = ["[system]", *_toml_lines({k: getattr(system, k) for k in SYSTEM_KEYS})]
    for crate in system.crates:
        lines += ["", "[[crate]]", f"crate = {_toml_value(crate.crate)}"]
        lines += _toml_lines({k: getattr(crate, k) for k in CRATE_KEYS})
        lines += ["", "[crate.sender]", *_toml_lines(dataclasses.asdict(crate.sender))]
        lines += ["", "[crate.inloop]", *_toml_lines(dataclasses.asdict(crate.inloop))]
        if crate.replay != ReplayConfig():
            replay_values = dataclasses.asdict(crate.replay)
            replay_values["speed"] = crate.replay.speed or REPLAY_SPEED_MAX
            lines += ["", "[crate.replay]", *_toml_lines(replay_values)]
        for board in crate.boards:
            board_values = {k: getattr(board, k) for k in BOARD_KEYS}
            board_values["kind"] = board.kind.value
            sim_values = dataclasses.asdict(board.sim)
            sim_values["header_type"] = header_names[board.sim.header_type]
            lines += ["", "[[crate.board]]", *_toml_lines(board_values)]
            lines += ["[crate.board.sim]", *_toml_lines(sim_values)]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def _toml_lines(values: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]

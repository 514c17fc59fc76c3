"""System configuration: one TOML file describes every crate and its boards (spec 01).

The entry points: `load_config` (a file), `parse_config` (TOML text),
`demo_config` (``dgs-ioc --demo``) and `with_overrides` (the command line).
Parsing is strict on purpose: a misspelt key or an out-of-range value stops
start-up with ONE line naming the file, crate, board and key, instead of the
IOC silently running with a default. Each rule is documented where it is
enforced:

- `ioc.config_types`: the types importers use, re-exported here, and what a
  left-out key means;
- `ioc.config_schema`: each key's type and allowed values;
- `ioc.config_parse`: TOML tables into the types, required keys, warnings;
- `ioc.config_checks`: rules across boards and crates (port clashes, duplicates);
- `ioc.config_dump`: a configuration written back out as TOML.

Choices where spec 01 is silent, made here:

- a UTF-8 byte order mark at the start of a file is accepted;
- a relative ``state_dir`` or ``[crate.replay] source`` in a file is relative
  to that file.
"""

from __future__ import annotations

import dataclasses
import os

from ioc.config_checks import check_system
from ioc.config_dump import dump_config
from ioc.config_parse import system_from_toml
from ioc.config_schema import CRATE_KEYS, SYSTEM_KEYS, checked_value
from ioc.config_types import (
    DEFAULT_CA_PORT,
    DEFAULT_PVA_PORT,
    BoardConfig,
    ConfigError,
    CrateConfig,
    InLoopConfig,
    ReplayConfig,
    SenderConfig,
    SimBoardConfig,
    SystemConfig,
    default_state_dir,
    normalize_crate_id,
)
from ioc.hardware import BoardKind

__all__ = [
    "DEFAULT_CA_PORT",
    "DEFAULT_PVA_PORT",
    "BoardConfig",
    "ConfigError",
    "CrateConfig",
    "InLoopConfig",
    "ReplayConfig",
    "SenderConfig",
    "SimBoardConfig",
    "SystemConfig",
    "default_state_dir",
    "demo_config",
    "dump_config",
    "load_config",
    "normalize_crate_id",
    "parse_config",
    "with_overrides",
]


def parse_config(text: str, source: str) -> SystemConfig:
    """A validated system from TOML text; ``source`` names it in messages."""
    system = system_from_toml(text, source)
    check_system(system, source, file_rules=True)
    return system


def load_config(path: str | os.PathLike[str]) -> SystemConfig:
    """Read and validate a configuration file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            text = file.read().decode("utf-8-sig")  # editors on Windows may add a BOM
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    system = _anchor_replay_sources(parse_config(text, source), source)
    state_dir = system.state_dir
    if state_dir is not None and not os.path.isabs(os.path.expanduser(state_dir)):
        anchored = os.path.join(os.path.dirname(os.path.abspath(source)), state_dir)
        system = dataclasses.replace(system, state_dir=anchored)
    return system


def _anchor_replay_sources(system: SystemConfig, source: str) -> SystemConfig:
    """Relative replay sources are relative to the configuration file, like ``state_dir``."""
    base = os.path.dirname(os.path.abspath(source))
    crates = tuple(
        dataclasses.replace(
            crate,
            replay=dataclasses.replace(
                crate.replay,
                source=tuple(
                    os.path.join(base, os.path.expanduser(path)) for path in crate.replay.source
                ),
            ),
        )
        for crate in system.crates
    )
    return dataclasses.replace(system, crates=crates)


def demo_config() -> SystemConfig:
    """The demonstration system of spec 01 (``dgs-ioc --demo``)."""
    boards = tuple(
        BoardConfig(
            name=f"MDIG{card + 1}",
            kind=BoardKind.DIGITIZER_MASTER,
            card=card,
            slot=card + 3,
            package_data=101 + card,
            enabled=True,
        )
        for card in range(4)
    )
    crate = CrateConfig(crate="01", data_port=9001, data_bind="127.0.0.1", seed=1, boards=boards)
    system = SystemConfig(globals="local", crates=(crate,), source="demo")
    check_system(system, system.source, file_rules=True)
    return system


def with_overrides(
    system: SystemConfig,
    crate: str | int | None,
    *,
    data_port: int | None = None,
    globals: str | None = None,
    globals_ca: str | None = None,
    ca_port: int | None = None,
    pva_port: int | None = None,
    state_dir: str | None = None,
    sample_port: int | None = None,
) -> tuple[SystemConfig, CrateConfig]:
    """Apply command-line overrides to the selected crate; None leaves a value as it is.

    The result is validated again, except that ``globals = "local"`` is allowed
    in a multi-crate file here: running one crate standalone is deliberate.
    """
    chosen = system.crate(crate)
    source = f"{system.source} with command-line overrides"
    crate_changes = {
        key: value
        for key, value in (
            ("data_port", data_port), ("ca_port", ca_port), ("pva_port", pva_port),
            ("sample_port", sample_port),
        )
        if value is not None
    }
    system_changes = {
        key: value
        for key, value in (
            ("globals", globals),
            ("globals_ca", globals_ca),
            ("state_dir", state_dir),
        )
        if value is not None
    }
    for key, value in crate_changes.items():
        checked_value(f"{source}: crate {chosen.crate}", key, value, CRATE_KEYS[key])
    for key, value in system_changes.items():
        checked_value(source, key, value, SYSTEM_KEYS[key])
    updated = dataclasses.replace(chosen, **crate_changes)
    crates = tuple(updated if c is chosen else c for c in system.crates)
    result = dataclasses.replace(system, crates=crates, **system_changes)
    check_system(result, source, file_rules=False)
    return result, updated

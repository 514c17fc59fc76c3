"""The rules that span boards and crates, checked once every key passed its own.

Within a crate, board names, cards and slots are unique and there is at most
one trigger master; package data are unique in the whole system. Choices where
spec 01 is silent:

- crates on the same host must not share a CA, PVA, data or sampling port, and
  remote globals must not sit on any of those ports ("localhost" = 127.0.0.1);
  ``ca_port`` / ``pva_port`` left out count as 5064 / 5075 here;
- a file with several crates must use remote globals (the global records live
  in ONE place); the command line may still override one crate to "local";
- in a file with remote globals, ``globals_pva`` must not sit on a port of a
  crate on that host, nor on ``globals_ca``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ioc.config_types import (
    DEFAULT_CA_PORT,
    DEFAULT_PVA_PORT,
    ConfigError,
    CrateConfig,
    SystemConfig,
)


def check_system(system: SystemConfig, source: str, *, file_rules: bool) -> None:
    """ConfigError for the first rule ``system`` breaks; ``file_rules``: also those that
    only a whole file must follow (a crate started with overrides need not)."""
    duplicate = _first_duplicate((c.crate, c.crate) for c in system.crates)
    if duplicate:
        raise ConfigError(f"{source}: duplicate crate {duplicate[0]}")
    for crate in system.crates:
        _check_crate(f"{source}: crate {crate.crate}", crate)

    duplicate = _first_duplicate(
        (b.package_data, (c.crate, b.name)) for c in system.crates for b in c.boards
    )
    if duplicate:
        value, holders = duplicate
        crates = {crate for crate, _ in holders}
        if len(crates) == 1:
            where = f"{source}: crate {holders[0][0]}"
            listed = _names(name for _, name in holders)
        else:
            where = source
            listed = _names(f"crate {crate} {name}" for crate, name in holders)
        raise ConfigError(
            f"{where}: duplicate package_data {value} ({listed}): it must be unique in the system"
        )

    endpoints: dict[tuple[str, int], str] = {}
    for crate in system.crates:
        host = _same_host(crate.host)
        for key, port in (
            ("ca_port", crate.ca_port or DEFAULT_CA_PORT),
            ("pva_port", crate.pva_port or DEFAULT_PVA_PORT),
            ("data_port", crate.data_port),
            ("sample_port", crate.sample_port),
            ("sample_pva_port", crate.sample_pva_port),
        ):
            if port == 0:
                continue
            user = f"crate {crate.crate} {key}"
            if (host, port) in endpoints:
                raise ConfigError(
                    f"{source}: {user} {port} clashes with {endpoints[host, port]} on {crate.host}"
                )
            endpoints[host, port] = user

    if system.globals == "remote":
        host, port = system.globals_endpoint
        user = endpoints.get((_same_host(host), port))
        if user:
            raise ConfigError(
                f"{source}: globals_ca {system.globals_ca} clashes with {user}; remote "
                "globals need their own IOC (dgs-ioc --globals-only) on a port of its own"
            )
        endpoints[_same_host(host), port] = "globals_ca"
        host, port = system.globals_pva_endpoint
        user = endpoints.get((_same_host(host), port))
        # Only the globals IOC and run control use globals_pva, and they read the file;
        # a crate following globals given on its command line does not.
        if user and file_rules:
            which = system.globals_pva or f"{host}:{port} (the default)"
            raise ConfigError(
                f"{source}: globals_pva {which} clashes with {user}; give the globals IOC "
                'a PV Access port of its own with [system] globals_pva = "host:port"'
            )
    if file_rules and system.globals == "local" and len(system.crates) > 1:
        raise ConfigError(
            f"{source}: globals = 'local' with {len(system.crates)} crates: the global "
            "run-control records live in one place; use globals = 'remote' and "
            "dgs-ioc --globals-only"
        )


def _names(items: Iterable[str]) -> str:
    return ", ".join(items)


def _first_duplicate(pairs: Iterable[tuple[Any, Any]]) -> tuple[Any, list[Any]] | None:
    """The first value seen twice and the names of everything holding it."""
    holders: dict[Any, list[str]] = {}
    for value, holder in pairs:
        holders.setdefault(value, []).append(holder)
    return next(((v, h) for v, h in holders.items() if len(h) > 1), None)


def _check_crate(where: str, crate: CrateConfig) -> None:
    duplicate = _first_duplicate((b.name, str(b.card)) for b in crate.boards)
    if duplicate:
        name, cards = duplicate
        raise ConfigError(f"{where}: duplicate name {name} (cards {_names(cards)})")
    for key in ("card", "slot"):
        duplicate = _first_duplicate((getattr(b, key), b.name) for b in crate.boards)
        if duplicate:
            value, holders = duplicate
            raise ConfigError(f"{where}: duplicate {key} {value} ({_names(holders)})")
    triggers = [b.name for b in crate.boards if b.kind.is_trigger]
    if len(triggers) > 1:
        raise ConfigError(
            f"{where}: at most one trigger_master per crate, got {len(triggers)} "
            f"({_names(triggers)})"
        )


def _same_host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host

"""Before the EPICS servers start: find what would make this IOC a duplicate or unable to serve.

EPICS servers do not refuse a taken port: the CA server moves its TCP port to a
random one (and suspends for ever when its UDP port is held), the PVA server
does the same, so a second IOC of a crate used to start, print ports it did not
have, and split the operators' puts between two processes. These checks turn
every such case into one line naming the port, the setting or the other IOC:

- a lock on ``<state_dir>/<name>.lock``: the same crate already runs on this
  host with the same state directory, on whatever ports (both would autosave
  into the same file);
- a CA and a PVA search for this IOC's own PV names at the addresses its
  clients are configured to use and at its own ports: the crate is already
  served where they look;
- binding every port the servers will take, the way they bind it: TCP with
  address reuse (a previous IOC's closing connections do not count), the CA UDP
  port alone, the PVA UDP port shared (every PVA server and client of a host
  shares it by design).

The CA repeater port is never checked: one repeater serves every CA process of a host.

The lock and the ports take a millisecond or two. The search waits up to half a
second when a searched UDP port is held by something silent (a PVA client
shares the broadcast port, another crate's IOC does not have these names), so
it runs while the IOC loads EPICS and builds its records, and the IOC asks for
its verdict just before its servers start (after that, it would find itself).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ioc import namesearch
from ioc.config import CrateConfig
from ioc.namesearch import Endpoint

DEFAULT_CA_PORT = 5064
DEFAULT_PVA_PORT = 5075
DEFAULT_PVA_BROADCAST_PORT = 5076
LOOPBACK = "127.0.0.1"
WILDCARD = "0.0.0.0"
#: Servers on this host answer in microseconds; a silent port costs at most this.
SEARCH_TIMEOUT_S = 0.5

log = logging.getLogger("dgs.ioc")

#: Lock files of this process: the kernel releases them when it ends, however it ends.
_held: list[IO[str]] = []


class StartupRefused(Exception):
    """Why this IOC must not start; ``str()`` is one line."""


@dataclass(frozen=True)
class ServerPorts:
    """The ports and addresses this IOC's servers will take."""

    ca: int
    pva: int
    pva_broadcast: int
    ca_interfaces: tuple[str, ...] = (WILDCARD,)
    pva_interfaces: tuple[str, ...] = (WILDCARD,)
    data: int | None = None  # None: no data service (the globals IOC); 0: ephemeral
    data_bind: str = WILDCARD

    @classmethod
    def read(cls, env: Mapping[str, str], crate: CrateConfig | None) -> ServerPorts:
        """The ports as the CA and PVA servers will read ``env`` (server variables first)."""
        return cls(
            ca=_env_port(env, ("EPICS_CAS_SERVER_PORT", "EPICS_CA_SERVER_PORT"), DEFAULT_CA_PORT),
            pva=_env_port(
                env, ("EPICS_PVAS_SERVER_PORT", "EPICS_PVA_SERVER_PORT"), DEFAULT_PVA_PORT
            ),
            pva_broadcast=_env_port(
                env,
                ("EPICS_PVAS_BROADCAST_PORT", "EPICS_PVA_BROADCAST_PORT"),
                DEFAULT_PVA_BROADCAST_PORT,
            ),
            ca_interfaces=_interfaces(env.get("EPICS_CAS_INTF_ADDR_LIST", "")),
            pva_interfaces=_interfaces(env.get("EPICS_PVAS_INTF_ADDR_LIST", "")),
            data=crate.data_port if crate else None,
            data_bind=crate.data_bind if crate else WILDCARD,
        )

    def describe(self) -> str:
        """The ports, as the lock file and messages name them."""
        text = f"CA port {self.ca}, PVA port {self.pva}"
        if self.data is not None:
            text += f", data port {self.data or 'ephemeral'}"
        return text


@dataclass(frozen=True)
class Role:
    """What this IOC serves: a name for messages, its lock, and PV names that prove it."""

    who: str
    lock_name: str
    #: PV name -> what a server of it is (the first names the IOC's own records).
    evidence: Mapping[str, str]

    @classmethod
    def crate(cls, crate_id: str, serve_globals: bool) -> Role:
        evidence = {f"DAQC{crate_id}_CV_State": f"crate {crate_id}"}
        if serve_globals:
            evidence["Online_CS_StartStop"] = "the global run-control records"
        return cls(f"crate {crate_id}", f"DAQC{crate_id}", evidence)

    @classmethod
    def globals_only(cls) -> Role:
        evidence = {"Online_CS_StartStop": "the global run-control records"}
        return cls("the globals IOC", "globals", evidence)


def _env_port(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise StartupRefused(f"{name}={value!r} is not a port number 1..65535")
            return int(value)
    return default


def _interfaces(value: str) -> tuple[str, ...]:
    """The addresses of an interface list (a ":port" suffix is not an address)."""
    return tuple(entry.partition(":")[0] for entry in value.split()) or (WILDCARD,)


def check(
    ports: ServerPorts, role: Role, state_dir: str | os.PathLike[str], client_env: Mapping[str, str]
) -> DuplicateSearch:
    """Lock and check the ports now; StartupRefused if this IOC cannot serve.

    ``client_env`` is the environment the IOC was started with: its address
    lists say where this host's clients look for PVs. The returned search for
    another IOC of the crate is still running: call its ``verdict()`` before
    the servers start. The lock is held until the process ends.
    """
    started = time.monotonic()
    lock = _claim(Path(state_dir), role, ports)
    try:
        problems = [p for p in map(_bind_problem, _bindings(ports)) if p]
        search = DuplicateSearch(role, *search_targets(ports, client_env))
        if problems:
            search.verdict()  # the other IOC itself, if it is what holds the port
            raise StartupRefused(problems[0])
    except BaseException:
        lock.close()
        raise
    _held.append(lock)
    log.debug("start-up checks: lock and ports in %.1f ms", (time.monotonic() - started) * 1e3)
    return search


class DuplicateSearch:
    """A CA and PVA search for the role's PV names, in a thread of its own."""

    def __init__(self, role: Role, ca: list[Endpoint], pva: list[Endpoint]) -> None:
        self.role = role
        self._took_s = 0.0
        self._found: namesearch.Found | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(ca, pva), name="duplicate-search", daemon=True
        )
        self._thread.start()

    def _run(self, ca: list[Endpoint], pva: list[Endpoint]) -> None:
        started = time.monotonic()
        try:
            self._found = namesearch.first_found(
                ca, pva, list(self.role.evidence), SEARCH_TIMEOUT_S
            )
        except BaseException as err:  # handed to verdict(), in the main thread
            self._error = err
        self._took_s = time.monotonic() - started

    def verdict(self) -> None:
        """Wait for the search (bounded by its timeout); StartupRefused naming the other IOC."""
        waiting = time.monotonic()
        self._thread.join()
        if self._error is not None:
            raise self._error
        log.debug(
            "start-up checks: search in %.1f ms, start-up waited %.1f ms for it",
            self._took_s * 1e3,
            (time.monotonic() - waiting) * 1e3,
        )
        found = self._found
        if found is not None:
            searched = ":".join(map(str, found.searched))
            server = ":".join(map(str, found.server))
            raise StartupRefused(
                f"another IOC already serves {self.role.evidence[found.name]} at {server} "
                f"({found.name} answered a {found.protocol} search at {searched}): "
                "stop that one first, two IOCs must never serve the same PVs"
            )


def _claim(directory: Path, role: Role, ports: ServerPorts) -> IO[str]:
    """Lock ``<directory>/<lock_name>.lock`` and write who holds it, or refuse naming the holder."""
    path = directory / f"{role.lock_name}.lock"
    unusable = f"cannot start: autosave directory {directory}"  # as the autosave says it
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StartupRefused(f"{unusable}: {err.strerror or err}") from None
    try:
        lock = open(path, "a+")  # noqa: SIM115 - held for the life of the process
    except OSError as err:
        raise StartupRefused(f"{unusable}: cannot create {path.name}: {err.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another dgs-ioc"
        lock.close()
        raise StartupRefused(
            f"{role.who} is already running on this host: {holder} holds {path}; stop it first"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"dgs-ioc pid {os.getpid()} ({ports.describe()})\n")
    lock.flush()
    return lock


@dataclass(frozen=True)
class _Binding:
    """One address and port a server will bind, and how to name it in a message."""

    what: str
    kind: socket.SocketKind
    address: str
    port: int
    address_key: str  # the setting the address comes from
    port_hint: str  # where to choose another port
    shared: bool = False  # a UDP port every PVA process of a host shares


def _bindings(ports: ServerPorts) -> list[_Binding]:
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    ca_hint = "choose another with --ca-port or EPICS_CA_SERVER_PORT"
    pva_hint = "choose another with --pva-port or EPICS_PVAS_SERVER_PORT"
    bindings = [
        _Binding("CA server port", kind, address, ports.ca, "EPICS_CAS_INTF_ADDR_LIST", ca_hint)
        for address in ports.ca_interfaces
        for kind in (tcp, udp)
    ]
    for address in ports.pva_interfaces:
        bindings += [
            _Binding(
                "PVA server port", tcp, address, ports.pva, "EPICS_PVAS_INTF_ADDR_LIST", pva_hint
            ),
            _Binding(
                "PVA broadcast port",
                udp,
                address,
                ports.pva_broadcast,
                "EPICS_PVAS_INTF_ADDR_LIST",
                "choose another with EPICS_PVAS_BROADCAST_PORT",
                shared=True,
            ),
        ]
    if ports.data is not None:
        bindings.append(
            _Binding(
                "data port",
                tcp,
                ports.data_bind,
                ports.data,
                "data_bind",
                "choose another with --data-port or data_port",
            )
        )
    return bindings


def _bind_problem(binding: _Binding) -> str | None:
    """None if the server will be able to bind ``binding``, else the one-line reason."""
    protocol = "TCP" if binding.kind == socket.SOCK_STREAM else "UDP"
    where = f"{binding.what} {binding.port} ({protocol}) on {binding.address}"
    sock = socket.socket(socket.AF_INET, binding.kind)
    try:
        if binding.kind == socket.SOCK_STREAM or binding.shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if binding.shared and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((binding.address, binding.port))
    except socket.gaierror as err:
        return f"{binding.address_key} {binding.address!r} is not a known address ({err.strerror})"
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            held = "held by a program that does not share it" if binding.shared else "in use"
            return f"{where} is already {held} ({binding.port_hint})"
        if err.errno == errno.EADDRNOTAVAIL:
            return f"{binding.address_key} {binding.address} is not an address of this host"
        return f"cannot bind {where}: {err.strerror} ({binding.port_hint})"
    finally:
        sock.close()
    return None


def search_targets(
    ports: ServerPorts, client_env: Mapping[str, str]
) -> tuple[list[Endpoint], list[Endpoint]]:
    """The UDP addresses to search over CA and over PVA: this IOC's own ports (a server
    sharing them) and where the clients of ``client_env`` look."""
    ca = [(_reachable(a), ports.ca) for a in ports.ca_interfaces]
    ca += _address_list(
        client_env,
        "EPICS_CA_ADDR_LIST",
        "EPICS_CA_AUTO_ADDR_LIST",
        _client_port(client_env, "EPICS_CA_SERVER_PORT", DEFAULT_CA_PORT),
    )
    pva = [(_reachable(a), ports.pva_broadcast) for a in ports.pva_interfaces]
    pva += _address_list(
        client_env,
        "EPICS_PVA_ADDR_LIST",
        "EPICS_PVA_AUTO_ADDR_LIST",
        _client_port(client_env, "EPICS_PVA_BROADCAST_PORT", DEFAULT_PVA_BROADCAST_PORT),
    )
    return ca, pva


def _reachable(interface: str) -> str:
    """Where a server bound to ``interface`` answers from this host."""
    return LOOPBACK if interface == WILDCARD else interface


def _client_port(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() and 1 <= int(value) <= 65535 else default


def _address_list(
    env: Mapping[str, str], list_name: str, auto_name: str, default_port: int
) -> list[Endpoint]:
    """The entries of an EPICS address list; an automatic list (clients broadcast)
    stands for this host at the default port, the one place a search may reach here."""
    targets = []
    for entry in env.get(list_name, "").split():
        host, _, port = entry.partition(":")
        address = _ipv4(host)
        if address is None or (port and not (port.isdigit() and 1 <= int(port) <= 65535)):
            continue  # the clients cannot use it either
        targets.append((address, int(port) if port else default_port))
    if env.get(auto_name, "YES").strip().upper() != "NO":
        targets.append((LOOPBACK, default_port))
    return targets


def _ipv4(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None

"""`dgs-system`: a whole multi-crate system from one configuration file, as one group.

    dgs-system --config FILE [--run-dir DIR] [--state-dir DIR] [--globals-pva HOST:PORT]
               [--crate NN ...] [--no-globals] [--ready-timeout S]

starts the globals IOC (``dgs-ioc --globals-only``, when the file says
``globals = "remote"``) and one ``dgs-ioc --config FILE --crate NN`` per crate
as child processes on this host, waits until each serves its PVs, prints where
everything is and writes ``<run-dir>/system.json`` so that ``dgs-run`` finds the
system without options. Receivers are per run: ``dgs-run start`` starts them.

Ctrl-C / SIGTERM stops the group cleanly: a run in progress is ended first
(``end_run``: drained, receivers finished, run logged), then every crate IOC
gets SIGTERM, then the globals IOC; exit 0 when every child exited 0.
``--crate`` and ``--no-globals`` select part of the file, which is how the same
file lays a system out over several hosts (one crate per host, globals on one).

Exit codes: 0 clean, 1 a child failed to start or died, 3 configuration error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ioc.config import DEFAULT_CA_PORT, ConfigError, SystemConfig, load_config
from runctl.operator import (
    DEFAULT_CONTROL_DIR,
    Endpoint,
    Operator,
    RunState,
    crate_endpoint,
    globals_endpoint,
)

SYSTEM_FILE = "system.json"
LOG_DIR = "logs"
READY_LINE = "dgs-ioc: ready"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 3
#: EPICS server settings that keep a system whose hosts are all loopback on loopback
#: (this workplace allows nothing else); set only where the environment sets nothing.
LOOPBACK_SERVER_ENV = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}
PR_SET_PDEATHSIG = 1


def read_system_file(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a running `dgs-system` wrote about its group, or None."""
    try:
        return json.loads((Path(run_dir) / SYSTEM_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if dgs-system itself dies, so no IOC is left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Member:
    """One IOC of the group."""

    name: str  # "globals" or "crate NN"
    argv: list[str]
    log_path: Path
    ca: str  # host:port of its CA server, for clients' EPICS_CA_ADDR_LIST
    where: str  # its other ports, for people
    process: subprocess.Popen | None = None
    reported: bool = False

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ioc.main", *self.argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches dgs-system only; it sequences the stop
                preexec_fn=_die_with_parent,
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join("    " + line for line in self.log_text().splitlines()[-lines:])

    @property
    def ready(self) -> bool:
        return READY_LINE in self.log_text()

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            print(f"dgs-system: {self.name} did not exit within {STOP_TIMEOUT_S:g} s: killed")
            return EXIT_FAILED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dgs-system", description="Start a globals IOC and every crate IOC of a system."
    )
    p.add_argument("--config", required=True, metavar="FILE", help="system configuration (TOML)")
    p.add_argument(
        "--run-dir",
        default=DEFAULT_CONTROL_DIR,
        metavar="DIR",
        help=f"logs, system.json and dgs-run's state (default ./{DEFAULT_CONTROL_DIR})",
    )
    p.add_argument("--state-dir", metavar="DIR", help="autosave directory of every IOC")
    p.add_argument(
        "--globals-pva",
        metavar="HOST:PORT",
        help="PV Access endpoint of the globals IOC (default: [system] globals_pva, else 5075)",
    )
    p.add_argument(
        "--crate", action="append", metavar="NN", help="start only this crate (repeatable)"
    )
    p.add_argument(
        "--no-globals", action="store_true", help="do not start the globals IOC (it runs elsewhere)"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_S,
        metavar="S",
        help=f"how long each IOC may take to serve its PVs (default {READY_TIMEOUT_S:g})",
    )
    return p.parse_args(argv)


def plan(
    system: SystemConfig, args: argparse.Namespace, log_dir: Path
) -> tuple[list[Member], Endpoint]:
    """The IOCs to start, globals first, and the globals' PVA endpoint."""
    common = ["--config", system.source]
    if args.state_dir:
        common += ["--state-dir", args.state_dir]
    members = []
    pva = globals_endpoint(system, args.globals_pva)
    if system.globals == "remote" and not args.no_globals:
        ca_host, ca_port = system.globals_endpoint
        members.append(
            Member(
                "globals",
                ["--globals-only", *common, "--ca-port", str(ca_port), "--pva-port", str(pva.port)],
                log_dir / "globals.log",
                f"{ca_host}:{ca_port}",
                f"PVA {pva}",
            )
        )
    chosen = [system.crate(c) for c in args.crate] if args.crate else list(system.crates)
    for crate in chosen:
        members.append(
            Member(
                f"crate {crate.crate}",
                [*common, "--crate", crate.crate],
                log_dir / f"crate{crate.crate}.log",
                f"{crate.host}:{crate.ca_port or DEFAULT_CA_PORT}",
                f"PVA {crate_endpoint(crate)}  data {crate.host}:{crate.data_port}",
            )
        )
    return members, pva


def child_environment(system: SystemConfig) -> dict[str, str]:
    env = dict(os.environ)
    hosts = [system.globals_endpoint[0], *(c.host for c in system.crates)]
    if all(_is_loopback(host) for host in hosts):
        for key, value in LOOPBACK_SERVER_ENV.items():
            env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_ready(members: list[Member], timeout: float, stop: threading.Event) -> str | None:
    """None once every member serves its PVs, else what went wrong."""
    deadline = time.monotonic() + timeout
    pending = list(members)
    while pending:
        for member in list(pending):
            if member.ready:
                pending.remove(member)
                print(f"dgs-system: {member.name} ready", flush=True)
            elif member.exit_code is not None:
                return (
                    f"{member.name} exited with {member.exit_code} during start-up "
                    f"({member.log_path}):\n{member.log_tail()}"
                )
        if pending and stop.is_set():
            return "interrupted during start-up"
        if pending and time.monotonic() > deadline:
            return f"not serving PVs within {timeout:g} s: {', '.join(m.name for m in pending)}"
        time.sleep(0.1)
    return None


def end_active_run(system: SystemConfig, run_dir: Path, globals_pva: str) -> None:
    """A run left open would lose its receivers' last data: end it like `dgs-run stop`."""
    with Operator(system, control_dir=run_dir, globals_pva=globals_pva) as operator:
        if operator.state is RunState.STOP:
            return
        print("dgs-system: ending the open run first", flush=True)
        for response in operator.end_run():
            print(f"dgs-system: {response}", flush=True)


def stop_group(members: list[Member]) -> bool:
    """Crates first (in parallel), then the globals they follow; True if all exited 0."""
    crates = [m for m in members if m.name != "globals"]
    codes: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda m=m: codes.__setitem__(m.name, m.stop())) for m in crates
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for member in members:
        if member.name == "globals":
            codes[member.name] = member.stop()
    for name, code in codes.items():
        print(f"dgs-system: {name} exited with {code}", flush=True)
    return all(code == 0 for code in codes.values())


def describe(members: list[Member], run_dir: Path) -> str:
    lines = [f"dgs-system: {m.name:<9} CA {m.ca}  {m.where}  log {m.log_path}" for m in members]
    ca_list = " ".join(m.ca for m in members)
    lines += [
        f'dgs-system: CA clients list every IOC: EPICS_CA_ADDR_LIST="{ca_list}" '
        "EPICS_CA_AUTO_ADDR_LIST=NO",
        f"dgs-system: run control: dgs-run --run-dir {run_dir} start | status | stop",
        "dgs-system: ready; Ctrl-C or SIGTERM stops the whole group",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir).absolute()
    log_dir = run_dir / LOG_DIR
    try:
        system = load_config(Path(args.config).absolute())
        members, pva = plan(system, args, log_dir)
    except ConfigError as err:
        print(f"dgs-system: {err}", file=sys.stderr)
        return EXIT_CONFIG
    log_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    env = child_environment(system)
    for member in members:
        member.start(env)
    problem = wait_ready(members, args.ready_timeout, stop)
    if problem:
        print(f"dgs-system: {problem}", file=sys.stderr, flush=True)
        stop_group(members)
        return EXIT_FAILED

    system_file = run_dir / SYSTEM_FILE
    system_file.write_text(
        json.dumps(
            {
                "config": system.source,
                "globals_pva": str(pva),
                "pid": os.getpid(),
                "members": {m.name: m.process.pid for m in members if m.process},
            },
            indent=1,
        )
    )
    print(describe(members, run_dir), flush=True)

    failed = False
    while not stop.wait(0.5):
        for member in members:
            code = member.exit_code
            if code is not None and not member.reported:
                member.reported = True
                failed = True
                print(
                    f"dgs-system: {member.name} exited with {code} ({member.log_path}):\n"
                    f"{member.log_tail()}",
                    flush=True,
                )

    print("dgs-system: stopping the group", flush=True)
    end_active_run(system, run_dir, str(pva))
    clean = stop_group(members)
    system_file.unlink(missing_ok=True)
    return EXIT_OK if clean and not failed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

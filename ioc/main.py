"""`dgs-ioc`: the command line of the crate IOC.

Configuration is read and validated before anything EPICS is loaded, and the
start-up checks (`preflight`) are done before the EPICS servers start: a bad
file, a taken port or another IOC of the same crate stops start-up with one
line naming the problem, exit code 2. EPICS ports come from the configuration
when it names them, else from the standard environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from ioc import preflight
from ioc.backends import BackendError
from ioc.config import (
    ConfigError,
    CrateConfig,
    SystemConfig,
    demo_config,
    load_config,
    with_overrides,
)
from ioc.preflight import Role, ServerPorts, StartupRefused

DEFAULT_CA_PORT = 5064
DEFAULT_PVA_PORT = 5075


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dgs-ioc", description="Digitizer crate read-out IOC (DGS-compatible)."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="system configuration (TOML)")
    source.add_argument("--demo", action="store_true", help="the bundled demonstration crate")
    p.add_argument("--crate", metavar="NN", help="which crate of the configuration to serve")
    p.add_argument("--data-port", type=int, metavar="N", help="TCP port of the data service")
    p.add_argument("--sample-port", type=int, metavar="N",
                   help="TCP port of sampled events, classic protocol (0: any free port)")
    p.add_argument("--globals", choices=("local", "remote"), help="serve or follow the globals")
    p.add_argument("--globals-ca", metavar="HOST:PORT", help="where remote globals are served")
    p.add_argument("--globals-only", action="store_true", help="serve only the global records")
    p.add_argument("--ca-port", type=int, metavar="N", help="Channel Access server port")
    p.add_argument("--pva-port", type=int, metavar="N", help="PV Access server port")
    p.add_argument("--state-dir", metavar="DIR", help="where autosaved values are kept")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p.parse_args(argv)


def _env_port(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def epics_environment(system: SystemConfig, crate: CrateConfig | None) -> dict[str, str]:
    """The EPICS variables this process must run with (servers and its CA client)."""
    ca_port = (crate.ca_port if crate else None) or _env_port(
        "EPICS_CA_SERVER_PORT", DEFAULT_CA_PORT
    )
    pva_port = (crate.pva_port if crate else None) or _env_port(
        "EPICS_PVAS_SERVER_PORT", DEFAULT_PVA_PORT
    )
    env = {
        "EPICS_CA_SERVER_PORT": str(ca_port),
        "EPICS_PVAS_SERVER_PORT": str(pva_port),
        "EPICS_PVA_SERVER_PORT": str(pva_port),
    }
    if crate is not None:
        follow = system.globals_ca if system.globals == "remote" else f"127.0.0.1:{ca_port}"
        env["EPICS_CA_ADDR_LIST"] = follow
        env["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    return env


def globals_ports(system: SystemConfig, args: argparse.Namespace) -> dict[str, str]:
    """Ports of a `--globals-only` IOC: the options, else `globals_ca` and `globals_pva`
    of a configuration file (PVA: the standard port unless configured, where `dgs-run`
    and `dgs-system` look for it too), else the EPICS environment."""
    env: dict[str, str] = {}
    ca_port = args.ca_port
    pva_port = args.pva_port
    if args.config:
        if ca_port is None:
            ca_port = system.globals_endpoint[1]
        if pva_port is None:
            pva_port = system.globals_pva_endpoint[1]
    if ca_port is not None:
        env["EPICS_CA_SERVER_PORT"] = str(ca_port)
    if pva_port is not None:
        env["EPICS_PVAS_SERVER_PORT"] = env["EPICS_PVA_SERVER_PORT"] = str(pva_port)
    return env


def banner(crate: CrateConfig, ports: ServerPorts, serve_globals: bool) -> str:
    """What the IOC serves and on which ports: the ports the start-up checks found free."""
    c = crate.crate
    first = sorted(crate.boards, key=lambda b: b.card)[0].name if crate.boards else "MDIG1"
    data = (
        f"{crate.data_bind}:{ports.data}"
        if ports.data
        else f"{crate.data_bind}, on a port the system picks when a run opens it (data_port 0)"
    )
    lines = [
        f"dgs-ioc: crate {c} serving PVs DAQC{c}_*, DAQC{c}:*, VME{c}:* on CA port {ports.ca}, "
        f"PVA port {ports.pva}",
        f"dgs-ioc: data service on {data} (classic gtReceiver and v2 protocols)",
    ]
    if serve_globals:
        lines.append("dgs-ioc: serving the globals Online_CS_StartStop / SaveData / RunNumber")
    lines += [
        "try:",
        f"  caget DAQC{c}_CV_State DAQC{c}_CV_BuffersAvail DAQC{c}_OL_DataRate0",
        "  caput Online_CS_SaveData Save",
        "  caput Online_CS_StartStop Start",
        f"  camonitor DAQC{c}_OL_DataRate0 DAQC{c}_CV_InLoop1",
        f"  caput VME{c}:{first}:SIM_EventRate 2000",
        "  caput Online_CS_StartStop Stop",
        "Ctrl-C stops the IOC.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        system = demo_config() if args.demo else load_config(args.config)
        crate = None
        if not args.globals_only:
            system, crate = with_overrides(
                system,
                args.crate,
                data_port=args.data_port,
                globals=args.globals,
                globals_ca=args.globals_ca,
                ca_port=args.ca_port,
                pva_port=args.pva_port,
                state_dir=args.state_dir,
                sample_port=args.sample_port,
            )
        elif args.state_dir:
            system = dataclasses.replace(system, state_dir=args.state_dir)
    except ConfigError as err:
        print(f"dgs-ioc: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dgs-ioc: cannot read configuration: {err}", file=sys.stderr)
        return 2

    if crate is not None:
        for warning in crate.warnings:
            print(f"dgs-ioc: warning: {warning}", file=sys.stderr, flush=True)

    env = epics_environment(system, crate)
    if args.globals_only:
        env.update(globals_ports(system, args))
    serve_globals = system.globals == "local"
    role = Role.globals_only() if crate is None else Role.crate(crate.crate, serve_globals)
    try:
        ports = ServerPorts.read({**os.environ, **env}, crate)
        search = preflight.check(ports, role, system.state_directory, client_env=os.environ)
    except StartupRefused as err:
        print(f"dgs-ioc: {err}", file=sys.stderr)
        return 2
    os.environ.update(env)
    from epicscorelibs.path import get_lib

    os.environ.setdefault("PYEPICS_LIBCA", get_lib("ca"))

    from ioc import app  # EPICS reads the environment on import

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    try:
        ioc = app.GlobalsIoc(system) if args.globals_only else app.CrateIoc(system, crate)
    except BackendError as err:
        print(f"dgs-ioc: crate {crate.crate}: backend {crate.backend!r} {err}", file=sys.stderr)
        return 2
    try:
        search.verdict()  # before the servers start: then this IOC would answer it
    except StartupRefused as err:
        print(f"dgs-ioc: {err}", file=sys.stderr)
        return 2
    try:
        ioc.start()
    except OSError as err:
        print(f"dgs-ioc: cannot start: {err}", file=sys.stderr)
        return 2
    if crate is not None:
        print(banner(crate, ports, ioc.serve_globals), flush=True)
        # Timestamps count 10 ns ticks from this monotonic instant (latency measurements).
        print(f"dgs-ioc: crate clock origin {ioc.backend.clock_origin_ns()} ns", flush=True)
    else:
        print(
            f"dgs-ioc: serving the globals on CA port {ports.ca}, PVA port {ports.pva}", flush=True
        )
    print("dgs-ioc: ready", flush=True)
    app.wait_for_signal(stop)
    logging.getLogger("dgs.ioc").info("stopping")
    ioc.stop()
    app.exit_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

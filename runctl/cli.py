"""`dgs-run`: start, stop and watch runs of a system from a shell or a script.

    dgs-run [options] start     prepare_run + begin_run (STOP -> READY -> RUN)
    dgs-run [options] stop      end_run (RUN -> STOP; READY -> STOP cancels)
    dgs-run [options] status    every crate's state, rates, buffers, lost %; the run
    dgs-run [options] log       the run log as a table

Each progress response is printed as one line ``<kind>: <message>``. Exit codes:
0 done, 1 timeout / crate down / error, 2 refused (wrong state, or another
operator is busy), 3 configuration error. The system comes from ``--config``
or, when `dgs-system` runs it, from ``<run-dir>/system.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Iterable

from ioc.config import ConfigError, SystemConfig, load_config
from runctl.operator import (
    DEFAULT_CONTROL_DIR,
    DEFAULT_RECEIVER_COMMAND,
    DONE,
    REFUSED,
    RUN_LOG_FILE,
    Operator,
    Progress,
    RunState,
    SystemStatus,
    Timeouts,
    choice,
)
from runctl.runlog import RunLog, format_table
from runctl.system import read_system_file

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_CONFIG = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dgs-run", description="Run control for a DGS crate system.")
    p.add_argument(
        "--run-dir",
        default=DEFAULT_CONTROL_DIR,
        metavar="DIR",
        help=f"state, run log and receiver logs of this system (default ./{DEFAULT_CONTROL_DIR})",
    )
    p.add_argument("--config", metavar="FILE", help="system configuration (default: dgs-system's)")
    p.add_argument(
        "--globals-pva",
        metavar="HOST:PORT",
        help="where the globals IOC serves PV Access (default: [system] globals_pva, else 5075)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="receiver files (default RUN-DIR/data)")
    receivers = p.add_mutually_exclusive_group()
    receivers.add_argument(
        "--receiver-command",
        metavar="CMD",
        help="receiver to start per crate (default: the product's dgs-receiver)",
    )
    receivers.add_argument(
        "--no-receivers", action="store_true", help="start no receivers (others read the data)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="wait at most S seconds for crates (status: for IOCs)",
    )
    p.add_argument(
        "--receiver-timeout",
        type=float,
        metavar="S",
        help="after the drain, wait at most S seconds for the receivers (default 60)",
    )
    p.add_argument("command", choices=("start", "stop", "status", "log"))
    return p.parse_args(argv)


def _system(args: argparse.Namespace) -> tuple[SystemConfig, str | None]:
    """The configuration and globals PVA endpoint, from the options or dgs-system's file."""
    running = read_system_file(args.run_dir)
    config = args.config or (running or {}).get("config")
    if not config:
        raise ConfigError(
            f"no configuration: give --config FILE, or start the system with "
            f"dgs-system --run-dir {args.run_dir}"
        )
    globals_pva = args.globals_pva
    if globals_pva is None and running and running.get("config") == config:
        globals_pva = running.get("globals_pva")
    return load_config(config), globals_pva


def _operator(args: argparse.Namespace) -> Operator:
    system, globals_pva = _system(args)
    if args.no_receivers:
        command = None
    elif args.receiver_command:
        command = shlex.split(args.receiver_command)
    else:
        command = list(DEFAULT_RECEIVER_COMMAND)
    timeouts = Timeouts()
    if args.timeout:
        timeouts = dataclasses.replace(
            timeouts, ready_s=args.timeout, running_s=args.timeout, drain_s=args.timeout
        )
    if args.receiver_timeout:
        timeouts = dataclasses.replace(timeouts, receivers_s=args.receiver_timeout)
    return Operator(
        system,
        control_dir=args.run_dir,
        data_dir=args.data_dir,
        globals_pva=globals_pva,
        receiver_command=command,
        timeouts=timeouts,
    )


def report(responses: Iterable[Progress]) -> int:
    """Print every response; the exit code its final response stands for."""
    final: Progress | None = None
    for response in responses:
        print(response, flush=True)
        final = response
    if final is None or final.kind == DONE:
        return EXIT_OK
    return EXIT_REFUSED if final.kind == REFUSED else EXIT_FAILED


def _text(values: dict, name: str) -> str:
    return choice(name, values[name]) if name in values else "?"


def format_status(status: SystemStatus) -> str:
    """What `dgs-run status` prints."""
    op = status.operator
    if op.state is RunState.STOP:
        lines = ["run control: STOP"]
    else:
        since = op.start if op.state is RunState.RUN else op.prepared
        lines = [f"run control: {op.state.value} run {op.run} ({op.name}) since {since}"]
    g = status.globals
    if g:
        lines.append(
            f"globals {status.globals_endpoint}: StartStop {_text(g, 'Online_CS_StartStop')}, "
            f"SaveData {_text(g, 'Online_CS_SaveData')}, "
            f"RunNumber {g.get('Online_CS_RunNumber', '?')}"
        )
    else:
        lines.append(f"globals {status.globals_endpoint}: NO ANSWER")
    lines.append(
        f"{'crate':<6}{'state':<11}{'read MiB':>10}{'send kB/s':>11}{'wire kB/s':>11}"
        f"{'buffers':>9}{'lost %':>8}{'sent MiB':>10}  receiver"
    )
    for crate in status.crates:
        v = crate.values
        if not crate.reachable:
            lines.append(f"{crate.crate:<6}NO ANSWER on {crate.endpoint} (PVA)")
            continue
        buffers = f"{int(v['CV_BuffersAvail'])}/{int(v['CV_BuffersTotal'])}"
        if not v["CV_BuffersOK"]:
            buffers += " LEAK"
        lines.append(
            f"{crate.crate:<6}{choice('CV_State', v['CV_State']):<11}"
            f"{float(v['CV_InLoop1']):>10.1f}"
            f"{float(v['CV_SendRate']):>11.1f}{float(v['CV_SenderWireRate']):>11.1f}"
            f"{buffers:>9}{float(v['OL_BufLostPerecnt']):>8.2f}"
            f"{float(v['CV_SenderBytes']):>10.1f}  {v['CV_SenderClient'] or '-'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "log":
            records = RunLog(f"{args.run_dir}/{RUN_LOG_FILE}").records()
            print(format_table(records) if records else "no runs logged yet")
            return EXIT_OK
        operator = _operator(args)
    except ConfigError as err:
        print(f"dgs-run: {err}", file=sys.stderr)
        return EXIT_CONFIG
    with operator:
        try:
            if args.command == "start":
                code = report(operator.prepare_run())
                return code if code != EXIT_OK else report(operator.begin_run())
            if args.command == "stop":
                return report(operator.end_run())
            status = operator.status(args.timeout)
            print(format_status(status))
            return EXIT_OK if status.all_reachable else EXIT_FAILED
        except KeyboardInterrupt:
            print("dgs-run: interrupted; `dgs-run status` shows where things are", file=sys.stderr)
            return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

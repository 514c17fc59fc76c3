"""`dgs-run`: start, stop and watch runs of a system from a shell or a script.

    dgs-run [options] start     prepare_run + begin_run (STOP -> READY -> RUN)
    dgs-run [options] stop      end_run (RUN -> STOP; READY -> STOP cancels);
                                --force: also when the IOCs are gone
    dgs-run [options] status    the run as the IOCs and this host see it; every crate's
                                state, rates, buffers and data lost
    dgs-run [options] log       the run log as a table

Each progress response is printed as one line ``<kind>: <message>``. Exit codes:
0 done, 1 timeout / crate down / error, 2 refused (wrong state, or another
operator is busy), 3 configuration error, 4 the run ended and was logged but
data were lost (``data-lost`` lines say where and why).

The system comes from ``--config`` (or ``--demo``); else from the dgs-system
running with this run directory (``<run-dir>/system.json``); else from the
system this run directory was last used with (``state.json``); else it is the
demonstration crate that ``make run`` starts (a note says so).

A step, once begun, always finishes: Ctrl-C, SIGTERM or SIGHUP during ``start``
or ``stop`` is noted and acted on after the step (an interrupted ``start``
cancels the prepared run, or leaves a begun run running), and a closed
standard output only silences the lines, so no run is left half-started or
half-stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from ioc.config import ConfigError, SystemConfig, demo_config, load_config
from runctl.console import Console
from runctl.losses import MIB
from runctl.operator import (
    DEFAULT_CONTROL_DIR,
    DEFAULT_RECEIVER_COMMAND,
    DONE,
    ELSEWHERE_NOTE,
    LOST,
    REFUSED,
    RUN_LOG_FILE,
    STATE_FILE,
    Operator,
    Progress,
    RunState,
    RunStatus,
    SystemStatus,
    Timeouts,
    choice,
    run_name,
)
from runctl.runlog import RunLog, format_table
from runctl.system import read_system_file

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_CONFIG, EXIT_LOST = 0, 1, 2, 3, 4
#: Signals that must not cut a step short (Ctrl-C, kill, a closed terminal).
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dgs-run", description="Run control for a DGS crate system.")
    p.add_argument(
        "--run-dir",
        default=DEFAULT_CONTROL_DIR,
        metavar="DIR",
        help="state, run log, receiver logs and (unless --data-dir) run data of this system "
        f"(default ./{DEFAULT_CONTROL_DIR})",
    )
    system = p.add_mutually_exclusive_group()
    system.add_argument("--config", metavar="FILE", help="system configuration (TOML)")
    system.add_argument(
        "--demo", action="store_true", help="the demonstration crate (dgs-ioc --demo, make run)"
    )
    p.add_argument(
        "--globals-pva",
        metavar="HOST:PORT",
        help="where the globals IOC serves PV Access (default: [system] globals_pva, else 5075)",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="run data: DIR/crate<NN>/run<NNNNN>/ (default RUN-DIR)"
    )
    receivers = p.add_mutually_exclusive_group()
    receivers.add_argument(
        "--receiver-command",
        metavar="CMD",
        help="receiver to start per crate, taking dgs-receiver's options (default: the "
        "product's dgs-receiver)",
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
    p.add_argument(
        "--force",
        action="store_true",
        help="stop: end the recorded run even if the IOCs do not answer (receivers are "
        "stopped, the run is logged as forced, the state goes back to STOP)",
    )
    p.add_argument("command", choices=("start", "stop", "status", "log"))
    args = p.parse_args(argv)
    if args.force and args.command != "stop":
        p.error("--force goes with stop only")
    return args


def _recorded(run_dir: str) -> RunStatus | None:
    """What this run directory's state file says, if it has one."""
    try:
        return RunStatus.from_json((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _system(args: argparse.Namespace, console: Console) -> tuple[SystemConfig, str | None]:
    """The configuration and globals PVA endpoint (module docstring: where from)."""
    demo = demo_config()
    if args.demo:
        return demo, args.globals_pva
    running = read_system_file(args.run_dir) or {}
    recorded = _recorded(args.run_dir)
    config = args.config or running.get("config") or (recorded.config if recorded else "")
    if not config:
        console.warn(
            f"dgs-run: no --config, no dgs-system and no system used before in {args.run_dir}: "
            "using the demonstration crate (dgs-ioc --demo, as `make run` starts it)"
        )
        return demo, args.globals_pva
    globals_pva = args.globals_pva
    if globals_pva is None and running.get("config") == config:
        globals_pva = running.get("globals_pva")
    if globals_pva is None and recorded and recorded.config == config:
        globals_pva = recorded.globals_pva or None
    if config == demo.source:
        return demo, globals_pva
    return load_config(Path(config).absolute()), globals_pva


def _operator(args: argparse.Namespace, console: Console) -> Operator:
    system, globals_pva = _system(args, console)
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


def exit_code(final: Progress | None) -> int:
    """The exit code a step's final response stands for."""
    if final is None or final.kind == DONE:
        return EXIT_OK
    if final.kind == LOST:
        return EXIT_LOST
    return EXIT_REFUSED if final.kind == REFUSED else EXIT_FAILED


def report(responses: Iterable[Progress], console: Console) -> int:
    """Print every response, consuming the step to its end whatever happens to the output;
    the exit code of its final response."""
    final: Progress | None = None
    for response in responses:
        console.say(str(response))
        final = response
    return exit_code(final)


def _text(values: dict, name: str) -> str:
    return choice(name, values[name]) if name in values else "?"


def _run_line(status: SystemStatus) -> str:
    """The run as this host recorded it, and what the IOCs say where they disagree."""
    op, ioc = status.operator, status.ioc_state
    if op.state is RunState.STOP:
        if ioc is not RunState.RUN:
            return "run control: STOP"
        number = int(status.globals["Online_CS_RunNumber"])
        return (
            f"run control: RUN run {number} ({run_name(number)}) as the IOCs show it "
            f"(Online_CS_StartStop = Start), {ELSEWHERE_NOTE}; dgs-run stop ends it"
        )
    since = op.start if op.state is RunState.RUN else op.prepared
    line = f"run control: {op.state.value} run {op.run} ({op.name}) since {since}"
    if op.state is RunState.RUN and ioc is RunState.STOP:
        line += (
            "; the IOCs show Online_CS_StartStop = Stop (stopped elsewhere): dgs-run stop "
            "finishes and logs it"
        )
    elif op.state is RunState.READY and ioc is RunState.RUN:
        line += "; the IOCs show Online_CS_StartStop = Start already: data flow"
    return line


def format_status(status: SystemStatus) -> str:
    """What `dgs-run status` prints."""
    lines = [_run_line(status)]
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
        f"{'buffers':>9}{'sent MiB':>10}{'lost MiB':>10}{'lost ev':>9}  receiver"
    )
    for crate in status.crates:
        v = crate.values
        if not crate.reachable:
            lines.append(f"{crate.crate:<6}NO ANSWER on {crate.endpoint} (PVA)")
            continue
        buffers = f"{int(v['CV_BuffersAvail'])}/{int(v['CV_BuffersTotal'])}"
        if not v["CV_BuffersOK"]:
            buffers += " LEAK"
        loss = crate.loss
        lost_mib = "?" if loss is None else f"{loss.total_bytes / MIB:.1f}"
        lost_events = "?" if loss is None else str(loss.total_events)
        lines.append(
            f"{crate.crate:<6}{choice('CV_State', v['CV_State']):<11}"
            f"{float(v['CV_InLoop1']):>10.1f}"
            f"{float(v['CV_SendRate']):>11.1f}{float(v['CV_SenderWireRate']):>11.1f}"
            f"{buffers:>9}{float(v['CV_SenderBytes']):>10.1f}{lost_mib:>10}{lost_events:>9}"
            f"  {v['CV_SenderClient'] or '-'}"
        )
        if loss is not None and (loss or loss.superseded):
            lines.append(f"{'':<6}crate {crate.crate} lost {loss.describe()}")
    return "\n".join(lines)


class Interruptions:
    """Ctrl-C, SIGTERM and SIGHUP noted instead of raised while a step changes the system."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in DEFERRED_SIGNALS:
            signal.signal(sig, lambda *_: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()


def start(operator: Operator, console: Console, interrupted: Interruptions) -> int:
    """prepare_run, then begin_run unless interrupted (then the prepared run is cancelled)."""
    code = report(operator.prepare_run(), console)
    if code != EXIT_OK:
        return code
    if interrupted:
        console.warn("dgs-run: interrupted after the run was prepared: cancelling it")
        report(operator.end_run(), console)
        return EXIT_FAILED
    code = report(operator.begin_run(), console)
    if interrupted:
        console.warn("dgs-run: interrupted, but the run had begun: it runs; dgs-run stop ends it")
        return EXIT_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        if args.command == "log":
            records = RunLog(Path(args.run_dir) / RUN_LOG_FILE).records()
            console.say(format_table(records) if records else "no runs logged yet")
            return EXIT_OK
        operator = _operator(args, console)
    except ConfigError as err:
        console.warn(f"dgs-run: {err}")
        return EXIT_CONFIG
    with operator:
        if args.command == "status":
            try:
                status = operator.status(args.timeout)
            except KeyboardInterrupt:
                console.warn("dgs-run: interrupted")
                return EXIT_FAILED
            console.say(format_status(status))
            return EXIT_OK if status.all_reachable else EXIT_FAILED
        interrupted = Interruptions()
        if args.command == "start":
            code = start(operator, console, interrupted)
        else:
            code = report(operator.end_run(force=args.force), console)
            if interrupted:
                console.warn("dgs-run: interrupted, but the stop was finished first")
    if "stdout" in console.lost:
        console.warn(
            f"dgs-run: standard output was closed; the state is in {args.run_dir}/{STATE_FILE}, "
            f"finished runs in {args.run_dir}/{RUN_LOG_FILE}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())

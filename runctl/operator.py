"""Run control for people and scripts: the `Operator` API.

A system (one configuration file: a globals IOC or a standalone crate, and
its crates) is in one of three run states:

- STOP (the default): nothing expects data;
- READY: everything is prepared to receive: the run number is reserved,
  SaveData = Save, every crate is Stopped with a whole pool and connected
  globals, and one receiver per crate is running and waiting to connect. Data
  arriving early (someone Starts by hand) is part of the run;
- RUN: StartStop = Start, data flow.

``prepare_run()`` goes STOP -> READY, ``begin_run()`` READY -> RUN and
``end_run()`` RUN -> STOP (from READY it cancels the prepared run). Each is a
generator of `Progress` responses, in this order:

==================  ============================================================
kind                meaning
==================  ============================================================
acknowledged        the request is accepted for the current state (always first)
crate-ready         prepare_run: crate N is Stopped, pool whole, globals connected
run-number          prepare_run: ``Online_CS_RunNumber`` advanced; names the run
                    (numbers whose data directory exists already are skipped)
receiver-started    prepare_run: crate N's receiver is up (its begin-of-run PV
                    snapshot is saved) and keeps trying to connect until Start
                    opens the crate's data port
crate-running       begin_run: crate N is Running (or running with no boards)
crate-drained       end_run: crate N is Stopped again: drained and flushed
receiver-finished   end_run: crate N's receiver exited (its exit code is in the
                    message; 0 = every board's end-of-run marker received)
data-lost           end_run: crate N lost data this run: bytes and events per
                    reason (`runctl.losses`)
done                final: the new state was reached
lost                final: end_run reached STOP and logged the run, but data
                    were lost (the data-lost responses say where and why)
timeout             final: something did not happen in time (the message names
                    each crate and what it was waiting for, e.g. an IOC that
                    does not answer)
error               final: a put was refused, a receiver failed, ... (a run
                    that fails after its number was reserved is logged)
refused             final, and the only response: the call does not fit the
                    current state (e.g. begin_run without prepare_run); nothing
                    was changed
==================  ============================================================

Crate responses come in the order the crates get there. Every generator ends
with exactly one final response; `Progress.final` tells which one it is.

The run state is the IOCs' as much as this host's: ``Online_CS_StartStop``,
``Online_CS_RunNumber`` and each crate's ``CV_State`` say whether a run is
going on, wherever it was started. So `status` shows a run started by another
operator host or by hand, prepare_run refuses while the IOCs run, and end_run
ends such a run too (without its receivers, which are not this host's).
``end_run(force=True)`` ends the recorded run even when the IOCs are gone:
what answers is stopped as usual, the receivers are stopped, and the run is
logged as forced.

Receivers (`runctl.receivers`): one ``dgs-receiver`` process per crate (so
one slow or failing crate affects only its own files and exit code), started
by prepare_run on this host with ``--run N``, writing
``<data_dir>/crate<NN>/<run>/``, and with ``--crate NN --pv-pva HOST:PORT`` so
it saves the crate's PV snapshots at the begin and end of the run. end_run
waits for each to exit by itself (every board's 0xD received); one whose crate
never drained, or that overruns ``Timeouts.receivers_s``, is stopped with
SIGTERM (it closes its files cleanly). Trigger boards of the configuration are
passed to it with ``--trigger-board``. A run that is cancelled or fails before
it starts leaves no run directory behind unless it holds data
(`runctl.rundirs`).

The state lives in ``<control_dir>/state.json`` so that ``dgs-run start`` and
a later ``dgs-run stop`` (another process) agree; a lock file keeps two
operators from acting on one system at once. Receivers run under
`runctl.supervise`, which keeps each one's exit code in a file, because the
process that stops a run is usually not the one that started the receivers.
Finished runs go to the run log ``<control_dir>/runs.jsonl`` (`runctl.runlog`).
By default the control directory is ``./data`` (ignored by git), and the run
data go to its ``crate<NN>/`` subdirectories.

PVs are read and written over PV Access (p4p), one client per IOC pinned to its
endpoint (`runctl.ioclink` says where each IOC is looked for); the ``globals_pva``
argument overrides where the global records are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ioc.config import CrateConfig, SystemConfig
from runctl.controldir import (
    DEFAULT_CONTROL_DIR,
    RUN_LOG_FILE,
    STATE_FILE,
    ControlDir,
)
from runctl.ending import ELSEWHERE_NOTE, RunEnd, listed
from runctl.ioclink import Endpoint, crate_endpoint, globals_endpoint
from runctl.receivers import DEFAULT_RECEIVER_COMMAND, Receivers
from runctl.rundirs import clear_unstarted, free_run_number, run_name
from runctl.runlog import (
    RESULT_CANCELLED,
    RESULT_ERROR,
    RunLog,
    now_text,
    run_record,
    unstarted_record,
)
from runctl.runstate import (
    ACKNOWLEDGED,
    CRATE_DRAINED,
    CRATE_PVS,
    CRATE_READY,
    CRATE_RUNNING,
    DATA_LOST,
    DEFAULT_TIMEOUTS,
    DONE,
    ERROR,
    FINAL_KINDS,
    GLOBAL_PVS,
    LOST,
    RECEIVER_FINISHED,
    RECEIVER_STARTED,
    REFUSED,
    RUN_NUMBER,
    START,
    TIMEOUT,
    CrateStatus,
    Progress,
    RunState,
    RunStatus,
    SystemStatus,
    Timeouts,
    choice,
)
from runctl.systemlink import SystemLink

#: The API, also where `runctl.cli`, `runctl.system` and scripts import it from.
__all__ = [
    "ACKNOWLEDGED",
    "CRATE_DRAINED",
    "CRATE_PVS",
    "CRATE_READY",
    "CRATE_RUNNING",
    "DATA_LOST",
    "DEFAULT_CONTROL_DIR",
    "DEFAULT_RECEIVER_COMMAND",
    "DONE",
    "ELSEWHERE_NOTE",
    "ERROR",
    "FINAL_KINDS",
    "GLOBAL_PVS",
    "LOST",
    "RECEIVER_FINISHED",
    "RECEIVER_STARTED",
    "REFUSED",
    "RUN_LOG_FILE",
    "RUN_NUMBER",
    "STATE_FILE",
    "TIMEOUT",
    "CrateStatus",
    "Endpoint",
    "Operator",
    "Progress",
    "RunState",
    "RunStatus",
    "SystemStatus",
    "Timeouts",
    "choice",
    "crate_endpoint",
    "globals_endpoint",
    "run_name",
]

class Operator:
    """STOP -> READY -> RUN -> STOP for one system; see the module docstring."""

    def __init__(
        self,
        system: SystemConfig,
        *,
        control_dir: str | os.PathLike[str] = DEFAULT_CONTROL_DIR,
        data_dir: str | os.PathLike[str] | None = None,
        globals_pva: str | None = None,
        receiver_command: Sequence[str] | None = DEFAULT_RECEIVER_COMMAND,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        """``receiver_command`` None runs without receivers (someone else reads the data)."""
        self.system = system
        self.control_dir = Path(control_dir).absolute()
        self.data_dir = Path(data_dir).absolute() if data_dir else self.control_dir
        self.timeouts = timeouts
        self.globals_pva = globals_pva or ""  # as given, remembered in the state file
        self.globals_endpoint = globals_endpoint(system, globals_pva)
        self.run_log = RunLog(self.control_dir / RUN_LOG_FILE)
        self._control = ControlDir(self.control_dir)
        self._iocs = SystemLink(system, self.globals_endpoint, timeouts)
        self._receivers = Receivers(receiver_command, self.control_dir, self.data_dir, timeouts)

    # -- public API ---------------------------------------------------------

    def prepare_run(self, timeout_s: float | None = None) -> Iterator[Progress]:
        """STOP -> READY; ``timeout_s`` bounds the wait for every crate to be ready."""
        return self._control.exclusive(lambda: self._prepare(timeout_s or self.timeouts.ready_s))

    def begin_run(self, timeout_s: float | None = None) -> Iterator[Progress]:
        """READY -> RUN; ``timeout_s`` bounds the wait for every crate to run."""
        return self._control.exclusive(lambda: self._begin(timeout_s or self.timeouts.running_s))

    def end_run(self, timeout_s: float | None = None, *, force: bool = False) -> Iterator[Progress]:
        """RUN -> STOP (READY -> STOP cancels); ``timeout_s`` bounds the drain. ``force``
        ends the recorded run even when IOCs do not answer (logged as forced)."""
        return self._control.exclusive(lambda: self._end(timeout_s or self.timeouts.drain_s, force))

    @property
    def receiver_command(self) -> list[str] | None:
        """The receiver's command line; None when this operator starts no receivers."""
        return self._receivers.command

    @property
    def state(self) -> RunState:
        """This host's record of the run state (`status` adds what the IOCs show)."""
        return self.read_status().state

    def read_status(self) -> RunStatus:
        return self._control.read()

    def status(self, timeout_s: float | None = None) -> SystemStatus:
        """Every IOC's current values; waits at most ``timeout_s`` for unreachable ones."""
        self._iocs.wait_connected(timeout_s or self.timeouts.connect_s)
        crates = self._iocs.crate_statuses()
        return SystemStatus(
            operator=self.read_status(),
            globals_endpoint=self.globals_endpoint,
            globals=self._iocs.globals_values(),
            crates=crates,
        )

    def close(self) -> None:
        self._iocs.close()
        self._receivers.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the three steps ----------------------------------------------------

    def _prepare(self, timeout: float) -> Iterator[Progress]:
        status = self.read_status()
        if status.state is RunState.READY:
            yield Progress(
                REFUSED,
                f"prepare_run refused: run {status.run} is already prepared (READY); "
                "begin_run starts it, end_run cancels it",
            )
            return
        if status.state is RunState.RUN:
            yield Progress(
                REFUSED, f"prepare_run refused: run {status.run} is running; end_run stops it first"
            )
            return
        crates = list(self.system.crates)
        iocs = self._iocs
        iocs.watch_all()
        problem = iocs.wait_globals()
        elsewhere = None if problem else iocs.globals_now()
        if elsewhere is not None and elsewhere[0]:
            yield Progress(
                REFUSED,
                f"prepare_run refused: the IOCs are running run {elsewhere[1]} "
                f"(Online_CS_StartStop = Start), not started from {self.control_dir}; "
                "end_run (dgs-run stop) ends it first",
            )
            return
        yield Progress(
            ACKNOWLEDGED,
            f"prepare run: checking the globals ({self.globals_endpoint}) and {len(crates)} "
            f"crate(s) {', '.join(c.crate for c in crates)}",
        )
        if problem:
            yield Progress(TIMEOUT, problem)
            return
        missing = yield from iocs.each_crate(crates, CRATE_READY, iocs.ready_check, timeout)
        if missing:
            yield Progress(TIMEOUT, f"not ready within {timeout:g} s: {listed(missing)}")
            return
        now = iocs.globals_now()
        if now is None:
            yield Progress(
                TIMEOUT,
                f"the global run-control records stopped answering ({self.globals_endpoint})",
            )
            return
        number, skipped = now[1] + 1, ""
        if self.receiver_command:
            number, skipped = free_run_number(self.data_dir, crates, number)
        name = run_name(number)
        failure = iocs.put_globals(("Online_CS_RunNumber", number), ("Online_CS_SaveData", 1))
        if failure:
            yield Progress(ERROR, failure)
            return
        yield Progress(RUN_NUMBER, f"run {number} reserved ({name}); SaveData = Save{skipped}")
        status = RunStatus(
            state=RunState.READY,
            run=number,
            name=name,
            config=self.system.source,
            globals_pva=self.globals_pva,
            data_dir=str(self.data_dir),
            prepared=now_text(),
            crates=[c.crate for c in crates],
        )
        self._control.save(status)  # from here on, end_run can cancel whatever was started
        if self.receiver_command:
            problem = yield from self._receivers.start_all(crates, status, self._control.save)
            if problem:
                exits = yield from self._receivers.cancel(status.receivers)
                kept = clear_unstarted(status.receivers)
                message = f"{problem}; run {number} abandoned, STOP{kept}"
                self.run_log.append(unstarted_record(status, RESULT_ERROR, exits, message))
                self._control.save(self._stopped())
                yield Progress(ERROR, message)
                return
        yield Progress(DONE, f"READY: run {number} ({name}); begin_run starts it")

    def _begin(self, timeout: float) -> Iterator[Progress]:
        status = self.read_status()
        if status.state is RunState.STOP:
            yield Progress(
                REFUSED,
                "begin_run refused: no run is prepared (the system is STOP); prepare_run first",
            )
            return
        if status.state is RunState.RUN:
            yield Progress(REFUSED, f"begin_run refused: run {status.run} is already running")
            return
        crates = self._crates_of(status)
        yield Progress(ACKNOWLEDGED, f"begin run {status.run}: StartStop = Start")
        iocs = self._iocs
        iocs.watch_all()
        problem = iocs.wait_globals()
        if problem:
            yield Progress(TIMEOUT, problem)
            return
        start = now_text()
        failure = iocs.put_globals(("Online_CS_StartStop", START))
        if failure:
            yield Progress(ERROR, failure)
            return
        status.state, status.start = RunState.RUN, start
        self._control.save(status)
        missing = yield from iocs.each_crate(crates, CRATE_RUNNING, iocs.running_check, timeout)
        if missing:
            status.not_running = sorted(missing)
            self._control.save(status)
            yield Progress(
                TIMEOUT,
                f"not running within {timeout:g} s: {listed(missing)}; the run is started "
                "(RUN), end_run stops it",
            )
            return
        dead = [
            f"crate {r.crate} receiver exited with {code} (log {r.log})"
            for r in status.receivers
            if (code := self._receivers.exit_code(r)) is not None
        ]
        if dead:
            yield Progress(ERROR, f"run {status.run} is running but " + "; ".join(dead))
            return
        yield Progress(DONE, f"RUN: run {status.run} running on {len(crates)} crate(s)")

    def _end(self, timeout: float, force: bool) -> Iterator[Progress]:
        status = self.read_status()
        if status.state is RunState.READY:
            yield from self._cancel(status)
            return
        # One connect timeout for the whole command: IOCs that do not answer are waited
        # for once, not once per step.
        connect_by = time.monotonic() + self.timeouts.connect_s
        iocs = self._iocs
        adopted = status.state is RunState.STOP
        if adopted:
            iocs.watch_all()
            now = None if iocs.wait_globals(connect_by) else iocs.globals_now()
            if now is None or not now[0]:
                shown = (
                    f"the global run-control records do not answer on {self.globals_endpoint}"
                    if now is None
                    else "the IOCs show Online_CS_StartStop = Stop"
                )
                yield Progress(
                    REFUSED,
                    f"end_run refused: no run is prepared or running (STOP in "
                    f"{self.control_dir}, and {shown})",
                )
                return
            status = self._run_of_the_iocs(now[1])
        crates = self._crates_of(status)
        yield Progress(
            ACKNOWLEDGED,
            f"end run {status.run}: StartStop = Stop" + (f"; {ELSEWHERE_NOTE}" if adopted else ""),
        )
        iocs.watch_all()
        never_ran = iocs.never_ran(
            [crate for crate in crates if crate.crate in status.not_running], connect_by
        )
        problem = iocs.wait_globals(connect_by)
        failure = problem or iocs.put_globals(("Online_CS_StartStop", 0))
        if failure and not force:
            yield Progress(
                TIMEOUT if problem else ERROR,
                f"{failure}; still RUN (end_run with force, `dgs-run stop --force`, ends the "
                "recorded run without the IOCs)",
            )
            return
        stop = now_text()
        # Forced: crates that do not answer, or that never got the Stop, cannot drain.
        unreachable = iocs.unreachable_crates(crates, connect_by) if force else {}
        drain = [] if failure else [c for c in crates if c.crate not in unreachable]
        gone = {"globals": failure} if failure else {}
        gone |= {f"crate {crate}": why for crate, why in unreachable.items()}
        missing = yield from iocs.each_crate(drain, CRATE_DRAINED, iocs.drained_check, timeout)
        stop_now = set(missing) | never_ran | {c.crate for c in crates if c not in drain}
        exits, late = yield from self._receivers.finish(status.receivers, stop_now)
        sent, losses = iocs.final_counts(crates)
        for crate in crates:
            if (loss := losses.get(crate.crate)) is not None and (loss or loss.superseded):
                yield Progress(
                    DATA_LOST,
                    f"crate {crate.crate} lost {losses[crate.crate].describe()}",
                    crate.crate,
                )
        end = RunEnd(
            run=status.run,
            crates=len(crates),
            drain_s=timeout,
            receivers_s=self.timeouts.receivers_s,
            not_drained=missing,
            late=late,
            exits=exits,
            sent=sent,
            losses=losses,
            gone=gone,
            never_ran=never_ran,
            adopted=adopted,
        )
        record = run_record(status, stop, exits, sent, losses, end.result, end.message)
        self.run_log.append(record)
        self._control.save(self._stopped())
        yield end.closing(record.duration_s)

    def _cancel(self, status: RunStatus) -> Iterator[Progress]:
        yield Progress(ACKNOWLEDGED, f"cancel run {status.run}: it was prepared, never started")
        exits = yield from self._receivers.cancel(status.receivers)
        kept = clear_unstarted(status.receivers)
        message = kept.removeprefix("; ")
        self.run_log.append(unstarted_record(status, RESULT_CANCELLED, exits, message))
        self._control.save(self._stopped())
        yield Progress(DONE, f"STOP: run {status.run} cancelled before it began{kept}")

    def _run_of_the_iocs(self, number: int) -> RunStatus:
        """The run the IOCs are in, when this host has no record of it: every crate, no
        receivers (they are not this host's), start time unknown."""
        return RunStatus(
            state=RunState.RUN,
            run=number,
            name=run_name(number),
            config=self.system.source,
            globals_pva=self.globals_pva,
            data_dir=str(self.data_dir),
            crates=[c.crate for c in self.system.crates],
        )

    # -- plumbing ---------------------------------------------------------

    def _stopped(self) -> RunStatus:
        """STOP, remembering which system this control directory is about."""
        return RunStatus(config=self.system.source, globals_pva=self.globals_pva)

    def _crates_of(self, status: RunStatus) -> list[CrateConfig]:
        return [self.system.crate(crate) for crate in status.crates]

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

Receivers: one ``dgs-receiver`` process per crate (so one slow or failing
crate affects only its own files and exit code), started by prepare_run on
this host with ``--run N``, writing ``<data_dir>/crate<NN>/<run>/``, and with
``--crate NN --pv-pva HOST:PORT`` so it saves the crate's PV snapshots at the
begin and end of the run. end_run waits for each to exit by itself (every
board's 0xD received); one whose crate never drained, or that overruns
``Timeouts.receivers_s``, is stopped with SIGTERM (it closes its files
cleanly). Trigger boards of the configuration are passed to it with
``--trigger-board``. A run that is cancelled or fails before it starts leaves
no run directory behind unless it holds data.

The state lives in ``<control_dir>/state.json`` so that ``dgs-run start`` and
a later ``dgs-run stop`` (another process) agree; a lock file keeps two
operators from acting on one system at once. Receivers run under
`runctl.supervise`, which keeps each one's exit code in a file, because the
process that stops a run is usually not the one that started the receivers.
Finished runs go to the run log ``<control_dir>/runs.jsonl`` (`runctl.runlog`).
By default the control directory is ``./data`` (ignored by git), and the run
data go to its ``crate<NN>/`` subdirectories.

PVs are read and written over PV Access (p4p): one client context per IOC,
pinned to that IOC's ``host:pva_port`` as a TCP name server, so several IOCs
on one host never shadow each other and no UDP search is needed. A crate
whose configuration names no ``pva_port`` is looked for where a PVA client
would: ``EPICS_PVA_SERVER_PORT``, else 5075. The globals IOC's PVA endpoint is
``[system] globals_pva`` of the configuration, by default the standard port
5075 on the ``globals_ca`` host (where ``dgs-ioc --globals-only`` and
``dgs-system`` serve it); the ``globals_pva`` argument overrides it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import p4p
from p4p.client.thread import Context, RemoteError
from p4p.nt.enum import ntenum

from ioc.config import DEFAULT_PVA_PORT, CrateConfig, SystemConfig
from ioc.hardware import BoardKind
from ioc.pvs import PV_TABLE, Scope
from runctl.losses import LOSS_PVS, Loss
from runctl.runlog import (
    RESULT_CANCELLED,
    RESULT_ERROR,
    RESULT_FORCED,
    RESULT_LOST,
    RESULT_OK,
    RESULT_TIMEOUT,
    CrateRecord,
    RunLog,
    RunRecord,
    now_text,
)
from runctl.supervise import MARKER, read_exit_file

ACKNOWLEDGED = "acknowledged"
CRATE_READY = "crate-ready"
RUN_NUMBER = "run-number"
RECEIVER_STARTED = "receiver-started"
CRATE_RUNNING = "crate-running"
CRATE_DRAINED = "crate-drained"
RECEIVER_FINISHED = "receiver-finished"
DATA_LOST = "data-lost"
DONE = "done"
LOST = "lost"
TIMEOUT = "timeout"
ERROR = "error"
REFUSED = "refused"
FINAL_KINDS = frozenset({DONE, LOST, TIMEOUT, ERROR, REFUSED})

#: Control files and run data, relative to the working directory (ignored by git).
DEFAULT_CONTROL_DIR = "data"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
RUN_LOG_FILE = "runs.jsonl"
RECEIVER_DIR = "receivers"
#: The product's receiver, from the same environment as this module.
DEFAULT_RECEIVER_COMMAND = (sys.executable, "-m", "receiver.cli")

GLOBAL_PVS = ("Online_CS_StartStop", "Online_CS_SaveData", "Online_CS_RunNumber")
#: Per-crate PVs the operator watches (``DAQC<NN>_`` + suffix).
CRATE_PVS = (
    "CV_State",
    "CV_BuffersAvail",
    "CV_BuffersTotal",
    "CV_BuffersOK",
    "CV_GlobalsConnected",
    "CV_SenderBytes",
    "CV_SendRate",
    "CV_SenderWireRate",
    "CV_SenderClient",
    "CV_InLoop1",
)
STATE_STOPPED, STATE_RUNNING, STATE_NO_BOARDS = 0, 1, 3
START = 1  # Online_CS_StartStop
#: How much longer `status` waits for the loss counters once the rest answers.
LOSS_CONNECT_S = 1.0
ELSEWHERE_NOTE = (
    "started elsewhere (another operator host, or by hand): its start time and receivers "
    "are not known here"
)
POLL_S = 0.05
#: The IOC publishes statistics every 0.5 s.
PUBLISH_PERIOD_S = 0.5
PUT_TIMEOUT_S = 5.0
#: How long the end-of-run counts may take to read.
FINAL_READ_S = 2.0
#: How long a receiver has to exit after SIGTERM before it is killed.
TERM_GRACE_S = 5.0
MIB = 1 << 20


class RunState(enum.Enum):
    STOP = "STOP"
    READY = "READY"
    RUN = "RUN"


@dataclass(frozen=True)
class Progress:
    """One response of a run-control step (module docstring: kinds and order)."""

    kind: str
    message: str
    crate: str | None = None

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS

    @property
    def ok(self) -> bool:
        return self.kind == DONE

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class Timeouts:
    """How long each step waits, in seconds."""

    connect_s: float = 5.0  # an IOC answers at all
    ready_s: float = 15.0  # prepare_run: crates Stopped with a whole pool
    running_s: float = 15.0  # begin_run: crates Running
    drain_s: float = 30.0  # end_run: crates Stopped again
    receivers_s: float = 60.0  # end_run: receivers exit after the drain
    receiver_ready_s: float = 20.0  # prepare_run: a receiver is up and connecting
    receiver_connect_s: float = 3600.0  # given to each receiver: READY may last long


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ReceiverProcess:
    """A receiver started by prepare_run, as the state file remembers it."""

    crate: str
    pid: int
    exit_file: str
    log: str
    run_dir: str  # where its files of this run go


@dataclass
class RunStatus:
    """The operator state shared by every process through the state file; ``config`` and
    ``globals_pva`` name the system it was last about, so later commands find it."""

    state: RunState = RunState.STOP
    run: int | None = None
    name: str | None = None
    config: str = ""
    globals_pva: str = ""
    data_dir: str = ""
    prepared: str | None = None
    start: str | None = None
    crates: list[str] = field(default_factory=list)
    receivers: list[ReceiverProcess] = field(default_factory=list)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunStatus:
        data = json.loads(text)
        data["state"] = RunState(data["state"])
        data["receivers"] = [ReceiverProcess(**r) for r in data["receivers"]]
        return cls(**data)


@dataclass(frozen=True)
class CrateStatus:
    crate: str
    endpoint: Endpoint
    #: CRATE_PVS and LOSS_PVS suffix -> plain value; missing when unreachable
    values: dict[str, Any]

    @property
    def reachable(self) -> bool:
        return all(name in self.values for name in CRATE_PVS)

    @property
    def loss(self) -> Loss | None:
        """What the crate lost in the current (or last) run; None if it does not say."""
        return Loss.from_values(self.values)


@dataclass(frozen=True)
class SystemStatus:
    operator: RunStatus
    globals_endpoint: Endpoint
    globals: dict[str, Any]  # GLOBAL_PVS name -> plain value; missing when unreachable
    crates: list[CrateStatus]

    @property
    def all_reachable(self) -> bool:
        return all(n in self.globals for n in GLOBAL_PVS) and all(c.reachable for c in self.crates)

    @property
    def ioc_state(self) -> RunState | None:
        """RUN or STOP as the IOCs show it (READY is this host's alone); None when the
        global records do not answer."""
        started = self.globals.get("Online_CS_StartStop")
        if started is None:
            return None
        return RunState.RUN if started == START else RunState.STOP


#: Enum strings by global PV name or crate PV suffix (``CV_State``), from the PV table.
_CHOICES = {
    pv.template.removeprefix("DAQC{crate}_"): pv.enums
    for pv in PV_TABLE
    if pv.enums and pv.scope in (Scope.GLOBAL, Scope.CRATE)
}


def choice(name: str, index: int) -> str:
    """The enum string of ``index`` for a global PV name or a crate PV suffix."""
    choices = _CHOICES.get(name, ())
    return choices[index] if 0 <= index < len(choices) else str(index)


def _plain(value: Any) -> int | float | str | tuple[float, ...]:
    """A p4p value as plain Python: enums as their index (monitor updates after the
    first one carry no choices), numbers and strings as themselves (p4p's wrappers
    print a time stamp with ``str()``)."""
    if isinstance(value, ntenum | bool | int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, np.ndarray):
        return tuple(float(v) for v in value)
    return repr(value)


def _listed(reasons: dict[str, str]) -> str:
    return "; ".join(f"crate {crate}: {reason}" for crate, reason in reasons.items())


def run_name(number: int) -> str:
    """The product's run name: ``run`` + the number in five digits (spec 04)."""
    return f"run{number:05d}"


def crate_endpoint(crate: CrateConfig) -> Endpoint:
    """Where the crate serves PVA: its ``pva_port``, else where a PVA client looks by
    default (``EPICS_PVA_SERVER_PORT``, else 5075), as the IOC itself falls back."""
    if crate.pva_port:
        return Endpoint(crate.host, crate.pva_port)
    try:
        port = int(os.environ.get("EPICS_PVA_SERVER_PORT", DEFAULT_PVA_PORT))
    except ValueError:
        port = DEFAULT_PVA_PORT
    return Endpoint(crate.host, port)


def globals_endpoint(system: SystemConfig, globals_pva: str | None = None) -> Endpoint:
    """Where the global records are served over PVA.

    A standalone crate serves them itself; remote globals are at ``globals_pva``
    when given, else where the configuration says (`SystemConfig.globals_pva_endpoint`).
    """
    if globals_pva:
        host, _, port = globals_pva.rpartition(":")
        return Endpoint(host, int(port))
    if system.globals == "local":
        return crate_endpoint(system.crates[0])
    return Endpoint(*system.globals_pva_endpoint)


def _quiet_pvxs() -> None:
    """The operator reports unreachable IOCs itself; pvxs would print every retry."""
    p4p._logger_level_set("pvxs.tcp.io", p4p.logLevelFatal)


class IocLink:
    """One IOC's PVs over PV Access, with a cache kept current by monitors."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._context = Context(
            "pva",
            conf={
                "EPICS_PVA_NAME_SERVERS": str(endpoint),
                "EPICS_PVA_ADDR_LIST": "",
                "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            },
            useenv=False,
        )
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._subscriptions: dict[str, Any] = {}

    def watch(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._subscriptions:
                self._subscriptions[name] = self._context.monitor(
                    name, partial(self._update, name), notify_disconnect=True
                )

    def _update(self, name: str, value: Any) -> None:
        with self._lock:
            if isinstance(value, Exception):
                self._values.pop(name, None)
            else:
                self._values[name] = _plain(value)

    def value(self, name: str) -> Any | None:
        """The last value seen, or None while disconnected."""
        with self._lock:
            return self._values.get(name)

    def snapshot(self, names: Iterable[str]) -> dict[str, Any]:
        with self._lock:
            return {name: self._values[name] for name in names if name in self._values}

    def has_all(self, names: Iterable[str]) -> bool:
        with self._lock:
            return all(name in self._values for name in names)

    def get_many(self, names: Sequence[str], timeout: float = PUT_TIMEOUT_S) -> dict[str, Any]:
        """Current values read now (not the monitors' last), of the names that answered
        within ``timeout``; all of them are asked at once."""
        values = self._context.get(list(names), timeout=timeout, throw=False)
        return {
            name: _plain(value)
            for name, value in zip(names, values, strict=True)
            if not isinstance(value, Exception)
        }

    def put(self, name: str, value: int, timeout: float = PUT_TIMEOUT_S) -> None:
        self._context.put(name, value, timeout=timeout)

    def close(self) -> None:
        for subscription in self._subscriptions.values():
            subscription.close()
        self._subscriptions.clear()
        self._context.close()


def _data_files(run_dir: Path) -> list[Path]:
    """The run's data files; the receiver's JSON side files (summary, PV snapshots)
    and files still being written (hidden) are not data."""
    if not run_dir.is_dir():
        return []
    return [
        path
        for path in run_dir.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".json"
    ]


#: The receiver's side files of a run (``<run>.<name>.json``): they describe the run, they
#: are not its data; nor are its acknowledgement journals (``.<run>.journal_<n>``).
BEGIN_SNAPSHOT = "pvs_begin"
SIDE_FILES = ("summary", BEGIN_SNAPSHOT, "pvs_end")
JOURNAL = re.compile(r"\.run\d{5,}\.journal_\d+")
RUN_DIR_NAME = re.compile(r"run(\d{5,})")


def _holds_something(path: Path) -> bool:
    """Whether a would-be run directory is in use (the receiver accepts only an empty one)."""
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def used_run_numbers(crate_dir: Path) -> set[int]:
    """Run numbers whose directory under ``crate_dir`` exists and holds something."""
    if not crate_dir.is_dir():
        return set()
    return {
        int(match[1])
        for path in crate_dir.iterdir()
        if (match := RUN_DIR_NAME.fullmatch(path.name)) and _holds_something(path)
    }


def remove_unused_run_dir(run_dir: Path) -> bool:
    """Remove the run directory of a run that never started, if it holds no data: only the
    receiver's side files of that run go, and only then the (empty) directory. True if it
    is gone; anything else in it keeps it, untouched."""
    if not run_dir.is_dir():
        return not run_dir.exists()
    side = {f"{run_dir.name}.{name}.json" for name in SIDE_FILES}
    side |= {f".{name}.part" for name in side}  # the space a receiver sets aside for them
    entries = list(run_dir.iterdir())
    if any(
        not entry.is_file() or (entry.name not in side and not JOURNAL.fullmatch(entry.name))
        for entry in entries
    ):
        return False
    for entry in entries:
        entry.unlink()
    run_dir.rmdir()
    return True


def _dir_usage(run_dir: Path) -> tuple[int, int]:
    """(data files, their bytes) of a run directory; (0, 0) if it does not exist."""
    files = _data_files(run_dir)
    return len(files), sum(path.stat().st_size for path in files)


def _receiver_summary(run_dir: Path) -> tuple[int | None, int | None]:
    """(payload bytes, records) the receiver's summary reports, None if it wrote none."""
    try:
        document = json.loads((run_dir / f"{run_dir.name}.summary.json").read_text())
        iocs = document["iocs"]
        return sum(i["payload_bytes"] for i in iocs), sum(i["records"] for i in iocs)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


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
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        """``receiver_command`` None runs without receivers (someone else reads the data)."""
        self.system = system
        self.control_dir = Path(control_dir).absolute()
        self.data_dir = Path(data_dir).absolute() if data_dir else self.control_dir
        self.receiver_command = list(receiver_command) if receiver_command else None
        self.timeouts = timeouts
        self.globals_pva = globals_pva or ""  # as given, remembered in the state file
        self.globals_endpoint = globals_endpoint(system, globals_pva)
        self.run_log = RunLog(self.control_dir / RUN_LOG_FILE)
        self._links: dict[Endpoint, IocLink] = {}
        self._children: dict[int, subprocess.Popen] = {}
        _quiet_pvxs()

    # -- public API ---------------------------------------------------------

    def prepare_run(self, timeout_s: float | None = None) -> Iterator[Progress]:
        """STOP -> READY; ``timeout_s`` bounds the wait for every crate to be ready."""
        return self._exclusive(lambda: self._prepare(timeout_s or self.timeouts.ready_s))

    def begin_run(self, timeout_s: float | None = None) -> Iterator[Progress]:
        """READY -> RUN; ``timeout_s`` bounds the wait for every crate to run."""
        return self._exclusive(lambda: self._begin(timeout_s or self.timeouts.running_s))

    def end_run(self, timeout_s: float | None = None, *, force: bool = False) -> Iterator[Progress]:
        """RUN -> STOP (READY -> STOP cancels); ``timeout_s`` bounds the drain. ``force``
        ends the recorded run even when IOCs do not answer (logged as forced)."""
        return self._exclusive(lambda: self._end(timeout_s or self.timeouts.drain_s, force))

    @property
    def state(self) -> RunState:
        """This host's record of the run state (`status` adds what the IOCs show)."""
        return self.read_status().state

    def read_status(self) -> RunStatus:
        path = self.control_dir / STATE_FILE
        if not path.exists():
            return RunStatus()
        return RunStatus.from_json(path.read_text())

    def status(self, timeout_s: float | None = None) -> SystemStatus:
        """Every IOC's current values; waits at most ``timeout_s`` for unreachable ones."""
        self._watch_all()
        deadline = time.monotonic() + (timeout_s or self.timeouts.connect_s)
        while not self._all_connected() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        # Loss counters connect with the rest; an IOC that has none must not hold us long.
        deadline = min(deadline, time.monotonic() + LOSS_CONNECT_S)
        while not self._losses_connected() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        crates = [
            CrateStatus(
                c.crate,
                crate_endpoint(c),
                {
                    suffix: value
                    for suffix in (*CRATE_PVS, *LOSS_PVS)
                    if (value := self._crate_link(c).value(f"DAQC{c.crate}_{suffix}")) is not None
                },
            )
            for c in self.system.crates
        ]
        return SystemStatus(
            operator=self.read_status(),
            globals_endpoint=self.globals_endpoint,
            globals=self._globals_link().snapshot(GLOBAL_PVS),
            crates=crates,
        )

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        for child in self._children.values():
            child.poll()

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
        self._watch_all()
        problem = self._wait_globals()
        elsewhere = None if problem else self._globals_now()
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
        missing = yield from self._each_crate(crates, CRATE_READY, self._ready_check, timeout)
        if missing:
            yield Progress(TIMEOUT, f"not ready within {timeout:g} s: {_listed(missing)}")
            return
        now = self._globals_now()
        if now is None:
            yield Progress(
                TIMEOUT,
                f"the global run-control records stopped answering ({self.globals_endpoint})",
            )
            return
        number, skipped = now[1] + 1, ""
        if self.receiver_command:
            number, skipped = self._free_run_number(crates, number)
        name = run_name(number)
        failure = self._put_globals(("Online_CS_RunNumber", number), ("Online_CS_SaveData", 1))
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
        self._save(status)  # from here on, end_run can cancel whatever was started
        if self.receiver_command:
            problem = yield from self._start_receivers(crates, status)
            if problem:
                for receiver in status.receivers:
                    self._signal(receiver, signal.SIGTERM)
                exits, _late = yield from self._finish_receivers(status.receivers, set())
                message = f"{problem}; run {number} abandoned, STOP{self._clear_unstarted(status)}"
                self._log_unstarted(status, RESULT_ERROR, exits, message)
                self._save(self._stopped())
                yield Progress(ERROR, message)
                return
        yield Progress(DONE, f"READY: run {number} ({name}); begin_run starts it")

    def _free_run_number(self, crates: Sequence[CrateConfig], first: int) -> tuple[int, str]:
        """The first run number from ``first`` on whose run directory is free for every crate
        (nothing is ever overwritten), and a note naming the numbers skipped."""
        used: set[int] = set()
        for crate in crates:
            used |= used_run_numbers(self.data_dir / f"crate{crate.crate}")
        number = first
        while number in used:
            number += 1
        if number == first:
            return number, ""
        names = (
            run_name(first) if number == first + 1 else f"{run_name(first)}..{run_name(number - 1)}"
        )
        return number, f"; skipped {names} (run directory in use in {self.data_dir})"

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
        self._watch_all()
        problem = self._wait_globals()
        if problem:
            yield Progress(TIMEOUT, problem)
            return
        start = now_text()
        failure = self._put_globals(("Online_CS_StartStop", START))
        if failure:
            yield Progress(ERROR, failure)
            return
        status.state, status.start = RunState.RUN, start
        self._save(status)
        missing = yield from self._each_crate(crates, CRATE_RUNNING, self._running_check, timeout)
        if missing:
            yield Progress(
                TIMEOUT,
                f"not running within {timeout:g} s: {_listed(missing)}; the run is started "
                "(RUN), end_run stops it",
            )
            return
        dead = [
            f"crate {r.crate} receiver exited with {code} (log {r.log})"
            for r in status.receivers
            if (code := self._receiver_exit(r)) is not None
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
        adopted = status.state is RunState.STOP
        if adopted:
            self._watch_all()
            now = None if self._wait_globals(connect_by) else self._globals_now()
            if now is None or not now[0]:
                iocs = (
                    f"the global run-control records do not answer on {self.globals_endpoint}"
                    if now is None
                    else "the IOCs show Online_CS_StartStop = Stop"
                )
                yield Progress(
                    REFUSED,
                    f"end_run refused: no run is prepared or running (STOP in "
                    f"{self.control_dir}, and {iocs})",
                )
                return
            status = self._run_of_the_iocs(now[1])
        crates = self._crates_of(status)
        yield Progress(
            ACKNOWLEDGED,
            f"end run {status.run}: StartStop = Stop" + (f"; {ELSEWHERE_NOTE}" if adopted else ""),
        )
        self._watch_all()
        problem = self._wait_globals(connect_by)
        failure = problem or self._put_globals(("Online_CS_StartStop", 0))
        if failure and not force:
            yield Progress(
                TIMEOUT if problem else ERROR,
                f"{failure}; still RUN (end_run with force, `dgs-run stop --force`, ends the "
                "recorded run without the IOCs)",
            )
            return
        stop = now_text()
        # Forced: crates that do not answer, or that never got the Stop, cannot drain.
        unreachable = self._unreachable_crates(crates, connect_by) if force else {}
        drain = [] if failure else [c for c in crates if c.crate not in unreachable]
        gone = {"globals": failure} if failure else {}
        gone |= {f"crate {crate}": why for crate, why in unreachable.items()}
        missing = yield from self._each_crate(drain, CRATE_DRAINED, self._drained_check, timeout)
        stop_now = set(missing) | {c.crate for c in crates if c not in drain}
        exits, late = yield from self._finish_receivers(status.receivers, stop_now)
        sent, losses = self._final_counts(crates)
        for crate in crates:
            if (loss := losses.get(crate.crate)) is not None and (loss or loss.superseded):
                yield Progress(
                    DATA_LOST,
                    f"crate {crate.crate} lost {losses[crate.crate].describe()}",
                    crate.crate,
                )
        problem = ""
        if missing:
            problem = f"not drained within {timeout:g} s: {_listed(missing)}"
        elif late:
            problem = (
                f"receivers still running after {self.timeouts.receivers_s:g} s were stopped: "
                + ", ".join(f"crate {crate}" for crate in sorted(late))
            )
        failed = [f"crate {crate} ({code})" for crate, code in exits.items() if code != 0]
        if gone:
            result = RESULT_FORCED
        elif problem:
            result = RESULT_TIMEOUT
        elif failed:
            result = RESULT_ERROR
        elif any(losses.values()):
            result = RESULT_LOST
        else:
            result = RESULT_OK
        forced = "did not answer: " + "; ".join(f"{who}: {why}" for who, why in gone.items())
        message = "; ".join(
            text
            for text in (
                forced if gone else "",
                problem,
                ELSEWHERE_NOTE if adopted else "",
            )
            if text
        )
        record = self._log_run(status, stop, exits, sent, losses, result, message)
        self._save(self._stopped())
        ended = f"run {status.run} ended" + (
            f" after {record.duration_s:.1f} s" if record.duration_s is not None else ""
        )
        if result == RESULT_FORCED:
            yield Progress(
                DONE, f"STOP: {ended} by force ({forced}); receivers stopped, logged as forced"
            )
        elif problem:
            yield Progress(TIMEOUT, f"{problem}; run {status.run} logged, STOP")
        elif failed:
            yield Progress(
                ERROR, f"receivers failed: {', '.join(failed)}; run {status.run} logged, STOP"
            )
        else:
            total = sum(sent.values()) / MIB
            summary = f"STOP: {ended}, {len(crates)} crate(s), {total:.1f} MiB sent"
            if result == RESULT_LOST:
                lost = ", ".join(
                    f"crate {crate}: {loss.describe()}" for crate, loss in losses.items() if loss
                )
                yield Progress(LOST, f"{summary}; DATA LOST: {lost}")
            else:
                yield Progress(DONE, summary)

    def _cancel(self, status: RunStatus) -> Iterator[Progress]:
        yield Progress(ACKNOWLEDGED, f"cancel run {status.run}: it was prepared, never started")
        for receiver in status.receivers:
            self._signal(receiver, signal.SIGTERM)
        exits, _late = yield from self._finish_receivers(status.receivers, set())
        kept = self._clear_unstarted(status)
        self._log_unstarted(status, RESULT_CANCELLED, exits, kept.removeprefix("; "))
        self._save(self._stopped())
        yield Progress(DONE, f"STOP: run {status.run} cancelled before it began{kept}")

    def _clear_unstarted(self, status: RunStatus) -> str:
        """Remove the run directories the receivers of a run that never began created, unless
        they hold data; a note naming the ones kept, or ""."""
        kept = [r.run_dir for r in status.receivers if not remove_unused_run_dir(Path(r.run_dir))]
        return f"; kept {', '.join(kept)}: they hold data" if kept else ""

    def _globals_now(self) -> tuple[bool, int] | None:
        """(StartStop = Start, RunNumber) as the global records show them now, or None
        while they do not answer."""
        values = self._globals_link().snapshot(GLOBAL_PVS)
        if len(values) < len(GLOBAL_PVS):
            return None
        return values["Online_CS_StartStop"] == START, int(values["Online_CS_RunNumber"])

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

    def _unreachable_crates(self, crates: Sequence[CrateConfig],
                            deadline: float) -> dict[str, str]:
        """Crate -> why, for crates whose IOC does not answer by ``deadline`` (monotonic)."""
        while time.monotonic() < deadline and any(self._crate_values(c) is None for c in crates):
            time.sleep(POLL_S)
        return {c.crate: self._unreachable(c) for c in crates if self._crate_values(c) is None}

    # -- waiting for crates -------------------------------------------------

    def _each_crate(
        self,
        crates: Sequence[CrateConfig],
        kind: str,
        check: Callable[[CrateConfig], tuple[bool, str]],
        timeout: float,
    ) -> Generator[Progress, None, dict[str, str]]:
        """Yield ``kind`` for each crate as ``check`` passes; return crate -> what it
        still lacked at the deadline (empty when all passed)."""
        pending = list(crates)
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for crate in list(pending):
                passed, text = check(crate)
                if passed:
                    pending.remove(crate)
                    yield Progress(kind, f"crate {crate.crate} {text}", crate.crate)
                else:
                    reasons[crate.crate] = text
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        return {c.crate: reasons[c.crate] for c in pending}

    def _crate_values(self, crate: CrateConfig) -> dict[str, Any] | None:
        link = self._crate_link(crate)
        names = [f"DAQC{crate.crate}_{suffix}" for suffix in CRATE_PVS]
        values = link.snapshot(names)
        if len(values) < len(names):
            return None
        return {suffix: values[name] for suffix, name in zip(CRATE_PVS, names)}

    def _unreachable(self, crate: CrateConfig) -> str:
        return (
            f"its IOC does not answer on {crate_endpoint(crate)} (PVA); is "
            f"`dgs-ioc --crate {crate.crate}` running?"
        )

    def _ready_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self._crate_values(crate)
        if values is None:
            return False, self._unreachable(crate)
        state = values["CV_State"]
        avail, total = int(values["CV_BuffersAvail"]), int(values["CV_BuffersTotal"])
        problems = []
        if state != STATE_STOPPED:
            problems.append(f"state {choice('CV_State', state)} (needs Stopped)")
        if avail != total:
            problems.append(f"pool {avail}/{total} free (needs whole)")
        if not int(values["CV_BuffersOK"]):
            problems.append("buffer accounting shows a leak")
        if not int(values["CV_GlobalsConnected"]):
            problems.append("its globals are disconnected")
        if problems:
            return False, ", ".join(problems)
        return True, f"ready: Stopped, pool {avail}/{total}, globals connected"

    def _running_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self._crate_values(crate)
        if values is None:
            return False, self._unreachable(crate)
        state = int(values["CV_State"])
        if state == STATE_RUNNING:
            return True, "running"
        if state == STATE_NO_BOARDS:
            return True, "running with no boards enabled"
        return False, f"state {choice('CV_State', state)} (needs Running)"

    def _drained_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self._crate_values(crate)
        if values is None:
            return False, self._unreachable(crate)
        state = values["CV_State"]
        if state != STATE_STOPPED:
            return False, f"state {choice('CV_State', state)} (needs Stopped)"
        return True, f"drained: Stopped, {float(values['CV_SenderBytes']):.1f} MiB sent so far"

    # -- receivers ----------------------------------------------------------

    def _start_receivers(
        self, crates: Sequence[CrateConfig], status: RunStatus
    ) -> Generator[Progress, None, str]:
        """Start one receiver per crate; yield receiver-started as each is up (its begin
        PV snapshot is saved, so it shows the set-up before Start, and it is trying to
        connect). Return a problem, or ""."""
        for crate in crates:
            try:
                status.receivers.append(self._start_receiver(crate, status))
            except OSError as err:
                return f"crate {crate.crate}: cannot start a receiver: {err}"
            self._save(status)
        pending = list(status.receivers)
        deadline = time.monotonic() + self.timeouts.receiver_ready_s
        while pending:
            for receiver in list(pending):
                crate = self.system.crate(receiver.crate)
                run_dir = Path(receiver.run_dir)
                if (run_dir / f"{run_dir.name}.{BEGIN_SNAPSHOT}.json").is_file():
                    pending.remove(receiver)
                    yield Progress(
                        RECEIVER_STARTED,
                        f"crate {crate.crate} receiver (pid {receiver.pid}) waits for "
                        f"{crate.host}:{crate.data_port}, files in {receiver.run_dir}",
                        crate.crate,
                    )
                elif (code := self._receiver_exit(receiver)) is not None:
                    return (
                        f"crate {crate.crate} receiver exited with {code} before it was up "
                        f"(log {receiver.log})"
                    )
            if pending and time.monotonic() > deadline:
                late = ", ".join(f"crate {r.crate} (log {r.log})" for r in pending)
                return f"receivers not up within {self.timeouts.receiver_ready_s:g} s: {late}"
            time.sleep(POLL_S)
        return ""

    def _run_dir(self, crate: CrateConfig, name: str) -> Path:
        return self.data_dir / f"crate{crate.crate}" / name

    def _start_receiver(self, crate: CrateConfig, status: RunStatus) -> ReceiverProcess:
        assert status.run is not None and status.name is not None
        name = status.name
        if crate.data_port == 0:
            raise OSError(f"crate {crate.crate} has data_port 0: a receiver cannot find it")
        logs = self.control_dir / RECEIVER_DIR
        logs.mkdir(parents=True, exist_ok=True)
        out = self.data_dir / f"crate{crate.crate}"
        out.mkdir(parents=True, exist_ok=True)
        stem = logs / f"{name}-crate{crate.crate}"
        exit_file = stem.with_suffix(".exit")
        exit_file.unlink(missing_ok=True)
        log_path = stem.with_suffix(".log")
        assert self.receiver_command is not None
        command = [
            sys.executable,
            "-m",
            MARKER,
            "--exit-file",
            str(exit_file),
            "--",
            *self.receiver_command,
            "--out",
            str(out),
            "--run",
            str(status.run),
            "--crate",
            crate.crate,
            "--pv-pva",
            str(crate_endpoint(crate)),
            "--connect-timeout",
            f"{self.timeouts.receiver_connect_s:g}",
            "--status",
            "plain",
            *(
                option
                for board in crate.boards
                if board.kind is BoardKind.TRIGGER_MASTER
                for option in ("--trigger-board", str(board.package_data))
            ),
            f"{crate.host}:{crate.data_port}",
        ]
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `dgs-run start` and its terminal
            )
        self._children[child.pid] = child
        return ReceiverProcess(
            crate.crate, child.pid, str(exit_file), str(log_path), str(out / name)
        )

    def _alive(self, receiver: ReceiverProcess) -> bool:
        child = self._children.get(receiver.pid)
        if child is not None:
            return child.poll() is None
        try:
            command = Path(f"/proc/{receiver.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return MARKER.encode() in command and receiver.exit_file.encode() in command

    def _receiver_exit(self, receiver: ReceiverProcess) -> int | None:
        """Its exit code once it ended; -1 when it vanished without one; None while running."""
        code = read_exit_file(Path(receiver.exit_file))
        if code is None and not self._alive(receiver):
            code = read_exit_file(Path(receiver.exit_file))
            return -1 if code is None else code
        return code

    def _signal(self, receiver: ReceiverProcess, sig: int) -> None:
        if self._alive(receiver):
            with contextlib.suppress(ProcessLookupError):
                os.kill(receiver.pid, sig)

    def _finish_receivers(
        self, receivers: Sequence[ReceiverProcess], stop_now: set[str]
    ) -> Generator[Progress, None, tuple[dict[str, int | None], set[str]]]:
        """Yield receiver-finished as each receiver exits; return (crate -> exit code,
        None if it had to be killed; crates whose receiver overran the timeout).

        Receivers of ``stop_now`` crates are stopped at once (their crate will send
        nothing more); the others get the receivers timeout, then SIGTERM, then
        SIGKILL after a grace period."""
        exits: dict[str, int | None] = {}
        stopped = set(stop_now)
        late: set[str] = set()
        for receiver in receivers:
            if receiver.crate in stopped:
                self._signal(receiver, signal.SIGTERM)
        pending = list(receivers)
        deadline = time.monotonic() + self.timeouts.receivers_s
        while pending:
            for receiver in list(pending):
                code = self._receiver_exit(receiver)
                if code is not None:
                    pending.remove(receiver)
                    exits[receiver.crate] = code
                    yield self._receiver_finished(receiver, code, receiver.crate in stopped)
            now = time.monotonic()
            if pending and now > deadline + TERM_GRACE_S:
                break
            if pending and now > deadline and not late:
                late = {r.crate for r in pending}
                stopped |= late
                for receiver in pending:
                    self._signal(receiver, signal.SIGTERM)
            time.sleep(POLL_S)
        for receiver in pending:
            self._signal(receiver, signal.SIGKILL)
            exits[receiver.crate] = None
        return exits, late

    def _receiver_finished(self, receiver: ReceiverProcess, code: int, stopped: bool) -> Progress:
        files, nbytes = _dir_usage(Path(receiver.run_dir))
        how = " (stopped by the operator)" if stopped else ""
        log = "" if code == 0 else f"; log {receiver.log}"
        return Progress(
            RECEIVER_FINISHED,
            f"crate {receiver.crate} receiver exited with {code}{how}: {files} file(s), "
            f"{nbytes / MIB:.1f} MiB in {receiver.run_dir}{log}",
            receiver.crate,
        )

    # -- the run log --------------------------------------------------------

    def _log_run(
        self,
        status: RunStatus,
        stop: str,
        exits: dict[str, int | None],
        sent: dict[str, int],
        losses: dict[str, Loss],
        result: str,
        message: str,
    ) -> RunRecord:
        """Append the run to the log: bytes sent, written and lost per crate, the result."""
        by_crate = {}
        for crate in status.crates:
            run_dir = self._run_dir_of(status, crate)
            files, nbytes = _dir_usage(run_dir)
            received, records = _receiver_summary(run_dir)
            loss = losses.get(crate)
            by_crate[crate] = CrateRecord(
                sender_bytes=sent.get(crate),
                received_bytes=received,
                records=records,
                file_bytes=nbytes,
                files=files,
                receiver_exit=exits.get(crate),
                lost_bytes=dict(loss.bytes) if loss is not None else None,
                lost_events=dict(loss.events) if loss is not None else None,
            )
        record = RunRecord(
            run=status.run or 0,
            name=status.name or "",
            result=result,
            prepared=status.prepared or stop,
            start=status.start,
            stop=stop,
            data_dir=status.data_dir,
            crates=by_crate,
            message=message,
        )
        self.run_log.append(record)
        return record

    def _log_unstarted(
        self, status: RunStatus, result: str, exits: dict[str, int | None], message: str
    ) -> None:
        """Log a run that got its number but never started (cancelled or failed)."""
        self.run_log.append(
            RunRecord(
                run=status.run or 0,
                name=status.name or "",
                result=result,
                prepared=status.prepared or now_text(),
                start=None,
                stop=now_text(),
                data_dir=status.data_dir,
                crates={c: CrateRecord(receiver_exit=exits.get(c)) for c in status.crates},
                message=message,
            )
        )

    def _run_dir_of(self, status: RunStatus, crate: str) -> Path:
        for receiver in status.receivers:
            if receiver.crate == crate:
                return Path(receiver.run_dir)
        return Path(status.data_dir) / f"crate{crate}" / (status.name or "")

    def _final_counts(
        self, crates: Sequence[CrateConfig]
    ) -> tuple[dict[str, int], dict[str, Loss]]:
        """Bytes sent (``_CV_SenderBytes``) and losses by reason per crate after delivery
        ended: the pool is whole again, and one publish period has passed so the last
        counts are out. Crates that do not answer, or count no losses, are left out."""
        deadline = time.monotonic() + self.timeouts.connect_s
        while time.monotonic() < deadline:
            values = [self._crate_values(c) for c in crates]
            if all(
                v is None or int(v["CV_BuffersAvail"]) == int(v["CV_BuffersTotal"]) for v in values
            ):
                break
            time.sleep(POLL_S)
        time.sleep(PUBLISH_PERIOD_S + 0.1)
        sent: dict[str, int] = {}
        losses: dict[str, Loss] = {}
        for crate in crates:
            if self._crate_values(crate) is None:
                continue
            prefix = f"DAQC{crate.crate}_"
            read = self._crate_link(crate).get_many(
                [prefix + suffix for suffix in ("CV_SenderBytes", *LOSS_PVS)], FINAL_READ_S
            )
            values = {name.removeprefix(prefix): value for name, value in read.items()}
            if "CV_SenderBytes" in values:
                sent[crate.crate] = round(float(values["CV_SenderBytes"]) * MIB)
            loss = Loss.from_values(values)
            if loss is not None:
                losses[crate.crate] = loss
        return sent, losses

    # -- plumbing -----------------------------------------------------------

    def _exclusive(self, step: Callable[[], Iterator[Progress]]) -> Iterator[Progress]:
        """Run ``step`` holding the system's lock; refuse if another operator holds it."""
        self.control_dir.mkdir(parents=True, exist_ok=True)
        with open(self.control_dir / LOCK_FILE, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield Progress(
                    REFUSED,
                    f"another operator is acting on {self.control_dir} right now; "
                    "try again when it has finished",
                )
                return
            yield from step()

    def _stopped(self) -> RunStatus:
        """STOP, remembering which system this control directory is about."""
        return RunStatus(config=self.system.source, globals_pva=self.globals_pva)

    def _save(self, status: RunStatus) -> None:
        path = self.control_dir / STATE_FILE
        partial_path = path.with_name(path.name + ".partial")
        partial_path.write_text(status.to_json())
        os.replace(partial_path, path)

    def _crates_of(self, status: RunStatus) -> list[CrateConfig]:
        return [self.system.crate(crate) for crate in status.crates]

    def _link(self, endpoint: Endpoint) -> IocLink:
        if endpoint not in self._links:
            self._links[endpoint] = IocLink(endpoint)
        return self._links[endpoint]

    def _crate_link(self, crate: CrateConfig) -> IocLink:
        return self._link(crate_endpoint(crate))

    def _globals_link(self) -> IocLink:
        return self._link(self.globals_endpoint)

    def _watch_all(self) -> None:
        self._globals_link().watch(GLOBAL_PVS)
        for crate in self.system.crates:
            self._crate_link(crate).watch(f"DAQC{crate.crate}_{s}" for s in (*CRATE_PVS, *LOSS_PVS))

    def _all_connected(self) -> bool:
        return self._globals_link().has_all(GLOBAL_PVS) and all(
            self._crate_values(c) is not None for c in self.system.crates
        )

    def _losses_connected(self) -> bool:
        return all(
            self._crate_link(c).has_all(f"DAQC{c.crate}_{s}" for s in LOSS_PVS)
            for c in self.system.crates
        )

    def _wait_globals(self, deadline: float | None = None) -> str | None:
        """None once the global records answer, else the timeout message (waiting until
        ``deadline``, monotonic, or the connect timeout from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeouts.connect_s
        while not self._globals_link().has_all(GLOBAL_PVS):
            if time.monotonic() > deadline:
                return (
                    f"the global run-control records do not answer on {self.globals_endpoint} "
                    f"(PVA) within {self.timeouts.connect_s:g} s; is the globals IOC "
                    "(dgs-ioc --globals-only) running?"
                )
            time.sleep(POLL_S)
        return None

    def _put_globals(self, *writes: tuple[str, int]) -> str | None:
        """None if every write was accepted, else what went wrong."""
        link = self._globals_link()
        for name, value in writes:
            try:
                link.put(name, value)
            except TimeoutError:
                return f"writing {name} = {value} timed out ({self.globals_endpoint})"
            except RemoteError as err:
                return f"writing {name} = {value} was refused: {err}"
        return None

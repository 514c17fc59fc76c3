"""What run control says and keeps: the run state, the `Progress` responses of a step
(their kinds and order are documented in `runctl.operator`), how long steps wait, the
state file's record of a run, and the system's status as the IOCs show it."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from ioc.pvs import PV_TABLE, Scope
from runctl.ioclink import Endpoint
from runctl.losses import Loss

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
#: How often a waiting step looks again, in seconds.
POLL_S = 0.05


class RunState(enum.Enum):
    STOP = "STOP"
    READY = "READY"
    RUN = "RUN"


@dataclass(frozen=True)
class Progress:
    """One response of a run-control step (`runctl.operator`: kinds and order)."""

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


#: The waits of an `Operator` not told otherwise.
DEFAULT_TIMEOUTS = Timeouts()


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
    #: Crates begin_run did not see Running (a crate refuses a run whose data port it
    #: cannot bind): end_run stops their receivers at once if they still have not run.
    not_running: list[str] = field(default_factory=list)

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

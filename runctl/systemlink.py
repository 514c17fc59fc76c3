"""A system's IOCs as run control sees them: the global run-control records and every
crate's state over PV Access (one `IocLink` per endpoint), what a crate's state says
about a step (ready, running, drained), and the counts a run ends with."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from p4p.client.thread import RemoteError

from ioc.config import CrateConfig, SystemConfig
from runctl.ioclink import Endpoint, IocLink, crate_endpoint, quiet_pvxs
from runctl.losses import LOSS_PVS, MIB, Loss
from runctl.runstate import (
    CRATE_PVS,
    GLOBAL_PVS,
    POLL_S,
    START,
    STATE_NO_BOARDS,
    STATE_RUNNING,
    STATE_STOPPED,
    CrateStatus,
    Progress,
    Timeouts,
    choice,
)

#: How much longer `status` waits for the loss counters once the rest answers.
LOSS_CONNECT_S = 1.0
#: The IOC publishes statistics every 0.5 s.
PUBLISH_PERIOD_S = 0.5
#: How long the end-of-run counts may take to read.
FINAL_READ_S = 2.0

#: What a crate check says: whether the crate passed, and what it is or still lacks.
CrateCheck = Callable[[CrateConfig], tuple[bool, str]]


class SystemLink:
    """The globals and crates of one system, watched over PVA."""

    def __init__(self, system: SystemConfig, globals_endpoint: Endpoint, timeouts: Timeouts):
        self.system = system
        self.globals_endpoint = globals_endpoint
        self.timeouts = timeouts
        self._links: dict[Endpoint, IocLink] = {}
        quiet_pvxs()

    def _link(self, endpoint: Endpoint) -> IocLink:
        if endpoint not in self._links:
            self._links[endpoint] = IocLink(endpoint)
        return self._links[endpoint]

    def _crate_link(self, crate: CrateConfig) -> IocLink:
        return self._link(crate_endpoint(crate))

    def _globals_link(self) -> IocLink:
        return self._link(self.globals_endpoint)

    def watch_all(self) -> None:
        self._globals_link().watch(GLOBAL_PVS)
        for crate in self.system.crates:
            self._crate_link(crate).watch(f"DAQC{crate.crate}_{s}" for s in (*CRATE_PVS, *LOSS_PVS))

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()

    # -- status -------------------------------------------------------------

    def wait_connected(self, timeout: float) -> None:
        """Watch everything and wait at most ``timeout`` for every IOC to answer."""
        self.watch_all()
        deadline = time.monotonic() + timeout
        while not self._all_connected() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        # Loss counters connect with the rest; an IOC that has none must not hold us long.
        deadline = min(deadline, time.monotonic() + LOSS_CONNECT_S)
        while not self._losses_connected() and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _all_connected(self) -> bool:
        return self._globals_link().has_all(GLOBAL_PVS) and all(
            self.crate_values(c) is not None for c in self.system.crates
        )

    def _losses_connected(self) -> bool:
        return all(
            self._crate_link(c).has_all(f"DAQC{c.crate}_{s}" for s in LOSS_PVS)
            for c in self.system.crates
        )

    def crate_statuses(self) -> list[CrateStatus]:
        """Every crate's watched values, as far as they answer."""
        return [
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

    # -- the global records -------------------------------------------------

    def globals_values(self) -> dict[str, Any]:
        return self._globals_link().snapshot(GLOBAL_PVS)

    def globals_now(self) -> tuple[bool, int] | None:
        """(StartStop = Start, RunNumber) as the global records show them now, or None
        while they do not answer."""
        values = self.globals_values()
        if len(values) < len(GLOBAL_PVS):
            return None
        return values["Online_CS_StartStop"] == START, int(values["Online_CS_RunNumber"])

    def wait_globals(self, deadline: float | None = None) -> str | None:
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

    def put_globals(self, *writes: tuple[str, int]) -> str | None:
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

    # -- waiting for crates -------------------------------------------------

    def each_crate(
        self,
        crates: Sequence[CrateConfig],
        kind: str,
        check: CrateCheck,
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

    def crate_values(self, crate: CrateConfig) -> dict[str, Any] | None:
        """The crate's CRATE_PVS by suffix, or None while any of them does not answer."""
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

    def unreachable_crates(self, crates: Sequence[CrateConfig], deadline: float) -> dict[str, str]:
        """Crate -> why, for crates whose IOC does not answer by ``deadline`` (monotonic)."""
        while time.monotonic() < deadline and any(self.crate_values(c) is None for c in crates):
            time.sleep(POLL_S)
        return {c.crate: self._unreachable(c) for c in crates if self.crate_values(c) is None}

    def ready_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self.crate_values(crate)
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

    def running_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self.crate_values(crate)
        if values is None:
            return False, self._unreachable(crate)
        state = int(values["CV_State"])
        if state == STATE_RUNNING:
            return True, "running"
        if state == STATE_NO_BOARDS:
            return True, "running with no boards enabled"
        return False, f"state {choice('CV_State', state)} (needs Running)"

    def drained_check(self, crate: CrateConfig) -> tuple[bool, str]:
        values = self.crate_values(crate)
        if values is None:
            return False, self._unreachable(crate)
        state = values["CV_State"]
        if state != STATE_STOPPED:
            return False, f"state {choice('CV_State', state)} (needs Stopped)"
        return True, f"drained: Stopped, {float(values['CV_SenderBytes']):.1f} MiB sent so far"

    # -- the end of a run ---------------------------------------------------

    def never_ran(self, suspects: Sequence[CrateConfig], deadline: float) -> set[str]:
        """Of ``suspects`` (crates the Start did not see Running), those still Stopped with
        no receiver connected: nothing of the run can reach their receivers, so waiting
        for those to finish would only wait out the receivers timeout."""
        if suspects:
            self.unreachable_crates(suspects, deadline)  # waits for their values
        found = set()
        for crate in suspects:
            values = self.crate_values(crate)
            if (values is not None and int(values["CV_State"]) == STATE_STOPPED
                    and not values["CV_SenderClient"]):
                found.add(crate.crate)
        return found

    def final_counts(self, crates: Sequence[CrateConfig]) -> tuple[dict[str, int], dict[str, Loss]]:
        """Bytes sent (``_CV_SenderBytes``) and losses by reason per crate after delivery
        ended: the pool is whole again, and one publish period has passed so the last
        counts are out. Crates that do not answer, or count no losses, are left out."""
        deadline = time.monotonic() + self.timeouts.connect_s
        while time.monotonic() < deadline:
            values = [self.crate_values(c) for c in crates]
            if all(
                v is None or int(v["CV_BuffersAvail"]) == int(v["CV_BuffersTotal"]) for v in values
            ):
                break
            time.sleep(POLL_S)
        time.sleep(PUBLISH_PERIOD_S + 0.1)
        sent: dict[str, int] = {}
        losses: dict[str, Loss] = {}
        for crate in crates:
            if self.crate_values(crate) is None:
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

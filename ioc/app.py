"""Assembles one IOC process: backend, pool, the three stages, records, run control.

`CrateIoc` is a crate read-out (optionally also serving the global run-control
records); `GlobalsIoc` is the small IOC that serves just the globals for a
multi-crate system. EPICS environment variables must be final before this
module is imported (the CA/PVA servers and the CA client read them once).

Whoever serves the globals autosaves them (`ioc.autosave`) and restores them at
start, with one difference: a globals-only IOC restores StartStop = Start, so
the crates following it keep their run through its restart, while a crate that
serves its own globals always boots with Stop: its run ended when the process
did, and an operator restarting it does not expect a new run to begin by itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import epics
from softioc import asyncio_dispatcher, builder, imports, softioc

from ioc import access, backends
from ioc.autosave import AutosaveFile
from ioc.config import CrateConfig, SystemConfig
from ioc.globals_follower import GlobalsFollower
from ioc.inloop import BoardSetup, InLoop
from ioc.losses import LossLedger
from ioc.monitoring import MonitorPublisher, default_calibration
from ioc.outloop import CheckSwitches, OutLoop
from ioc.pool import BUFFER_BYTES, BufferPool
from ioc.publisher import Publisher
from ioc.pvs import DIGITIZERS, PV_TABLE, BoardRef, Instance, Scope, expand
from ioc.records import Records, Rule, table_check
from ioc.register_db import RegisterDatabase
from ioc.register_db import build as build_register_db
from ioc.register_io import RegisterIO
from ioc.runcontrol import CrateState, RunControl
from ioc.sample_filter import SampleFilter
from ioc.sample_port import SamplePort
from ioc.sample_pva import SamplePva, run_conditions
from ioc.sampling import SampleTap
from ioc.sender import Sender
from ioc.simcontrols import SimControls

#: How long a Start waits to read the run number from the globals (else the followed value).
RUN_NUMBER_TIMEOUT_S = 1.0
SHUTDOWN_DRAIN_S = 3.0
#: After the drain, how long SIGTERM/Ctrl-C waits for a connected receiver to take the
#: rest (end-of-run headers last); the sender stops earlier once everything is taken.
SHUTDOWN_DELIVER_S = 2.0
#: Crate set-up records: accepted at any time, used from the next Start on.
SETUP_KEYS = (
    "CS_Ena", "FifoNum", "PackageData",
    "HeaderCheckEnable", "TimestampCheckEnable", "DeepCheckEnable",
)  # fmt: skip

log = logging.getLogger("dgs.ioc")


def _autosave_rules(saved: Callable[[], AutosaveFile]) -> dict[str, Rule]:
    """Put rules of the autosaved global records: a put is accepted once it is saved."""

    def save(inst: Instance, value: Any) -> str | None:
        return saved().save(inst.name, value)

    return {pv.key: save for pv in PV_TABLE if pv.scope is Scope.GLOBAL and pv.autosave}


def _restore_globals(
    system: SystemConfig, name: str, records: Records, *, restore_start: bool
) -> AutosaveFile:
    """Open the autosave file, set the global records to what it holds (before iocInit)
    and say in one log line where it is and what came back. The autosaved records
    all hold integers (enum indices, the run number)."""
    saved = AutosaveFile.open(system.state_directory, name)
    restored, skipped = [], ""
    for inst in records.instances:
        value = saved.saved.get(inst.name)
        if not inst.pv.autosave or value is None:
            continue
        if inst.pv.key == "StartStop" and not restore_start:
            if value:
                skipped = "; StartStop boots Stop: a standalone IOC does not resume a run"
            continue
        problem = table_check(inst.pv, value) if isinstance(value, int) else "not an integer"
        if problem:
            log.warning("autosaved %s = %r not restored: %s", inst.name, value, problem)
            continue
        records.publish(inst.pv.key, value)
        shown = inst.pv.enums[int(value)] if inst.pv.enums else value
        restored.append(f"{inst.name} = {shown}")
    saved.start(
        {inst.name: records.get(inst.pv.key) for inst in records.instances if inst.pv.autosave}
    )
    what = "restored " + ", ".join(restored) if restored else "nothing saved yet"
    log.info("autosave file %s: %s%s", saved.path, what, skipped)
    return saved


def _no_memory_lock() -> None:
    """Keep iocInit from locking the whole address space into RAM.

    With real-time scheduling available (root), EPICS calls mlockall at
    iocInit, which makes every mapping resident: about 500 MB for this IOC
    instead of about 270 MB. The read-out does not need it (its pool is
    preallocated and touched once), and a shared DAQ host does not want it.
    """
    ctypes.c_int.in_dll(imports.dbCore, "dbThreadRealtimeLock").value = 0


def _other_crates(system: SystemConfig, crate: CrateConfig | None) -> tuple[str, ...]:
    """Name prefixes of the records other crate IOCs of the system serve from the register
    map (the globals' fan-outs link to them): their crate-level and board records."""
    return tuple(
        f"VME{other.crate}:{owner}:"
        for other in system.crates
        if crate is None or other.crate != crate.crate
        for owner in ("GLBL", *(board.name for board in other.boards))
    )


def _register_database(
    system: SystemConfig, records: Records, crate: CrateConfig | None, *, with_globals: bool
) -> RegisterDatabase:
    """The original IOCs' records this IOC serves besides its own table (ioc/register_db.py)."""
    database = build_register_db(
        crate.crate if crate else "",
        [(b.name, b.kind) for b in sorted(crate.boards, key=lambda b: b.card)] if crate else [],
        with_crate=crate is not None,
        with_globals=with_globals,
        already_served=[inst.name for inst in records.instances],
        remote_prefixes=_other_crates(system, crate),
    )
    return database


def load_into_ioc(database: RegisterDatabase) -> None:
    """Load the register-map records into EPICS (before iocInit) through a private file."""
    log.info("register map: %d records besides the IOC's own", len(database.records))
    fd, name = tempfile.mkstemp(prefix="dgs-registers-", suffix=".db")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(database.text())
        softioc.dbLoadDatabase(name)
    finally:
        os.unlink(name)


class CrateIoc:
    """One crate read-out IOC."""

    def __init__(self, system: SystemConfig, crate: CrateConfig) -> None:
        self.system = system
        self.crate_config = crate
        self.crate_id = crate.crate
        self.serve_globals = system.globals == "local"
        self.pool = BufferPool()
        self.losses = LossLedger()
        self.backend = backends.build(crate)
        #: The simulator's own records and hooks, when the backend is the simulator.
        self.sim: SimControls | None = None
        if backends.simulated(self.backend):
            self.sim = SimControls(
                self.backend,
                return_to=lambda key, value, **where: self.records.return_to(key, value, **where),
                running=lambda: self.runcontrol.state is CrateState.RUNNING,
                enabled_cards=lambda: self.inloop.enabled_cards(),
            )
        self.boards_by_name = {b.identity.name: b for b in self.backend.boards}
        self.board_configs = {b.name: b for b in crate.boards}
        self.inloop = InLoop(
            self.backend,
            self.pool,
            crate.inloop,
            self._sample_setup,
            on_state=lambda state: self.runcontrol.inloop_state_changed(state),
        )
        self.outloop = OutLoop(
            self.pool,
            on_flushed=lambda: self.runcontrol.outloop_flushed(),
            losses=self.losses,
            retain_bytes=crate.sender.retain_mib * BUFFER_BYTES,
        )
        self.sampling = SampleTap(crate.sample_queue_events)
        self.outloop.tap = self.sampling.offer
        self.sample_port = SamplePort(
            self.sampling, crate.data_bind, crate.sample_port,
            default_filter=SampleFilter.parse(crate.sample_filter),
            max_reply_bytes=crate.sender.max_reply_bytes, idle_wait_s=crate.sender.idle_wait_s,
            allowed=crate.allowed_receivers,
        )
        self.sample_pva = SamplePva(
            self.sampling, crate.crate, crate.sample_pva_port,
            publish=lambda key, value: self.records.publish(key, value),
        )
        self.sender = Sender(
            self.pool,
            crate.sender,
            crate.data_bind,
            crate.data_port,
            losses=self.losses,
            crate=int(crate.crate),
            allowed=crate.allowed_receivers,
            crate_state=lambda: int(self.runcontrol.state),
        )
        self.globals = GlobalsFollower()
        self.runcontrol = RunControl(
            inloop=self.inloop,
            outloop=self.outloop,
            sender=self.sender,
            reset_accounting=self.sim.reset_accounting if self.sim else lambda: None,
            sample_setup=self._sample_switches,
            on_state=self._state_changed,
            on_connection=lambda ok: self.records.publish("GlobalsConnected", int(ok)),
            losses=self.losses,
            run_boards=self._enabled_package_data,
            read_run_number=lambda: self.globals.read_run_number(RUN_NUMBER_TIMEOUT_S),
        )
        refs = tuple(BoardRef(b.name, b.kind) for b in crate.boards)
        self.records = Records(
            expand(self.crate_id, refs, with_globals=self.serve_globals, sim=self.sim is not None),
            initial=self._initial_value,
            rules={
                "PackageData": self._unique_package_data,
                **({"SimFault": self.sim.fault_allowed} if self.sim else {}),
                **_autosave_rules(lambda: self._autosave),
            },
            handlers=self._handlers(),
            lengths={"Spectrum": crate.spectrum_bins},
        )
        digitizer_cards = {b.name: b.card for b in crate.boards if b.kind in DIGITIZERS}
        self.publisher = Publisher(
            self.records, self.pool, self.inloop, self.outloop, self.sender,
            self.sim.boards if self.sim else {}, self.losses,
            MonitorPublisher(
                self.records, self.outloop.spectra, digitizer_cards, crate.spectrum_bins
            ),
        )
        self._autosave: AutosaveFile | None = None
        #: The board set-up the current (or last) run uses, sampled by inLoop at Start.
        self._run_setup: dict[int, BoardSetup] = {}
        self._register_db: RegisterDatabase | None = _register_database(
            system, self.records, crate, with_globals=self.serve_globals
        )
        self.register_io = RegisterIO(self.boards_by_name, self._register_db.plan)
        try:
            self.backend.wait_ready()
        except Exception as err:  # a backend may fail in any way: say how
            self.backend.close()
            raise backends.BackendError(f"cannot be built: {err}") from err

    # Record set-up.

    def _initial_value(self, inst: Instance) -> Any:
        key = inst.pv.key
        if key == "CrateNum":
            return int(self.crate_id)
        if key == "BuffersTotal":
            return self.pool.size
        if inst.board is None:
            return None
        cfg = self.board_configs[inst.board]
        if key in ("CalGain", "CalOffset"):
            gains, offsets = default_calibration(cfg, simulated=self.sim is not None)
            return (gains if key == "CalGain" else offsets)[inst.index]
        return {
            "CS_Ena": int(cfg.enabled),
            "FifoNum": cfg.fifo_num,
            "PackageData": cfg.package_data,
            **(SimControls.initial_values(cfg) if self.sim else {}),
        }.get(key)

    def _handlers(self) -> dict:
        def setup_changed(_inst: Instance, _value: Any) -> None:
            self._update_pending()

        return {
            **dict.fromkeys(SETUP_KEYS, setup_changed),
            "SpectrumReset": self._reset_spectra,
            **(self.sim.handlers() if self.sim else {}),
        }

    def _reset_spectra(self, inst: Instance, value: Any) -> None:
        """SpectrumReset = Reset: zero the board's spectra and counts, then show Done."""
        if value:
            self.outloop.spectra.reset(self.board_configs[inst.board].card)
            self.records.return_to("SpectrumReset", 0, board=inst.board)

    def _unique_package_data(self, inst: Instance, value: int) -> str | None:
        for name in self.board_configs:
            if name != inst.board and self.records.get("PackageData", board=name) == value:
                return f"package data {value} already used by {name}"
        for other in self.system.crates:
            if other.crate == self.crate_id:
                continue
            for board in other.boards:
                if board.package_data == value:
                    return f"package data {value} used by crate {other.crate} {board.name}"
        return None

    def _sample_setup(self) -> dict[int, BoardSetup]:
        """Run start (inLoop): the board set-up the run uses from now on."""
        self._run_setup = self._current_setup()
        self._update_pending()
        self.sampling.set_run_boards(
            {card: setup.package_data for card, setup in self._run_setup.items()}
        )
        return self._run_setup

    def _current_setup(self) -> dict[int, BoardSetup]:
        """Board set-up as the PVs say now (enables, FIFO, package data)."""
        return {
            cfg.card: BoardSetup(
                enabled=bool(self.records.get("CS_Ena", board=name)),
                fifo_num=int(self.records.get("FifoNum", board=name)),
                package_data=int(self.records.get("PackageData", board=name)),
            )
            for name, cfg in self.board_configs.items()
        }

    def _current_switches(self) -> CheckSwitches:
        return CheckSwitches(
            header=bool(self.records.get("HeaderCheckEnable")),
            timestamp=bool(self.records.get("TimestampCheckEnable")),
            deep=bool(self.records.get("DeepCheckEnable")),
        )

    def _sample_switches(self) -> None:
        """Run start (run control): the check switches the run uses from now on."""
        self.outloop.switches = self._current_switches()

    def _update_pending(self) -> None:
        """Show whether the set-up PVs differ from what the running run uses."""
        pending = self.runcontrol.state is not CrateState.STOPPED and (
            self._current_setup() != self._run_setup
            or self._current_switches() != self.outloop.switches
        )
        self.records.publish("SetupPending", int(pending))

    def _enabled_package_data(self) -> tuple[int, ...]:
        """Board ids of the boards a Start now enables (what a v2 receiver should expect)."""
        setups = self._current_setup().values()
        return tuple(sorted(setup.package_data for setup in setups if setup.enabled))

    def _state_changed(self, state: CrateState) -> None:
        self.records.publish("State", int(state))
        if state is CrateState.RUNNING:
            self.sample_pva.set_run_conditions(run_conditions(self.crate_id, self.records))
        if state is CrateState.STOPPED:
            self.records.publish("SetupPending", 0)
            self.publisher.publish_now()

    # Life cycle.

    def start(self) -> None:
        """Serve the records, start the stages and follow the globals."""
        try:
            self.sender.bind_check()
        except OSError as err:  # taken since the start-up checks: name the port
            raise OSError(
                f"data port {self.sender.port} on {self.crate_config.data_bind}: "
                f"{err.strerror or err}"
            ) from err
        if self.serve_globals:
            self._autosave = _restore_globals(
                self.system, f"DAQC{self.crate_id}", self.records, restore_start=False
            )
        builder.LoadDatabase()
        load_into_ioc(self._register_db)
        self._register_db = None  # loaded: only the plan (register_io) is needed from now on
        self.records.install_put_check()
        access.install(self.system.run_protect, self.records.put_check)
        access.on_write(self.register_io.written)
        epics.ca.initialize_libca()
        _no_memory_lock()
        softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
        self.records.put_check.confirm()
        self.register_io.start()
        self.records.publish("BuffersTotal", self.pool.size)
        self.inloop.start()
        self.outloop.start()
        self.sender.start()
        self.runcontrol.start()
        self.publisher.start()
        self.records.publish("SmpPort", self.sample_port.start())
        self.records.publish("SmpPvaPort", self.sample_pva.start(self.crate_config.data_bind))
        self.sample_pva.set_run_conditions(
            run_conditions(self.crate_id, self.records, source="ioc at start-up, before any run")
        )
        self.globals.follow(self.runcontrol)

    def stop(self) -> None:
        """SIGTERM / Ctrl-C: stop as for Stop, deliver briefly, stop every thread."""
        self.globals.stop()
        self.register_io.shutdown()  # its register polls must not slow the drain below
        self.runcontrol.begin_shutdown()
        self.inloop.shutdown(drain_timeout=SHUTDOWN_DRAIN_S)
        self.runcontrol.wait_stopped(0.5)
        self.sender.shutdown(deliver_timeout=SHUTDOWN_DELIVER_S)
        self.runcontrol.quit()
        self.outloop.shutdown()
        self.publisher.shutdown()
        self.sample_port.shutdown()
        self.sample_pva.shutdown()
        self.backend.close()


class GlobalsIoc:
    """The IOC of a multi-crate system that serves only the global run-control records."""

    def __init__(self, system: SystemConfig) -> None:
        self.system = system
        self._autosave: AutosaveFile | None = None
        self.records = Records(
            expand("", (), with_globals=True, with_crate=False),
            rules=_autosave_rules(lambda: self._autosave),
        )
        self._register_db: RegisterDatabase | None = _register_database(
            system, self.records, None, with_globals=True
        )

    def start(self) -> None:
        """Restore the globals (StartStop included: the crates keep running) and serve them."""
        self._autosave = _restore_globals(self.system, "globals", self.records, restore_start=True)
        builder.LoadDatabase()
        load_into_ioc(self._register_db)
        self._register_db = None
        self.records.install_put_check()
        access.install(self.system.run_protect, self.records.put_check)
        _no_memory_lock()
        softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
        self.records.put_check.confirm()

    def stop(self) -> None:
        """Nothing runs besides the records."""


def wait_for_signal(stop: threading.Event) -> None:
    """Block the main thread until SIGTERM / SIGINT sets ``stop``."""
    while not stop.wait(1.0):
        pass


def exit_process(code: int = 0) -> None:
    """Leave through EPICS so its exit handlers run."""
    os.environ.pop("PYEPICS_LIBCA", None)
    softioc.safeEpicsExit(code)

"""Which `ioc.hardware.Crate` a configured ``backend`` name builds.

``[[crate]] backend`` is one of:

- ``"sim"``: the simulated crate in its own process (`dgs-sim`, `sim.process`), reached
  through a shared-memory window (`sim.attach`). ``[crate] sim_process`` says whether
  the IOC starts that process itself (``"spawn"``, the default) or attaches to one
  started with ``dgs-sim --config FILE`` (``"attach"``, window ``[crate] sim_window``).
- ``"sim-inprocess"``: the same simulator inside the IOC process (unit tests).
- ``"replay"``: recorded run files played back as the boards' FIFO contents
  (`replay/`, settings in ``[crate.replay]``).
- ``"module:Class"``: a class or factory in an importable module (dotted path).
- a name registered under the entry-point group ``dgs_crate_ioc.backends``.

A factory is called with the crate's `ioc.config.CrateConfig` and returns a Crate.
Names are checked while the configuration is read (`problem`), so a bad one stops
start-up with one line before any EPICS server starts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ioc.hardware import Crate

if TYPE_CHECKING:
    from ioc.config import CrateConfig

ENTRY_POINT_GROUP = "dgs_crate_ioc.backends"
SIM_NAMES = ("sim", "sim-inprocess")
REPLAY_NAME = "replay"

Factory = Callable[["CrateConfig"], Crate]


class BackendError(Exception):
    """A backend name that does not lead to a factory; the message says why."""


def _sim_inprocess(crate: CrateConfig) -> Crate:
    from sim import SimCrate
    from sim.specs import board_specs

    return SimCrate(board_specs(crate), seed=crate.seed)


def _sim_process(crate: CrateConfig) -> Crate:
    from sim.attach import ProcessCrate
    from sim.launch import CrateProcess
    from sim.specs import board_specs, window_name

    specs = board_specs(crate)
    if crate.sim_process == "attach":
        return ProcessCrate(specs, window_name(crate))
    spawned = CrateProcess(
        specs, crate.seed, f"dgs-sim-{crate.crate}-ioc{os.getpid()}", crate.sim_realtime_priority
    )
    return ProcessCrate(specs, spawned.name, spawned)  # it starts while the IOC builds


def _replay_crate(crate: CrateConfig) -> Crate:
    from replay import ReplayCrate

    return ReplayCrate(crate)


def _from_module(name: str) -> Factory:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise BackendError(
            'must be "sim", "sim-inprocess", "replay", "module:Class" or an entry point name'
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise BackendError(f"cannot be loaded: module {err.name} not found") from err
    except Exception as err:  # a plug-in's import may fail in any way: say how
        raise BackendError(f"cannot be loaded: importing {module_name} failed: {err}") from err
    factory = getattr(module, attribute, None)
    if factory is None:
        raise BackendError(f"cannot be loaded: module {module_name} has no {attribute}")
    if not callable(factory):
        raise BackendError(f"cannot be loaded: {name} is not a class or factory")
    return factory


def _from_entry_point(name: str) -> Factory:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    if not found:
        raise BackendError(
            'must be "sim", "sim-inprocess", "replay", "module:Class" or a name registered '
            f"under the entry-point group {ENTRY_POINT_GROUP}"
        )
    try:
        return next(iter(found)).load()
    except Exception as err:  # a plug-in's import may fail in any way: say how
        raise BackendError(f"cannot be loaded: entry point {name} failed: {err}") from err


def resolve(name: str) -> Factory:
    """The factory ``name`` designates (BackendError if there is none)."""
    if name == "sim":
        return _sim_process
    if name == "sim-inprocess":
        return _sim_inprocess
    if name == REPLAY_NAME:
        return _replay_crate
    if ":" in name:
        return _from_module(name)
    return _from_entry_point(name)


def problem(name: str) -> str | None:
    """Why ``name`` is not a usable backend, or None (a configuration check)."""
    try:
        resolve(name)
    except BackendError as err:
        return str(err)
    return None


def build(crate: CrateConfig) -> Crate:
    """The crate backend its configuration names (BackendError saying why it cannot be built)."""
    try:
        backend = resolve(crate.backend)(crate)
    except BackendError:
        raise
    except Exception as err:  # a plug-in's constructor may fail in any way: say how
        raise BackendError(f"cannot be built: {err}") from err
    if not isinstance(backend, Crate):
        raise BackendError(f"built a {type(backend).__name__}, not an ioc.hardware.Crate")
    return backend


def simulated(crate: Crate) -> bool:
    """Whether ``crate`` offers the simulator's controls (SIM_* records, fault injection)."""
    from sim import SimCrate
    from sim.attach import ProcessCrate

    return isinstance(crate, SimCrate | ProcessCrate)

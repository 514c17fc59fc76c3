"""The simulator's own records (SIM_*): rates, trace length, header type, faults, counts.

Only a simulated backend offers them (`ioc.backends.simulated`): the in-process
`sim.SimCrate` or a crate process's `sim.attach.ProcessCrate`, whose boards take
the same calls. With any other backend the IOC serves none of these records and
calls none of these hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ioc.config import BoardConfig
from ioc.hardware import BoardKind
from ioc.pvs import Instance
from sim import Fault, SimCrate
from sim.attach import ProcessCrate

#: Faults a trigger board accepts (spec 01: only the last four).
TRIGGER_FAULTS = frozenset({Fault.FIFO_OVERFLOW, Fault.FIFO_UNDERFLOW, Fault.READ_ERROR})

log = logging.getLogger("dgs.ioc")


class SimControls:
    """Connects the SIM_* records to a simulated crate's boards."""

    def __init__(
        self,
        crate: SimCrate | ProcessCrate,
        return_to: Callable[..., None],
        running: Callable[[], bool],
        enabled_cards: Callable[[], set[int]],
    ) -> None:
        self.crate = crate
        self.boards = {board.identity.name: board for board in crate.boards}
        #: Sets a command record back to its idle value after a client's put.
        self._return_to = return_to
        self._running = running
        self._enabled_cards = enabled_cards

    @staticmethod
    def initial_values(cfg: BoardConfig) -> dict[str, Any]:
        """The SIM_* records' start values for one configured board."""
        return {
            "SimEventRate": cfg.sim.event_rate_hz,
            "SimTraceLength": cfg.sim.trace_samples,
            "SimHeaderType": 0 if cfg.sim.header_type == 7 else 1,
        }

    def handlers(self) -> dict[str, Callable[[Instance, Any], None]]:
        boards = self.boards
        return {
            "SimEventRate": lambda inst, v: boards[inst.board].set_event_rate(v),
            "SimTraceLength": lambda inst, v: boards[inst.board].set_trace_length(int(v)),
            "SimHeaderType": lambda inst, v: boards[inst.board].set_header_type(
                7 if int(v) == 0 else 8
            ),
            "SimFault": self._inject_fault,
        }

    def fault_allowed(self, inst: Instance, value: int) -> str | None:
        if value == Fault.NONE:
            return None
        board = self.boards[inst.board]
        if not self._running():
            return "faults are accepted only while a run is active"
        if board.identity.card not in self._enabled_cards():
            return "the board is not enabled in this run"
        if board.identity.kind is BoardKind.TRIGGER_MASTER and Fault(value) not in TRIGGER_FAULTS:
            return "a trigger board accepts only FIFO overflow, underflow and read error"
        return None

    def _inject_fault(self, inst: Instance, value: int) -> None:
        if value != Fault.NONE:
            self.boards[inst.board].inject(Fault(value))
            log.info("injected %s on %s", Fault(value).name, inst.board)
        self._return_to("SimFault", int(Fault.NONE), board=inst.board)

    def reset_accounting(self) -> None:
        """Run start: the generated/dropped/cleared counts start afresh."""
        self.crate.reset_accounting()

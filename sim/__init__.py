"""The simulated VME crate behind `ioc.hardware`: digitizers, a master trigger, faults."""

from sim.board import DEFAULT_FIFO_WORDS, SimBoard, SimBoardSpec
from sim.clock import TICK_NS, TICKS_PER_SECOND, CrateClock, ManualClock, MonotonicClock
from sim.crate import SimCrate, make_board
from sim.digitizer import SimDigitizer
from sim.faults import Fault
from sim.trigger import SimTrigger

__all__ = [
    "DEFAULT_FIFO_WORDS",
    "TICKS_PER_SECOND",
    "TICK_NS",
    "CrateClock",
    "Fault",
    "ManualClock",
    "MonotonicClock",
    "SimBoard",
    "SimBoardSpec",
    "SimCrate",
    "SimDigitizer",
    "SimTrigger",
    "make_board",
]

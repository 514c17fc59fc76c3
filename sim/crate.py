"""A simulated VME crate: its boards, in card order, on one crate clock."""

from __future__ import annotations

from ioc.hardware import Crate
from sim.board import SimBoard, SimBoardSpec
from sim.clock import CrateClock, MonotonicClock
from sim.digitizer import SimDigitizer
from sim.trigger import SimTrigger


def make_board(spec: SimBoardSpec, clock: CrateClock, seed: int) -> SimDigitizer | SimTrigger:
    """The simulated board of ``spec``'s kind."""
    board_class = SimTrigger if spec.kind.is_trigger else SimDigitizer
    return board_class(spec, clock, seed)


class SimCrate(Crate):
    """Simulated boards sharing one clock; each board's randomness comes from (seed, slot)."""

    def __init__(
        self, specs: list[SimBoardSpec], seed: int = 1, clock: CrateClock | None = None
    ) -> None:
        for attribute in ("card", "slot", "package_data"):
            values = [getattr(spec, attribute) for spec in specs]
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                raise ValueError(f"duplicate {attribute} in the simulated crate: {duplicates}")
        self.clock = clock if clock is not None else MonotonicClock()
        self.seed = seed
        self.boards: list[SimBoard] = [
            make_board(spec, self.clock, seed) for spec in sorted(specs, key=lambda s: s.card)
        ]
        self._by_card = {board.identity.card: board for board in self.boards}

    def board(self, card: int) -> SimBoard:
        """The board at card index ``card`` (KeyError if the crate has none there)."""
        return self._by_card[card]

    def clock_origin_ns(self) -> int:
        return self.clock.origin_ns()

    def reset_accounting(self) -> None:
        """Zero every board's event counters; the IOC calls it at run start."""
        for board in self.boards:
            board.reset_accounting()

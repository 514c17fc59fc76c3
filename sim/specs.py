"""A crate configuration as the simulator needs it: board specs and the window name.

Both sides of the crate window derive the same things from the same configuration:
`dgs-sim --config` builds the boards, an attaching IOC finds the window by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ioc.hardware import BoardKind
from sim.board import SimBoardSpec

if TYPE_CHECKING:
    from ioc.config import CrateConfig


def board_specs(crate: CrateConfig) -> list[SimBoardSpec]:
    """One simulated board per configured board, with its ``[crate.board.sim]`` settings."""
    return [
        SimBoardSpec(
            name=b.name,
            kind=b.kind,
            slot=b.slot,
            card=b.card,
            package_data=b.package_data,
            event_rate_hz=b.sim.event_rate_hz,
            trace_samples=b.sim.trace_samples,
            header_type=b.sim.header_type,
            fifo_words=b.sim.fifo_words,
        )
        for b in crate.boards
    ]


def window_name(crate: CrateConfig) -> str:
    """``[crate] sim_window``, else one name per crate and data port."""
    return crate.sim_window or f"dgs-sim-{crate.crate}-{crate.data_port}"


def specs_to_json(specs: list[SimBoardSpec], seed: int) -> dict[str, Any]:
    """What a spawning IOC hands its crate process."""
    boards = [{**spec.__dict__, "kind": spec.kind.value} for spec in specs]
    return {"seed": seed, "boards": boards}


def specs_from_json(data: dict[str, Any]) -> tuple[list[SimBoardSpec], int]:
    boards = [
        SimBoardSpec(**{**board, "kind": BoardKind(board["kind"])}) for board in data["boards"]
    ]
    return boards, int(data["seed"])

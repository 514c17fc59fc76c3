"""A simulated DGS master trigger (board type 4): 16-word packets into one of 16 FIFOs.

Packets go only to the FIFO chosen with `select_fifo` (sampled by the IOC at
run start); the other FIFOs stay empty. Every word holds a 16-bit value in
bits 15:0 (spec 04).
"""

from __future__ import annotations

import numpy as np

from ioc.hardware import MAIN_DATA_FIFO, TRIGGER_FIFOS
from ioc.packets import TRIGGER_MARKER, TRIGGER_WORDS
from sim import registers
from sim.board import SimBoard, SimBoardSpec
from sim.clock import CrateClock
from sim.fifo import Fifo

#: Trigger types a packet can carry, drawn uniformly (2 random bits).
TRIGGER_TYPES = np.array([1, 1, 2, 4], dtype=np.uint32)
#: Value of the user register (word 7).
USER_REGISTER = 0x0000

# Bit fields of the 64 random bits drawn per packet.
_TYPE_BITS = 0  # 2 bits
_MULTIPLICITY_BITS = 2  # 3 bits -> multiplicity 1..8
_MASK_BITS = 8  # 16 bits
_TDC_BITS = 24  # 4 x 8 bits -> TDC counters 0..3
_VERNIER_BITS = 56  # 2 x 4 bits -> verniers


class SimTrigger(SimBoard):
    """The crate's master trigger."""

    CHANNELS = 1
    FIFOS = TRIGGER_FIFOS
    PACKAGE_DATA_REGISTER = registers.TRIGGER_PACKAGE_DATA

    def __init__(self, spec: SimBoardSpec, clock: CrateClock, crate_seed: int) -> None:
        if not spec.kind.is_trigger:
            raise ValueError(f"{spec.name} is a digitizer, not a trigger board")
        self._wheel = 0
        super().__init__(spec, clock, crate_seed)
        self._selected = MAIN_DATA_FIFO

    @property
    def selected_fifo(self) -> int:
        with self._lock:
            return self._selected

    def select_fifo(self, fifo: int) -> None:
        """Route packets arriving from now on to FIFO ``fifo`` (0..15)."""
        self._check_fifo(fifo)
        with self._lock:
            self._catch_up()
            self._selected = fifo

    @staticmethod
    def _check_fifo(fifo: int) -> None:
        if not 0 <= fifo < TRIGGER_FIFOS:
            raise ValueError(f"trigger FIFO index must be 0..{TRIGGER_FIFOS - 1}, not {fifo}")

    def _fifo(self, fifo: int) -> Fifo:
        self._check_fifo(fifo)
        return self._fifos[fifo]

    def _latched(self, timestamp: int) -> None:
        for piece, register in enumerate(registers.TRIGGER_LATCHED_TIMESTAMP):
            self._registers[register] = (timestamp >> (16 * piece)) & 0xFFFF

    def _event_words(self) -> int:
        return TRIGGER_WORDS

    def _write_events(self, block: np.ndarray, ticks: np.ndarray) -> np.ndarray:
        count = ticks.size
        bits = self._content_bits.random_raw(count)

        def field(shift: int, width: int) -> np.ndarray:
            return ((bits >> shift) & ((1 << width) - 1)).astype(np.uint32)

        block[:, 0] = TRIGGER_MARKER
        block[:, 1] = TRIGGER_TYPES[field(_TYPE_BITS, 2)]
        block[:, 2] = (ticks >> 32) & 0xFFFF
        block[:, 3] = (ticks >> 16) & 0xFFFF
        block[:, 4] = ticks & 0xFFFF
        block[:, 5] = (self._wheel + np.arange(count)) & 0xFFFF
        block[:, 6] = field(_MULTIPLICITY_BITS, 3) + 1
        block[:, 7] = USER_REGISTER
        block[:, 8] = (ticks >> 2) & 0xFFFF
        block[:, 9] = field(_MASK_BITS, 16) | 1
        for counter in range(4):
            block[:, 10 + counter] = field(_TDC_BITS + 8 * counter, 8)
        block[:, 14] = field(_VERNIER_BITS, 4) << 8 | field(_VERNIER_BITS + 4, 4)
        block[:, 15] = field(_VERNIER_BITS, 4) << 4 | field(_VERNIER_BITS + 4, 4) << 12
        self._wheel = (self._wheel + count) & 0xFFFF
        return np.zeros(count, dtype=np.uint8)

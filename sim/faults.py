"""The faults a simulated board can be told to produce once (the SIM_Fault PV)."""

from __future__ import annotations

import enum


class Fault(enum.IntEnum):
    """Values match the SIM_Fault enum indices (spec 03) and the fault table (spec 01)."""

    NONE = 0
    BAD_MARKER = 1
    BAD_LENGTH = 2
    TIMESTAMP_REGRESSION = 3
    FIFO_OVERFLOW = 4
    FIFO_UNDERFLOW = 5
    READ_ERROR = 6


#: Faults that corrupt digitizer packets; a trigger board refuses them.
PACKET_FAULTS = frozenset({Fault.BAD_MARKER, Fault.BAD_LENGTH, Fault.TIMESTAMP_REGRESSION})

#: Word 0 of an event hit by `Fault.BAD_MARKER`.
BAD_MARKER_WORD = 0xDEADBEEF
#: Packet length field written by `Fault.BAD_LENGTH` (above outLoop's limit of 510).
BAD_PACKET_LENGTH = 600
#: How far below its channel predecessor a `Fault.TIMESTAMP_REGRESSION` event is stamped.
REGRESSION_TICKS = 100

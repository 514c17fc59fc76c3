"""Replaying a recorded run through the whole chain (``backend = "replay"``).

`recording` finds the files and each board's packets in them, `packets` turns
GEB records and saved replies back into FIFO words, `board` paces them into
the boards' FIFOs, `crate` builds the crate and feeds it.
"""

from replay.crate import ReplayCrate
from replay.packets import RecordingError

__all__ = ["RecordingError", "ReplayCrate"]

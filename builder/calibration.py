"""Energy calibration: digitizer units (ADC counts) to keV, per board and channel.

The file is CSV with the header line ``board,channel,gain,offset``; one line per
board and channel, ``keV = gain × energy + offset``. ``*`` in the board or
channel column matches any (an exact line wins over a wildcard line); blank
lines and lines starting with ``#`` are ignored. Hits no line matches get NaN.

For the simulator (4 ADC counts per keV, sim/spectrum.py) one line does:
``*,*,0.25,0``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WILD = -1
_COLUMNS = ("board", "channel", "gain", "offset")


@dataclass(frozen=True)
class Calibration:
    """Gain and offset by (board, channel); -1 stands for ``*``."""

    lines: dict[tuple[int, int], tuple[float, float]]

    @classmethod
    def from_csv(cls, path: str | Path) -> Calibration:
        lines: dict[tuple[int, int], tuple[float, float]] = {}
        with open(path, encoding="utf-8", newline="") as source:
            rows = [row for row in csv.reader(source)
                    if row and not row[0].lstrip().startswith("#")]
        if not rows or [c.strip().lower() for c in rows[0]] != list(_COLUMNS):
            raise ValueError(f"{path}: the first line must be {','.join(_COLUMNS)}")
        for number, row in enumerate(rows[1:], start=2):
            try:
                board, channel = (_WILD if c.strip() == "*" else int(c, 0) for c in row[:2])
                gain, offset = float(row[2]), float(row[3])
            except (ValueError, IndexError):
                raise ValueError(f"{path}: line {number} is not {','.join(_COLUMNS)}") from None
            if not (math.isfinite(gain) and math.isfinite(offset)):
                raise ValueError(f"{path}: line {number}: gain and offset must be numbers")
            lines[(board, channel)] = (gain, offset)
        return cls(lines)

    def kev(self, hits: np.ndarray) -> np.ndarray:
        """keV of each hit (``float32``; NaN where no line matches)."""
        gain = np.full(hits.size, np.nan, dtype=np.float64)
        offset = np.zeros(hits.size, dtype=np.float64)
        board = hits["board"].astype(np.int64)
        channel = hits["channel"].astype(np.int64)
        # Least specific first, so exact lines overwrite wildcards.
        ordered = sorted(self.lines.items(), key=lambda item: (item[0][0] >= 0, item[0][1] >= 0))
        for (b, c), (g, o) in ordered:
            match = np.ones(hits.size, dtype=bool)
            if b != _WILD:
                match &= board == b
            if c != _WILD:
                match &= channel == c
            gain[match], offset[match] = g, o
        return (gain * hits["energy"] + offset).astype(np.float32)

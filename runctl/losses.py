"""Data a crate lost in a run, by reason, as its IOC counts them.

Per reason R the IOC serves ``DAQC<NN>_OL_Lost<R>`` (MiB lost per card index
0..6 this run) and ``DAQC<NN>_OL_LostEvents<R>`` (events lost per card):

- Memory: discarded because the crate's retention memory was full;
- Check: buffers the checker discarded for a fatal error;
- Unreachable: the run's data no receiver came back for in time;
- InFlight: replies already sent to a receiver that died before it wrote them;
- Superseded: the previous run's undelivered data, dropped by this run's Start.

`dgs-run stop`, `dgs-run status` and the run log report these per crate, as
bytes and events per reason. The buffer-count percentage (``BufLostPerecnt``)
counts buffers, not data, and misses every reason but the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REASONS = ("Memory", "Check", "Unreachable", "InFlight", "Superseded")
MIB = 1 << 20
KIB = 1 << 10


def mib_suffix(reason: str) -> str:
    """The crate PV suffix of MiB lost per card for ``reason``."""
    return f"OL_Lost{reason}"


def events_suffix(reason: str) -> str:
    """The crate PV suffix of events lost per card for ``reason``."""
    return f"OL_LostEvents{reason}"


#: Every loss PV of a crate, as ``DAQC<NN>_`` + suffix.
LOSS_PVS = tuple(s for r in REASONS for s in (mib_suffix(r), events_suffix(r)))


def size_text(nbytes: int) -> str:
    """A byte count people read at a glance: B below 1 KiB, KiB below 1 MiB, then MiB."""
    if nbytes < KIB:
        return f"{nbytes} B"
    if nbytes < MIB:
        return f"{nbytes / KIB:.1f} KiB"
    return f"{nbytes / MIB:.1f} MiB"


def _sum(values: Any) -> float:
    """The sum over cards of one per-card waveform (or a single number)."""
    if isinstance(values, Iterable) and not isinstance(values, str):
        return float(sum(float(v) for v in values))
    return float(values)


@dataclass(frozen=True)
class Loss:
    """What one crate lost in a run: bytes and events per reason (summed over cards)."""

    bytes: Mapping[str, int]
    events: Mapping[str, int]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Loss | None:
        """From crate PV suffix -> per-card values; None unless every loss PV is there
        (an IOC that does not count losses by reason)."""
        if not all(suffix in values for suffix in LOSS_PVS):
            return None
        return cls(
            bytes={r: round(_sum(values[mib_suffix(r)]) * MIB) for r in REASONS},
            events={r: round(_sum(values[events_suffix(r)])) for r in REASONS},
        )

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_events(self) -> int:
        return sum(self.events.values())

    def __bool__(self) -> bool:
        """True when anything at all was lost."""
        return self.total_bytes > 0 or self.total_events > 0

    def describe(self) -> str:
        """``nothing``, or the totals then each reason that lost something, e.g.
        ``33.0 MiB, 72000 events (Memory 33.0 MiB / 72000 events)``."""
        if not self:
            return "nothing"
        reasons = "; ".join(
            f"{r} {size_text(self.bytes[r])} / {self.events[r]} events"
            for r in REASONS
            if self.bytes[r] or self.events[r]
        )
        return f"{size_text(self.total_bytes)}, {self.total_events} events ({reasons})"

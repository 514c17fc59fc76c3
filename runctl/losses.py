"""Data a crate lost in a run, by reason, as its IOC counts them.

Per reason R the IOC serves ``DAQC<NN>_OL_Lost<R>`` (MiB lost per card index
0..6 this run) and ``DAQC<NN>_OL_LostEvents<R>`` (events lost per card):

- Memory: the crate's retention memory was full, incoming buffers were discarded;
- Check: a fatal check error discarded a buffer;
- Unreachable: the listener had closed with nobody connected, queued data dropped;
- InFlight: replies in the socket of a classic receiver the crate had to close;
- Superseded: the previous run's undelivered data, dropped by this run's Start.
  They belong to the run before, so they are reported, but are not this run's loss.

`dgs-run stop`, `dgs-run status` and the run log report these per crate, as
bytes and events per reason. The buffer-count percentage (``BufLostPerecnt``)
counts buffers, not data, and misses most reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REASONS = ("Memory", "Check", "Unreachable", "InFlight", "Superseded")
#: The reason that is the previous run's loss, not this one's.
SUPERSEDED = "Superseded"
THIS_RUN = tuple(r for r in REASONS if r != SUPERSEDED)
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
        """This run's loss in bytes (every reason but Superseded)."""
        return sum(self.bytes[r] for r in THIS_RUN)

    @property
    def total_events(self) -> int:
        """This run's loss in events (every reason but Superseded)."""
        return sum(self.events[r] for r in THIS_RUN)

    @property
    def superseded(self) -> bool:
        """Whether this run's Start dropped undelivered data of the run before."""
        return self.bytes[SUPERSEDED] > 0 or self.events[SUPERSEDED] > 0

    def __bool__(self) -> bool:
        """True when this run lost anything."""
        return self.total_bytes > 0 or self.total_events > 0

    def _reason(self, reason: str) -> str:
        return f"{reason} {size_text(self.bytes[reason])} / {self.events[reason]} events"

    def describe(self) -> str:
        """``nothing``, or this run's totals then each reason that lost something, e.g.
        ``33.0 MiB, 72000 events (Memory 33.0 MiB / 72000 events)``; and what the run
        before lost at this Start, if anything."""
        text = "nothing"
        if self:
            reasons = "; ".join(
                self._reason(r) for r in THIS_RUN if self.bytes[r] or self.events[r]
            )
            text = f"{size_text(self.total_bytes)}, {self.total_events} events ({reasons})"
        if self.superseded:
            text += f"; dropped at Start, the run before's: {self._reason(SUPERSEDED)}"
        return text

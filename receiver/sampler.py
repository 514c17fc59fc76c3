"""A client of a crate's sampling service over PV Access (ioc/sample_pva.py).

The service runs on its own PVA port, named in ``DAQC<NN>_SMP_PvaPort``; the
client reaches it by TCP name search, so several IOCs on one host never mix.
`Sampler` attaches a consumer with a filter (``"board=101 ch=0-3
prescale=100"``), takes batches of events and detaches when closed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from p4p.client.thread import Context
from p4p.nt import NTURI

_ATTACH = NTURI([("op", "s"), ("filter", "s"), ("name", "s")])
_NEXT = NTURI([("op", "s"), ("id", "i"), ("max", "i"), ("timeout", "d")])
_DETACH = NTURI([("op", "s"), ("id", "i")])
#: The fields of a batch's event table, as numpy arrays.
EVENT_FIELDS = ("board", "channel", "header_type", "event_type", "flags", "timestamp", "energy",
                "trigger_type", "trigger_mask", "multiplicity", "trace_offset", "trace_length")


def context_for(address: str) -> Context:
    """A p4p context that searches only the PVA server at ``address`` (host:port)."""
    conf = {
        "EPICS_PVA_NAME_SERVERS": address,
        "EPICS_PVA_ADDR_LIST": "",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    }
    return Context("pva", conf=conf, useenv=False)


@dataclass
class Batch:
    """Events of one ``next`` call and the consumer's counters after it."""

    events: dict[str, np.ndarray]
    traces: np.ndarray
    delivered: int
    lost: int
    queued: int

    def __len__(self) -> int:
        return int(self.events["board"].size)

    def trace(self, row: int) -> np.ndarray:
        start = int(self.events["trace_offset"][row])
        return self.traces[start : start + int(self.events["trace_length"][row])]


class Sampler:
    """One consumer of a crate's sampling service."""

    def __init__(self, address: str, crate: str, sample_filter: str, name: str = "sampler",
                 timeout: float = 10.0) -> None:
        self.pv = f"DAQC{crate}_SMP_Sample"
        self.timeout = timeout
        self.ctx = context_for(address)
        try:
            reply = self.ctx.rpc(
                self.pv, _ATTACH.wrap(self.pv, kws={"op": "attach", "filter": sample_filter,
                                                    "name": name}),
                timeout=timeout,
            )
        except Exception:
            self.ctx.close()
            raise
        self.id = int(reply["id"])
        self.filter = str(reply["filter"])

    def next(self, max_events: int = 1000, wait: float = 1.0) -> Batch:
        """Up to ``max_events`` events, waiting up to ``wait`` s (at most 2) for the first.

        Every call costs the IOC a little: a continuous reader takes a batch
        every 0.1-0.5 s rather than calling again as soon as one returns.
        """
        value = self.ctx.rpc(
            self.pv,
            _NEXT.wrap(self.pv, kws={"op": "next", "id": self.id, "max": max_events,
                                     "timeout": wait}),
            timeout=self.timeout + wait,
        )
        table = value["value"]
        consumer = value["consumer"]
        return Batch(
            {name: np.asarray(table[name]) for name in EVENT_FIELDS},
            np.asarray(value["traces"]),
            int(consumer["delivered"]),
            int(consumer["lost"]),
            int(consumer["queued"]),
        )

    def close(self) -> None:
        """Detach (the service forgets the consumer) and close the context."""
        try:
            self.ctx.rpc(self.pv, _DETACH.wrap(self.pv, kws={"op": "detach", "id": self.id}),
                         timeout=self.timeout)
        finally:
            self.ctx.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

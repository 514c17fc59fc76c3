"""The sampling service and the run conditions over PV Access (p4p, its own port).

softioc's PVA server serves the records; custom PVs such as an RPC need a p4p
server, which runs in the same process on a TCP port of its own
(``[crate] sample_pva_port``, 0 = any free port; the port taken is shown in
``DAQC<NN>_SMP_PvaPort``). It answers UDP searches on the IOC's own search
port, so ``pvget DAQC<NN>_SMP_ConsumerTable`` works like any record; a client
may also go straight to it by TCP name search,
``EPICS_PVA_NAME_SERVERS=host:port`` (what `dgs-monitor` does, so that
several IOCs on one host never mix). It serves:

- ``DAQC<NN>_SMP_Sample``, an RPC. Arguments (NTURI query): ``op`` = attach |
  next | detach; attach takes ``filter`` (the `ioc.sampling.SampleFilter`
  syntax, e.g. ``"board=101 ch=0-3 prescale=100"``) and ``name`` and returns
  the consumer ``id``; next takes ``id``, ``max`` (events, default 1000) and
  ``timeout`` (seconds to wait for the first event, at most 2) and returns a
  batch: an NTTable of the events (board, channel, timestamp, energy,
  header_type, event_type, flags, trigger_type, trigger_mask, multiplicity,
  trace_offset, trace_length; a master-trigger packet shows channel 16, its
  board's package data and 0 in the digitizer fields) with the
  concatenated trace samples in ``traces`` when the filter asked for them, and
  the consumer's counters in ``consumer``. A consumer not read for
  `IDLE_DETACH_S` is detached.
- ``DAQC<NN>_SMP_ConsumerTable`` (NTTable): every attached consumer, its filter
  and its delivered / lost / queued counts.
- ``DAQC<NN>_SMP_RunConditions`` (NTScalar string): the begin-of-run snapshot
  of the crate's PVs as JSON, the same PVs the receiver's snapshot records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from p4p import Type, Value
from p4p.nt import NTScalar, NTTable
from p4p.server import Server
from p4p.server.thread import SharedPV

from ioc import packets
from ioc.records import Records
from ioc.sample_filter import SampleFilter
from ioc.sampling import Chunk, SampleTap

#: Longest an RPC ``next`` waits for a first event (it holds a server worker).
MAX_WAIT_S = 2.0
DEFAULT_BATCH = 1000
MAX_BATCH = 100_000
IDLE_DETACH_S = 300.0
DEFAULT_PVA_BROADCAST_PORT = "5076"
PUBLISH_PERIOD_S = 0.5

_COLUMNS = [
    ("board", "H"), ("channel", "B"), ("header_type", "B"), ("event_type", "B"),
    ("flags", "H"), ("timestamp", "L"), ("energy", "i"), ("trigger_type", "H"),
    ("trigger_mask", "H"), ("multiplicity", "H"), ("trace_offset", "I"), ("trace_length", "I"),
]  # fmt: skip
#: The columns decoded from the packets; the trace columns are built per batch.
_DECODED = [name for name, _code in _COLUMNS if not name.startswith("trace_")]
BATCH_TYPE = Type(
    [
        ("labels", "as"),
        ("value", ("S", None, [(name, "a" + code) for name, code in _COLUMNS])),
        ("traces", "aH"),
        ("consumer", ("S", None, [("id", "i"), ("delivered", "l"), ("lost", "l"),
                                   ("queued", "l")])),
    ],
    id="epics:nt/NTTable:1.0",
)
REPLY_TYPE = Type([("id", "i"), ("filter", "s"), ("message", "s")], id="dgs:SampleReply:1.0")
CONSUMERS_TABLE = NTTable([("id", "i"), ("name", "s"), ("filter", "s"), ("delivered", "l"),
                           ("lost", "l"), ("queued", "l")])

log = logging.getLogger("dgs.samplepva")


def batch_value(consumer_id: int, chunks: list[Chunk], counters: tuple[int, int, int],
                traces: bool) -> Value:
    """The events of ``chunks`` as one batch structure."""
    events = np.concatenate([c.events() for c in chunks]) if chunks else None
    columns: dict[str, Any] = {}
    samples: list[np.ndarray] = []
    if events is not None:
        for name in _DECODED:
            columns[name] = events[name]
        lengths = np.zeros(events.size, dtype=np.uint32)
        if traces:
            row = 0
            for chunk in chunks:
                if chunk.is_trigger:  # trigger packets hold no trace
                    row += chunk.count
                    continue
                for offset, length in zip(chunk.offsets, chunk.lengths, strict=True):
                    trace = packets.trace_samples(
                        chunk.words[offset + packets.HEADER_WORDS : offset + length + 1]
                    )
                    samples.append(trace)
                    lengths[row] = trace.size
                    row += 1
        offsets = np.zeros(events.size, dtype=np.uint32)
        if events.size > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        columns["trace_offset"] = offsets
        columns["trace_length"] = lengths
    delivered, lost, queued = counters
    return Value(BATCH_TYPE, {
        "labels": [name for name, _ in _COLUMNS],
        "value": columns,
        "traces": np.concatenate(samples) if samples else np.empty(0, np.uint16),
        "consumer": {"id": consumer_id, "delivered": delivered, "lost": lost, "queued": queued},
    })


def _plain(value: Any, enums: tuple[str, ...]) -> Any:
    """A record value as the receiver's snapshot writes it: enum strings, lists, no NaN."""
    if enums:
        return enums[int(value)] if 0 <= int(value) < len(enums) else int(value)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(item, ()) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def run_conditions(crate: str, records: Records, source: str = "ioc at Start") -> dict[str, Any]:
    """The crate's PVs now, as `receiver.snapshot` records them (all but the trace)."""
    pvs = {
        inst.name: _plain(records.get(inst.pv.key, inst.index, inst.board), inst.pv.enums)
        for inst in records.instances
        if inst.name != f"DAQC{crate}_CV_Trace"
    }
    return {
        "crate": crate,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "source": source,
        "pvs": pvs,
    }


class _SampleRpc:
    """The RPC handler of ``DAQC<NN>_SMP_Sample``."""

    def __init__(self, tap: SampleTap) -> None:
        self.tap = tap

    def rpc(self, _pv: SharedPV, op: Any) -> None:
        try:
            op.done(self._call(op.value()))
        except (ValueError, KeyError) as err:
            op.done(error=str(err))

    def _call(self, request: Value) -> Value:
        args = _query(request)
        action = args.get("op", "next")
        if action == "attach":
            sample_filter = SampleFilter.parse(args.get("filter", ""))
            consumer = self.tap.attach(sample_filter, args.get("name", "pva"))
            log.info("consumer %d attached over PVA (%s): %s", consumer.id, consumer.name,
                     sample_filter.text())
            return Value(REPLY_TYPE, {"id": consumer.id, "filter": sample_filter.text()})
        consumer_id = int(args.get("id", 0))
        consumer = self.tap.consumer(consumer_id)
        if consumer is None:
            raise ValueError(f"no consumer {consumer_id} (detached, or never attached)")
        if action == "detach":
            self.tap.detach(consumer_id)
            log.info("consumer %d detached: %d delivered, %d lost", consumer_id,
                     consumer.delivered, consumer.lost)
            return Value(REPLY_TYPE, {"id": consumer_id, "filter": consumer.filter.text()})
        if action != "next":
            raise ValueError(f"unknown op {action!r}: attach, next or detach")
        count = min(max(int(args.get("max", DEFAULT_BATCH)), 1), MAX_BATCH)
        wait = min(max(float(args.get("timeout", 1.0)), 0.0), MAX_WAIT_S)
        chunks = consumer.take(count, wait)
        counters = (consumer.delivered, consumer.lost, consumer.queued)
        return batch_value(consumer_id, chunks, counters, consumer.filter.traces)


def _query(request: Value) -> dict[str, str]:
    """The NTURI query fields (or a plain structure's fields) as strings."""
    fields = request.query if "query" in request else request
    return {name: str(fields[name]) for name in fields.keys()}  # noqa: SIM118 - a p4p Value


class SamplePva:
    """The p4p server of the sampling service, its status PVs and the run conditions."""

    def __init__(self, tap: SampleTap, crate: str, port: int,
                 publish: Callable[[str, Any], None]) -> None:
        self.tap = tap
        self.port = port
        self._publish = publish
        prefix = f"DAQC{crate}_SMP_"
        self.names = {key: prefix + key for key in ("Sample", "ConsumerTable", "RunConditions")}
        self._rpc = SharedPV(initial=Value(REPLY_TYPE, {}), handler=_SampleRpc(tap))
        self._table = SharedPV(initial=CONSUMERS_TABLE.wrap([]))
        self._conditions = SharedPV(nt=NTScalar("s"), initial="{}")
        self._server: Server | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="samplePublish", daemon=True)

    def start(self, bind: str) -> int:
        """Serve on ``bind``; returns the TCP port taken."""
        providers = {
            self.names["Sample"]: self._rpc,
            self.names["ConsumerTable"]: self._table,
            self.names["RunConditions"]: self._conditions,
        }
        conf = {
            "EPICS_PVAS_SERVER_PORT": str(self.port),
            # The IOC's own search port: pvxs servers of one host share it (each sees
            # every search), so plain `pvget`s find these PVs as they find the records.
            "EPICS_PVAS_BROADCAST_PORT": os.environ.get("EPICS_PVAS_BROADCAST_PORT",
                                                        DEFAULT_PVA_BROADCAST_PORT),
            "EPICS_PVAS_INTF_ADDR_LIST": bind,
            "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        }
        self._server = Server(providers=[providers], conf=conf, useenv=False)
        self.port = int(self._server.conf()["EPICS_PVAS_SERVER_PORT"])
        log.info("sampling service over PV Access on %s:%d (%s)", bind, self.port,
                 ", ".join(self.names.values()))
        self._thread.start()
        return self.port

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self._server is not None:
            self._server.stop()

    def set_run_conditions(self, conditions: dict[str, Any]) -> None:
        self._conditions.post(json.dumps(conditions, sort_keys=True))

    def _run(self) -> None:
        last: list[dict] = []
        while not self._stop.wait(PUBLISH_PERIOD_S):
            now = time.monotonic()
            for consumer in self.tap.consumers:
                if not consumer.wants_end_of_run and now - consumer.last_read > IDLE_DETACH_S:
                    self.tap.detach(consumer.id)
                    log.info("consumer %d detached: not read for %.0f s", consumer.id,
                             IDLE_DETACH_S)
            count, delivered, lost = self.tap.totals()
            self._publish("SmpConsumers", count)
            self._publish("SmpDelivered", delivered)
            self._publish("SmpLost", lost)
            rows = [
                {"id": s.id, "name": s.name, "filter": s.filter, "delivered": s.delivered,
                 "lost": s.lost, "queued": s.queued}
                for s in (c.stats() for c in self.tap.consumers)
            ]
            if rows != last:
                self._table.post(CONSUMERS_TABLE.wrap(rows))
                last = rows

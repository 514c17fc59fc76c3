"""Publishes every statistic at 2 Hz from one place (spec 02 §3, §6).

Record updates cost about 0.1 ms of CPU each, so the stages never touch
records: they keep counters, and this thread copies snapshots into records,
skipping unchanged values (`Records.publish`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ioc.inloop import InLoop
from ioc.losses import LossLedger, LossReason
from ioc.monitoring import MonitorPublisher
from ioc.outloop import OutLoop
from ioc.packets import trace_samples
from ioc.pool import BufferPool
from ioc.pvs import CARDS, REALTIME_STATES
from ioc.records import Records

PUBLISH_PERIOD_S = 0.5
TRACE_LENGTH = 1024
MIB = 1 << 20

log = logging.getLogger("dgs.publisher")


def mib(nbytes: int) -> float:
    """MiB at KiB resolution, as the original published totals."""
    return (nbytes // 1024) / 1024


def lost_percent(lost: int, written: int) -> float:
    return 100.0 * lost / written if written else 0.0


def outloop_diagnostics(
    trace_bd: int, errors: tuple[int, ...], first_errors: tuple
) -> list[float]:
    """`_CV_OutLoop0..6`: error counts, a first-error record, or zeros, by TraceBd."""
    if trace_bd <= 3:
        return [float(e) for e in errors]
    if trace_bd <= 7:
        record = first_errors[trace_bd - 4] or (0, 0, 0, 0)
        return [float(v) for v in record] + [0.0] * (CARDS - 4)
    return [0.0] * CARDS


def trace_waveform(words: np.ndarray | None, show_marks: bool) -> np.ndarray:
    """The valid samples of the trace (at most 1024): masked to 14 bits unless Show.

    Only the valid samples are published (the waveform's NORD = TraceLen), so a
    plot that autoscales shows samples 0..TraceLen, not a tail of zeros.
    """
    if words is None or words.size == 0:
        return np.zeros(0, dtype=np.int16)
    return trace_samples(words, raw=show_marks)[:TRACE_LENGTH].view(np.int16)


@dataclass
class SenderRate:
    """Turns the sender's cumulative bytes into a wire rate."""

    last_bytes: int = 0
    last_time: float = 0.0
    rate_kbps: float = 0.0

    def update(self, bytes_sent: int, now: float) -> float:
        if self.last_time and now > self.last_time:
            delta = max(0, bytes_sent - self.last_bytes)
            self.rate_kbps = delta / (now - self.last_time) / 1000.0
        self.last_bytes, self.last_time = bytes_sent, now
        return self.rate_kbps


class Publisher:
    """The 2 Hz statistics thread of a crate IOC."""

    def __init__(
        self,
        records: Records,
        pool: BufferPool,
        inloop: InLoop,
        outloop: OutLoop,
        sender,
        sim_boards: dict[str, object],
        losses: LossLedger,
        monitor: MonitorPublisher | None = None,
    ) -> None:
        self.records = records
        self.pool = pool
        self.inloop = inloop
        self.outloop = outloop
        self.sender = sender
        self.sim_boards = sim_boards
        self.losses = losses
        self.monitor = monitor
        self._wire = SenderRate()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish_now(self) -> None:
        """Ask for an immediate publication (end of drain)."""
        self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
            except Exception:
                log.exception("publication failed")
            self._wake.wait(PUBLISH_PERIOD_S)
            self._wake.clear()

    def publish(self) -> None:
        r = self.records
        audit = self.pool.audit()
        r.publish("BuffersAvail", audit.free)
        r.publish("NumFreeBuffers", audit.free)
        r.publish("NumWrittenBuffers", audit.written)
        r.publish("NumSendBuffers", audit.sender)
        r.publish("CvNumSendBuffers", audit.sender)
        r.publish("BuffersTotal", audit.total)
        r.publish("BuffersHeld", audit.held)
        r.publish("BuffersOK", int(audit.ok))

        ins = self.inloop.stats()
        r.publish("InLoop1", ins.mib_read)
        r.publish("InLoop2", ins.type_f_built)
        r.publish("InLoop3", ins.polls)
        r.publish("InLoop4", ins.last_transfer)
        r.publish("ReadErrors", ins.read_errors)
        r.publish("InLoopRunning", int(ins.running))
        r.publish("ScanGapMax", round(ins.scan_gap_max_ms, 1))
        r.publish("RealTime", REALTIME_STATES.index(ins.realtime.value))
        for name, percent in ins.fifo_peak_percent.items():
            r.publish("FifoPeak", round(percent, 1), board=name)
        for slot_index, code in enumerate(self.inloop.board_types_by_slot()):
            r.publish("BoardType", code, index=slot_index)

        snd = self.sender.stats()
        outs = self.outloop.stats()
        losses = self.losses.snapshot()
        lost_bytes = losses.run_bytes_by_card()
        bufs_lost = losses.run_buffers(LossReason.MEMORY, LossReason.UNREACHABLE)
        for reason in LossReason:
            name = reason.value
            r.publish(f"Lost{name}", np.array([mib(n) for n in losses.bytes[reason]]))
            r.publish(f"LostEvents{name}", np.array(losses.events[reason], dtype=np.float64))
        r.publish("Retained", mib(self.pool.q_sender.bytes))
        for card in range(CARDS):
            r.publish("DataRate", round(outs.rate_kbps[card], 3), index=card)
            r.publish("Data", mib(outs.bytes_by_card[card]), index=card)
            r.publish("DataLost", mib(lost_bytes[card]), index=card)
            r.publish("Errors", outs.errors_by_card[card], index=card)
            record = outs.first_errors[card] or (0, 0, 0, 0)
            r.publish("FirstError", np.array(record, dtype=np.float64), index=card)
        trace_bd = int(r.get("TraceBd"))
        diag = outloop_diagnostics(trace_bd, outs.errors_by_card, outs.first_errors)
        for card, value in enumerate(diag):
            r.publish("OutLoop", value, index=card)
        r.publish("TotalBufsWritten", outs.bufs_written)
        r.publish("TotalFBufsWritten", outs.fbufs_written)
        r.publish("TotalBufsLost", bufs_lost)
        r.publish("BufLostPerecnt", round(lost_percent(bufs_lost, outs.bufs_written), 4))
        r.publish("SendRate", round(outs.send_rate_kbps, 1))

        words = self.outloop.trace_words(trace_bd, int(r.get("TraceChan")))
        trace = trace_waveform(words, show_marks=bool(r.get("TraceHorns")))
        r.publish("Trace", trace)
        r.publish("TraceLen", trace.size)

        r.publish("SenderRunning", int(snd.serving))
        r.publish("SenderClient", snd.client)
        r.publish("SenderReplies", snd.replies)
        r.publish("SenderBytes", mib(snd.bytes_sent))
        rate = self._wire.update(snd.bytes_sent, time.monotonic())
        r.publish("SenderWireRate", round(rate, 1))
        r.publish("SenderRequeued", snd.requeued)
        r.publish("SenderRejected", snd.rejected)

        for name, board in self.sim_boards.items():
            r.publish("SimGenerated", board.generated, board=name)
            r.publish("SimDropped", board.dropped, board=name)
            r.publish("SimCleared", board.cleared, board=name)
        if self.monitor is not None:
            self.monitor.publish(time.monotonic())

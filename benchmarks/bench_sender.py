"""P1: the sender component against a bare Python request/reply server (spec 06).

The figure: `ioc.sender.Sender` serving pre-filled 1 MiB buffers of 200-sample
digitizer events (a benchmark-only source puts each released buffer straight
back on qSender) to a null receiver. The source cycles ``--pool`` buffers: by
default 16 MiB, about what a crate moves through its queues while the buffers
are still in the last-level cache (in the IOC, inLoop has just written a buffer
and outLoop has just checked it when the sender sends it); ``--pool 64`` shows
cache-cold buffers.

The baseline, measured in the same run: a bare server answering each 4-byte
request with ``sendmsg([header, payload])`` of 280 000 bytes, TCP_NODELAY and
the same maximum segment size. The null receiver runs in its own process (like
a real receiver), reads each header and exactly recLen bytes into a
preallocated buffer and decodes nothing. Both servers are measured with 1 and
6 requests in flight, back to back; the ratio is that of the medians of 11
repetitions by default (at least 5); the median of the per-repetition ratios,
where load that comes and goes on a shared machine cancels out better, is
printed too. For reference, the same bare loop also serves the sender's own
buffers cut to the sender's reply sizes: that separates what serving 1 MiB
pool buffers costs from what the sender adds.

Run: ``.venv/bin/python benchmarks/bench_sender.py [--json FILE] [--repeat N]
[--seconds S] [--pool N]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BareServer

from ioc import packets
from ioc.checker import Checker
from ioc.config import SenderConfig
from ioc.cuts import reply_ends
from ioc.pool import Buffer, BufferPool, Owner
from ioc.sender import Sender
from receiver.client import DataConnection

REPLY_BYTES = 280_000
TARGET_RATIO = 0.8
POOL_BUFFERS = 16
EVENT_LENGTH = packets.DIGITIZER_HEADER_LENGTH + 200 // 2  # N for 200-sample traces
PIPELINES = (1, 6)
TIME_BUDGET_S = 60.0


# ------------------------------------------------------------ null receiver


def null_receive(host: str, port: int, pipeline: int, seconds: float) -> dict:
    """Pull replies for ``seconds`` with ``pipeline`` requests in flight; close cleanly."""
    conn = DataConnection.connect(host, port, timeout=5.0, read_timeout=10.0,
                                  max_reply_bytes=REPLY_BYTES)
    conn.request(pipeline)
    conn.read_reply()  # the first reply starts the clock
    conn.request(1)
    start = time.perf_counter()
    end = start + seconds
    payload = replies = largest = 0
    while True:
        header, _ = conn.read_reply()
        payload += header.length
        replies += 1
        largest = max(largest, header.length)
        if time.perf_counter() >= end:
            break
        conn.request(1)
    elapsed = time.perf_counter() - start
    while conn.outstanding:
        conn.read_reply()
    conn.close()
    return {"mb_s": payload / elapsed / 1e6, "replies_s": replies / elapsed, "largest": largest}


def _receiver_worker(commands) -> None:
    """Child process: run one null receiver per command until told to stop."""
    while (command := commands.recv()) is not None:
        commands.send(null_receive(*command))


# ---------------------------------------------------------------- servers


def same_replies_as_the_sender(pool: BufferPool, limit: int) -> list[memoryview]:
    """The slices the sender sends from the pool buffers, for the like-for-like server."""
    sample = BufferPool(1)
    sample_buf = sample.buffers[0]
    sample_buf.nbytes, sample_buf.board_type = fill_buffers(sample), 12
    cuts = [0, *reply_ends(sample_buf, limit)]
    return [
        memoryview(buf.data)[start:end]
        for buf in pool.buffers
        for start, end in itertools.pairwise(cuts)
    ]


def fill_buffers(pool: BufferPool) -> int:
    """Fill every buffer once with chained 200-sample events; returns the payload bytes."""
    event_words = EVENT_LENGTH + 1
    count = pool.buffer_bytes // 4 // event_words
    nwords = count * event_words
    for buf in pool.buffers:
        events = buf.words[:nwords].reshape(count, event_words)
        events[:] = 0x00010002  # trace samples
        events[:, 0] = packets.MARKER
        events[:, 1] = [packets.word1(3, EVENT_LENGTH, 101, i % 10) for i in range(count)]
        events[:, 2] = range(count)
        events[:, 3] = packets.word3(packets.DIGITIZER_HEADER_LENGTH, 0, packets.HEADER_TYPE_LED, 0)
    return nwords * 4


class RecyclingPool(BufferPool):
    """The benchmark-only source: a released buffer goes straight back to qSender, whole.

    Refilling by reference inside ``release`` costs what a put to qFree costs and
    needs no extra thread, so the measurement is not disturbed by thread hand-offs.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.nbytes = fill_buffers(self)

    def prime(self) -> None:
        """Queue every buffer (after the run start has emptied qSender), checked as outLoop does."""
        buffers = self.q_free.get_all(Owner.INLOOP)
        checker = Checker()
        for buf in buffers:
            buf.card, buf.board_type, buf.nbytes = 0, 12, self.nbytes
            buf.packet_words = checker.check(buf.payload_words(), buf.card).packet_words
        self.q_sender.put_many(buffers)

    def release(self, buf: Buffer) -> None:
        buf.sent_bytes = 0
        self.q_sender.put(buf)


class SenderUnderTest:
    """The Sender serving a pool that never runs dry."""

    def __init__(self, config: SenderConfig, pool_buffers: int) -> None:
        self.pool = RecyclingPool(pool_buffers)
        self.nbytes = self.pool.nbytes
        self.sender = Sender(self.pool, config, "127.0.0.1", 0)
        self.sender.start()
        self.sender.run_started(save=True)
        self.pool.prime()
        self.port = self.sender.port

    def close(self) -> None:
        self.sender.shutdown(deliver_timeout=0.0)


# ------------------------------------------------------------------- main


@dataclass
class Figure:
    pipeline: int
    sender: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    same_buffers: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def paired_ratio(self, other: str) -> float:
        """Median of the per-repetition ratios (each pair ran back to back)."""
        return statistics.median(a / b for a, b in zip(self.sender, getattr(self, other)))

    @property
    def ratio(self) -> float:
        return self.median("sender") / self.median("bare")

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET_RATIO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="repetitions (median; >= 5)")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one measurement")
    parser.add_argument("--pool", type=int, default=POOL_BUFFERS, help="1 MiB buffers cycled")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    config = SenderConfig()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = context.Process(target=_receiver_worker, args=(theirs,), daemon=True)
    worker.start()
    under_test = SenderUnderTest(config, args.pool)
    servers = {
        "bare": BareServer(config.max_segment, [memoryview(bytearray(b"\xaa" * REPLY_BYTES))]),
        "same_buffers": BareServer(
            config.max_segment,
            same_replies_as_the_sender(under_test.pool, config.max_reply_bytes),
        ),
    }
    ports = {"sender": under_test.port, **{name: srv.port for name, srv in servers.items()}}
    figures = {p: Figure(p) for p in PIPELINES}
    one_round = len(PIPELINES) * len(ports) * (args.seconds + 0.2)
    largest = 0
    try:
        for rep in range(args.repeat):
            for pipeline in PIPELINES:
                for name, port in ports.items():
                    ours.send(("127.0.0.1", port, pipeline, args.seconds))
                    result = ours.recv()
                    getattr(figures[pipeline], name).append(result["mb_s"])
                    if name == "sender":
                        largest = max(largest, result["largest"])
            if time.monotonic() - started + one_round > TIME_BUDGET_S:
                print(f"time budget reached after {rep + 1} repetitions", file=sys.stderr)
                break
        ours.send(None)
        worker.join(5)
    finally:
        under_test.close()
        for srv in servers.values():
            srv.close()
        if worker.is_alive():
            worker.kill()
    audit = under_test.pool.audit()
    stats = under_test.sender.stats()

    print(f"P1 sender: {args.pool} x 1 MiB buffers of {EVENT_LENGTH + 1}-word events, replies <= "
          f"{config.max_reply_bytes} B (largest sent {largest} B), max_segment "
          f"{config.max_segment}, {len(figures[1].sender)} repetitions of {args.seconds:g} s")
    results = []
    for fig in figures.values():
        line = {
            "id": "P1",
            "pipeline": fig.pipeline,
            "figure_mb_s": round(fig.median("sender"), 1),
            "baseline_mb_s": round(fig.median("bare"), 1),
            "ratio": round(fig.ratio, 3),
            "paired_ratio": round(fig.paired_ratio("bare"), 3),
            "target_ratio": TARGET_RATIO,
            "pass": fig.passed,
            "same_buffers_mb_s": round(fig.median("same_buffers"), 1),
            "sender_runs_mb_s": [round(v, 1) for v in fig.sender],
            "bare_runs_mb_s": [round(v, 1) for v in fig.bare],
            "same_buffers_runs_mb_s": [round(v, 1) for v in fig.same_buffers],
        }
        results.append(line)
        print(f"  pipeline {fig.pipeline}: sender {line['figure_mb_s']} MB/s, bare server "
              f"{line['baseline_mb_s']} MB/s, ratio {line['ratio']:.3f} (paired "
              f"{line['paired_ratio']:.3f}), target >= "
              f"{TARGET_RATIO} -> {'PASS' if fig.passed else 'FAIL'}")
        print(f"    (bare server sending the sender's own buffers and reply sizes: "
              f"{line['same_buffers_mb_s']} MB/s; sender / that = "
              f"{fig.paired_ratio('same_buffers'):.3f})")
    healthy = (
        audit.ok
        and stats.requeued == 0
        and stats.idle_replies <= stats.replies // 1000  # the source kept qSender full
        and largest <= config.max_reply_bytes
    )
    print(f"  pool audit ok={audit.ok}, requeued={stats.requeued}, replies={stats.replies}, "
          f"INSUFF_DATA replies={stats.idle_replies}")
    passed = healthy and all(fig.passed for fig in figures.values())
    print(f"P1 {'PASS' if passed else 'FAIL'} ({time.monotonic() - started:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "pass": passed}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

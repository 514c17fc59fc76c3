"""P12 (consumers): P3 end to end with four sampling consumers attached, against none.

The P3 path of `bench_end_to_end` (the demo crate offering 330 MB/s of
200-sample events, `dgs-receiver` writing GEB files to tmpfs), run in pairs on
one IOC: one run with no consumer, one with four consumers attached over PV
Access before Start, the order alternating from pair to pair so drift on the
shared machine falls on both sides alike. The four consumers, each read by a
thread of this process as an online analysis would:

- every event of one channel (board 101, channel 0), read in batches every 0.2 s;
- a prescaled 1 in 100 over every board and channel, read the same way;
- the most recent event on request, asked for twice a second;
- one that is never read (stalled): it fills its queue and then loses.

The figure is the median delivered rate with consumers; the baseline the
median without, measured in the same run; target: at most 5 % lower (ratio
>= 0.95), every run complete (every event in the files, nothing lost). The note
gives what the consumers got and lost, the IOC's cores in both cases, and
what the tap costs outLoop per 1 MiB buffer of 200-sample events with these
four consumers, against outLoop's check of the same buffer (P2's buffer).

    .venv/bin/python benchmarks/bench_sampling.py [--json FILE] [--pairs N] [--seconds S]
                                                  [--offered MB/s]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_checker import build_buffer
from bench_end_to_end import (
    DGS_RECEIVER,
    FIFO_WORDS,
    P3_OFFERED_MB_S,
    P3_SAMPLES,
    TMPFS,
    RunResult,
    one_run,
    rate_for,
)
from common import BenchIoc, Figure, crate_config, fill_tmpfs, finish, median

from ioc.checker import Checker
from ioc.pool import Buffer
from ioc.sample_filter import SampleFilter
from ioc.sampling import SampleTap
from receiver.sampler import Sampler

TARGET_RATIO = 0.95
ON_REQUEST_PERIOD_S = 0.5
#: How often the continuous consumers take their batch (their queues hold 20 000 events).
BATCH_PERIOD_S = 0.2


#: The four consumers of P12 and their filters (ioc.sampling syntax).
FILTERS = {
    "every": "board=101 ch=0",
    "prescaled": "prescale=100",
    "on request": "recent",
    "stalled": "",
}


class Consumers:
    """The four consumers of P12 and the threads that read three of them."""

    def __init__(self, address: str) -> None:
        self.samplers = {name: Sampler(address, "01", text, name=name)
                         for name, text in FILTERS.items()}
        self.got = dict.fromkeys(FILTERS, 0)
        self.lost = dict.fromkeys(FILTERS, 0)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(name, period, count), daemon=True)
            for name, period, count in (("every", BATCH_PERIOD_S, 50_000),
                                        ("prescaled", BATCH_PERIOD_S, 50_000),
                                        ("on request", ON_REQUEST_PERIOD_S, 1))
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, name: str, period: float, count: int) -> None:
        """Take what is there every ``period``, as an analysis working in batches does."""
        sampler = self.samplers[name]
        while not self._stop.is_set():
            batch = sampler.next(count, wait=0.0)
            self.got[name] += len(batch)
            self.lost[name] = batch.lost
            self._stop.wait(period)

    def close(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.lost["stalled"] = self.samplers["stalled"].next(1, wait=0.0).lost
        for sampler in self.samplers.values():
            sampler.close()
        return {"got": dict(self.got), "lost": dict(self.lost)}


def tap_cost_us(repetitions: int = 15, calls: int = 20) -> tuple[float, float]:
    """(tap, check) microseconds per 1 MiB buffer: the fastest of ``repetitions`` means."""
    words = build_buffer(P3_SAMPLES)
    buf = Buffer(1, words.nbytes)
    buf.words[:] = words
    buf.nbytes, buf.card = words.nbytes, 0
    checker = Checker()
    buf.packet_words = checker.check(buf.payload_words(), card=0).packet_words
    tap = SampleTap()
    consumers = [tap.attach(SampleFilter.parse(text)) for text in FILTERS.values()]

    def offer() -> None:
        tap.offer(buf)
        for consumer in consumers[:3]:  # read, as the threads do; the stalled one fills
            consumer.take(1 << 30, 0)

    def check() -> None:
        checker.forget_all()
        checker.check(buf.payload_words(), card=0)

    best = {offer: float("inf"), check: float("inf")}
    for _ in range(repetitions):
        for action in best:
            started = time.perf_counter()
            for _ in range(calls):
                action()
            best[action] = min(best[action], (time.perf_counter() - started) / calls)
    return best[offer] * 1e6, best[check] * 1e6


def run_pairs(workdir: Path, out_dir: Path, pairs: int, seconds: float, offered: float
              ) -> tuple[list[RunResult], list[RunResult], list[dict]]:
    config = crate_config(workdir / "p12.toml", fifo_words=FIFO_WORDS,
                          event_rate_hz=rate_for(offered, P3_SAMPLES),
                          trace_samples=P3_SAMPLES)
    alone: list[RunResult] = []
    sampled: list[RunResult] = []
    consumed: list[dict] = []
    with BenchIoc(["--config", str(config)], workdir) as ioc:
        address = f"127.0.0.1:{int(ioc.values('DAQC01_SMP_PvaPort')[0])}"
        for pair in range(pairs):
            for with_consumers in ((False, True) if pair % 2 == 0 else (True, False)):
                if not with_consumers:
                    alone.append(one_run(ioc, P3_SAMPLES, offered, seconds, out_dir))
                    continue
                consumers = Consumers(address)
                try:
                    sampled.append(one_run(ioc, P3_SAMPLES, offered, seconds, out_dir))
                finally:
                    consumed.append(consumers.close())
                if "Traceback" in ioc.log():
                    raise RuntimeError(f"the IOC logged a traceback:\n{ioc.log()[-3000:]}")
    return alone, sampled, consumed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--pairs", type=int, default=3, help="run pairs (none / four consumers)")
    parser.add_argument("--seconds", type=float, default=3.0, help="generation time of a run")
    parser.add_argument("--offered", type=float, default=P3_OFFERED_MB_S, metavar="MB/s",
                        help="load the crate offers (default P3's, 330 MB/s)")
    args = parser.parse_args(argv)
    if not DGS_RECEIVER.exists():
        raise SystemExit(f"{DGS_RECEIVER} is missing: install the project (pip install -e .)")
    started = time.monotonic()
    tap_us, check_us = tap_cost_us()
    workdir = Path(tempfile.mkdtemp(prefix="bench-p12-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-p12-", dir=TMPFS if TMPFS.is_dir() else None))
    try:
        fill_tmpfs(out_dir, args.offered * 1e6 * args.seconds)
        alone, sampled, consumed = run_pairs(workdir, out_dir, max(1, args.pairs), args.seconds,
                                            args.offered)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    complete = all(run.lossless for run in alone + sampled)
    got = {name: median(c["got"][name] for c in consumed) for name in FILTERS}
    lost = {name: median(c["lost"][name] for c in consumed) for name in FILTERS}
    figure = Figure(
        id="P12",
        what="P3 end to end with 4 sampling consumers (every ev. of 1 ch, 1/100, on request, "
             "stalled)",
        value=median(run.received_mb_s for run in sampled),
        unit="MB/s",
        baseline=median(run.received_mb_s for run in alone),
        baseline_what="same, no consumer",
        target=TARGET_RATIO,
        target_on="ratio",
        runs=[run.received_mb_s for run in sampled],
        conditions_met=complete,
        note=(f"offered {args.offered:g} MB/s; {len(sampled)} runs each way, alternating; "
              "per run the consumers got "
              + ", ".join(f"{name} {got[name]:.0f}" for name in got)
              + f" events, the stalled one lost {lost['stalled']:.0f}; IOC cores "
              f"{median(r.ioc_cores for r in sampled):.2f} with, "
              f"{median(r.ioc_cores for r in alone):.2f} without; the tap costs outLoop "
              f"{tap_us:.0f} us per 1 MiB buffer with these consumers (its check: "
              f"{check_us:.0f} us); "
              + ("every run complete" if complete else "some run lost data")),
    )
    return finish(args.json, "P12", [figure], started,
                  alone=[vars(run) for run in alone], sampled=[vars(run) for run in sampled],
                  consumers=consumed, tap_us_per_buffer=tap_us, check_us_per_buffer=check_us)


if __name__ == "__main__":
    sys.exit(main())

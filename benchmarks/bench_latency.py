"""P5: latency from FIFO arrival to the receiver at 1 kHz per channel (spec 06).

The demo crate (4 digitizers x 10 channels, 200-sample events) runs at 1 kHz
per channel. Each event's timestamp is the crate tick at which it entered its
FIFO; `dgs-ioc` prints the crate clock origin (``time.monotonic_ns()``
at tick 0), and CLOCK_MONOTONIC is one clock for all processes of the host,
so a receiver in its own process computes, per event, the arrival time of the
reply that carried it minus ``origin + 10 ns x timestamp``. Each repetition is
one run; its median and p99 are reported, and the figures are the medians of
the repetitions.

Baseline, measured in the same run: the same simulated boards read in this
process by a bare loop with inLoop's coalescing rule (read at 64 KiB waiting
or 20 ms since the last read, 1 ms polls), the latency taken at the read. It
is the delay the coalescing alone costs, with no pool, check, TCP or receiver.

    .venv/bin/python benchmarks/bench_latency.py [--json FILE] [--repeat N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, BenchIoc, Figure, crate_config, finish, median

from ioc import packets
from ioc.config import InLoopConfig
from ioc.hardware import WORD, BoardKind
from sim import TICK_NS, SimBoardSpec, SimCrate

RATE_HZ = 1000.0
SAMPLES = 200
MEDIAN_TARGET_MS = 60.0
P99_TARGET_MS = 150.0
PIPELINE = 6
RECEIVER_TIMEOUT_S = 60.0


# ----------------------------------------------------------------- receiver


def receive(port: int, origin_ns: int, timeout: float) -> dict:
    """Pull until every board sent its 0xD; per event: arrival minus FIFO entry, in ms."""
    from ioc.decoder import KIND_EVENT
    from receiver.client import DataConnection, Tally

    conn = DataConnection.connect("127.0.0.1", port, timeout=30.0, read_timeout=30.0)
    tally = Tally()
    chunks: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    conn.request(PIPELINE)
    try:
        while conn.outstanding:
            header, payload = conn.read_reply()
            arrived_ns = time.monotonic_ns()
            decoded = tally.add_reply(header, payload)
            if decoded is not None:
                events = decoded.events[decoded.events["kind"] == KIND_EVENT]
                entered_ns = origin_ns + events["timestamp"].astype(np.int64) * TICK_NS
                chunks.append((arrived_ns - entered_ns) / 1e6)
            if not tally.all_done and time.monotonic() < deadline:
                conn.request(1)
    finally:
        conn.close()
    latencies = np.concatenate(chunks) if chunks else np.empty(0)
    return summary(latencies) | {"all_done": tally.all_done}


def summary(latencies_ms: np.ndarray) -> dict:
    if latencies_ms.size == 0:
        return {"events": 0, "median_ms": float("nan"), "p99_ms": float("nan"),
                "max_ms": float("nan"), "min_ms": float("nan")}
    return {
        "events": int(latencies_ms.size),
        "median_ms": float(np.median(latencies_ms)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
        "max_ms": float(latencies_ms.max()),
        "min_ms": float(latencies_ms.min()),
    }


# ---------------------------------------------------------------- the IOC


def ioc_runs(workdir: Path, repeat: int, seconds: float) -> list[dict]:
    config = crate_config(workdir / "latency.toml", fifo_words=262144, event_rate_hz=RATE_HZ,
                          trace_samples=SAMPLES)
    results = []
    with BenchIoc(["--config", str(config)], workdir) as ioc:
        origin_ns = ioc.clock_origin_ns()
        for _ in range(repeat):
            receiver = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--receive", str(ioc.ports.data),
                 "--origin", str(origin_ns)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            )
            ioc.start_run()
            time.sleep(seconds)  # the measured run itself
            ioc.stop_run()
            out, err = receiver.communicate(timeout=RECEIVER_TIMEOUT_S + 10)
            if receiver.returncode != 0:
                raise RuntimeError(f"latency receiver failed: {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------- baseline


def bare_read_loop(seconds: float) -> dict:
    """Latency of the coalescing rule alone: 4 boards at 1 kHz/channel, read in this thread."""
    settings = InLoopConfig()
    specs = [
        SimBoardSpec(f"B{card}", BoardKind.DIGITIZER_MASTER, slot=card + 3, card=card,
                     package_data=101 + card, event_rate_hz=RATE_HZ, trace_samples=SAMPLES)
        for card in range(4)
    ]
    crate = SimCrate(specs, seed=1)
    origin_ns = crate.clock_origin_ns()
    out = np.empty(1 << 18, dtype=WORD)
    event_words = packets.HEADER_WORDS + SAMPLES // 2
    threshold_words = settings.read_threshold_bytes // 4
    last_read = {}
    for board in crate.boards:
        board.set_master_logic(True)
        last_read[board] = time.monotonic()
    chunks = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for board in crate.boards:
            depth = board.status().depth_words
            now = time.monotonic()
            waited = now - last_read[board]
            if depth and (depth >= threshold_words or waited >= settings.max_latency_s):
                nwords = min(depth, out.size) // event_words * event_words
                board.read(out, nwords)
                read_ns = time.monotonic_ns()
                last_read[board] = now
                events = out[:nwords].reshape(-1, event_words)
                ticks = packets.timestamp(events[:, 2], events[:, 3]).astype(np.int64)
                chunks.append((read_ns - (origin_ns + ticks * TICK_NS)) / 1e6)
        time.sleep(0.001)
    return summary(np.concatenate(chunks))


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="runs (median; >= 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one run")
    parser.add_argument("--receive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--origin", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        print(json.dumps(receive(args.receive, args.origin, RECEIVER_TIMEOUT_S)), flush=True)
        return 0
    started = time.monotonic()
    repeat = max(5, args.repeat)
    baselines = [bare_read_loop(args.seconds) for _ in range(repeat)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        runs = ioc_runs(workdir, repeat, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    complete = all(run["all_done"] and run["events"] > 0 for run in runs)
    shared = {"unit": "ms", "higher_is_better": False, "conditions_met": complete,
              "baseline_what": "coalescing only"}
    figures = [
        Figure(id="P5a", what=f"latency FIFO -> receiver, median, {RATE_HZ:g} Hz/channel",
               value=median(run["median_ms"] for run in runs),
               baseline=median(base["median_ms"] for base in baselines),
               target=MEDIAN_TARGET_MS, runs=[run["median_ms"] for run in runs], **shared),
        Figure(id="P5b", what=f"latency FIFO -> receiver, p99, {RATE_HZ:g} Hz/channel",
               value=median(run["p99_ms"] for run in runs),
               baseline=median(base["p99_ms"] for base in baselines),
               target=P99_TARGET_MS, runs=[run["p99_ms"] for run in runs],
               note=f"{sum(run['events'] for run in runs)} events in {len(runs)} runs of "
                    f"{args.seconds:g} s; worst event {max(run['max_ms'] for run in runs):.1f} ms",
               **shared),
    ]
    return finish(args.json, "P5", figures, started, runs=runs, baseline_runs=baselines)


if __name__ == "__main__":
    sys.exit(main())

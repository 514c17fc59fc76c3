"""P4: how fast the simulated digitizer makes valid events (spec 06).

Measured through the public board API: a digitizer with a FIFO big enough for
a whole repetition, a manual clock advanced by one big step, then ``status()``
(which registers the arrivals) and ``read()`` (which builds the events into
the FIFO and copies them out, as inLoop's DMA would). The baseline is a numpy
copy of the same number of bytes, measured in the same run. Figures are
medians of the repetitions.

Run: ``.venv/bin/python benchmarks/bench_sim.py [--json FILE] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ioc.hardware import WORD, BoardKind
from ioc.packets import HEADER_WORDS, MARKER, packet_length
from sim import ManualClock, SimBoardSpec, SimCrate

#: Per-channel rate of the benchmark board: 10 channels x 1 MHz = one event per 10 ticks.
RATE_HZ = 1_000_000.0
TICKS_PER_EVENT = 10
TRACE_TARGET_GBPS = 1.0
HEADER_TARGET_MEPS = 5.0
TIME_BUDGET_S = 50.0


def _check_valid(words: np.ndarray, event_words: int) -> None:
    """Refuse to report a speed for events that do not chain (marker and length of each)."""
    events = words.reshape(-1, event_words)
    if not (events[:, 0] == MARKER).all():
        raise SystemExit("generated events lack the 0xAAAAAAAA marker")
    if not (packet_length(events[:, 1]) == event_words - 1).all():
        raise SystemExit("generated events carry a wrong packet length")


def _time_generation(trace_samples: int, events: int, repeat: int) -> dict:
    """Median seconds to generate and read ``events`` events, plus the copy baseline."""
    event_words = HEADER_WORDS + trace_samples // 2
    capacity = int(events * 1.1) * event_words  # room for the Poisson spread of a step
    clock = ManualClock()
    spec = SimBoardSpec(
        "BENCH",
        BoardKind.DIGITIZER_MASTER,
        slot=3,
        card=0,
        package_data=101,
        event_rate_hz=RATE_HZ,
        trace_samples=trace_samples,
        fifo_words=capacity,
    )
    board = SimCrate([spec], seed=1, clock=clock).board(0)
    out = np.empty(capacity, dtype=WORD)
    board.set_master_logic(True)
    clock.advance(events * TICKS_PER_EVENT)  # warm-up: trace bank, page faults
    board.read(out, board.status().depth_words)
    total_times, sizes, counts, copy_times = [], [], [], []
    source = np.ones(events * event_words, dtype=WORD)
    copy_target = np.zeros_like(source)
    for _ in range(repeat):
        clock.advance(events * TICKS_PER_EVENT)
        before = board.generated
        start = time.perf_counter()
        depth = board.status().depth_words
        board.read(out, depth)
        done = time.perf_counter()
        total_times.append(done - start)
        sizes.append(depth * 4)
        counts.append(board.generated - before)
        copy_start = time.perf_counter()
        np.copyto(copy_target, source)
        copy_times.append(time.perf_counter() - copy_start)
    _check_valid(out[:depth], event_words)
    median_total = statistics.median(total_times)
    median_bytes = statistics.median(sizes)
    median_events = statistics.median(counts)
    return {
        "trace_samples": trace_samples,
        "events_per_repetition": median_events,
        "bytes_per_repetition": median_bytes,
        "repetitions": repeat,
        "seconds_generate_and_read": median_total,
        "gbps": median_bytes / median_total / 1e9,
        "meps": median_events / median_total / 1e6,
        "baseline_copy_gbps": source.nbytes / statistics.median(copy_times) / 1e9,
        "baseline_copy_meps": events / statistics.median(copy_times) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per figure (>= 5)")
    args = parser.parse_args()
    repeat = max(5, args.repeat)
    started = time.perf_counter()
    traces = _time_generation(200, 100_000, repeat)
    headers = _time_generation(0, 400_000, repeat)
    elapsed = time.perf_counter() - started

    rows = [
        ("P4a 200-sample traces", traces["gbps"], traces["baseline_copy_gbps"],
         TRACE_TARGET_GBPS, "GB/s"),
        ("P4b header-only", headers["meps"], headers["baseline_copy_meps"],
         HEADER_TARGET_MEPS, "M events/s"),
    ]
    print("Simulated digitizer generation, measured through the public API "
          "(status() registers arrivals, read() builds the events and copies them out);")
    print(f"baseline: numpy copy of the same bytes; medians of {repeat} repetitions, one core.")
    results = {"elapsed_s": elapsed, "traces": traces, "header_only": headers, "figures": []}
    passed = True
    for name, figure, baseline, target, unit in rows:
        ok = figure >= target
        passed &= ok
        print(f"{name:24s} {figure:8.2f} {unit:10s} baseline {baseline:8.2f} "
              f"ratio {figure / baseline:5.3f}  target >= {target:g}  {'PASS' if ok else 'FAIL'}")
        results["figures"].append({"name": name, "value": figure, "unit": unit,
                                   "baseline": baseline, "ratio": figure / baseline,
                                   "target": target, "pass": ok})
    for label, part in (("traces", traces), ("header-only", headers)):
        print(f"  {label}: {part['events_per_repetition']:.0f} events "
              f"({part['bytes_per_repetition'] / 1e6:.1f} MB) per repetition")
    print(f"elapsed {elapsed:.1f} s")
    if elapsed > TIME_BUDGET_S:
        print(f"warning: took longer than the {TIME_BUDGET_S:.0f} s budget")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

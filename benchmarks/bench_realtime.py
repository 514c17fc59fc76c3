"""P13: no FIFO overflow beside busy neighbours, with the physical 1 MiB FIFOs.

Four digitizers at 5000 events/s per channel with 200-sample traces (about
90 MB/s offered; a 1 MiB FIFO then fills in about 46 ms) run for ``--seconds``
into `dgs-receiver` writing GEB files, twice on one IOC: first on a quiet host
(the baseline), then with one pure-Python spin loop per core running beside it
for the whole run. The figure is the longest gap between two polls of a board
(``DAQC01_CV_ScanGapMax``) with the neighbours; it passes when that gap stays
under the FIFO fill time and the run overflowed no FIFO (``SIM_Dropped`` = 0),
cleared no event (``SIM_Cleared`` = 0) and lost nothing on the way to the files.
The IOC runs with ``[crate.inloop]`` real-time settings given on the command line,
and the simulated boards' crate process (`dgs-sim`) under the real-time policy
too (``--sim-priority``), since the hardware it stands for makes its events on
time whatever the host does.

    .venv/bin/python benchmarks/bench_realtime.py [--seconds 60] [--priority 50]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_end_to_end import (
    P3_SAMPLES,
    TMPFS,
    RunResult,
    event_bytes,
    one_run,
)
from common import BenchIoc, Figure, crate_config, demo_boards, fill_tmpfs, finish

#: The physical digitizer FIFO: 256 K words.
PHYSICAL_FIFO_WORDS = 1 << 18
RATE_HZ = 5000.0
CHANNELS = 10
#: A neighbour spins at most this much longer than the run it disturbs.
NEIGHBOUR_MARGIN_S = 120.0
SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@dataclass
class Condition:
    """One run of the benchmark and what the IOC reported about its timing."""

    neighbours: int
    run: RunResult
    scan_gap_max_ms: float
    fifo_peak_percent: dict[str, float]
    cleared_events: int

    @property
    def clean(self) -> bool:
        return self.run.lossless and self.cleared_events == 0

    def summary(self) -> str:
        peak = max(self.fifo_peak_percent.values(), default=0.0)
        return (f"{self.neighbours} neighbours: gap {self.scan_gap_max_ms:.1f} ms, FIFO peak "
                f"{peak:.0f} %, {self.run.dropped_events} events dropped at full FIFOs, "
                f"{self.cleared_events} cleared, {self.run.received_mb_s:.1f} MB/s into files, "
                f"IOC {self.run.ioc_cores:.2f} cores"
                + ("" if self.run.lossless else f" - LOSS: {self.run.loss()}"))


@contextlib.contextmanager
def neighbours(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy Python processes for the block (each bounded in time), ended by PID."""
    limit = seconds + NEIGHBOUR_MARGIN_S
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(limit=limit)],
                              stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(10)


def measure(ioc: BenchIoc, count: int, seconds: float, out_dir: Path) -> Condition:
    offered = 4 * CHANNELS * RATE_HZ * event_bytes(P3_SAMPLES) / 1e6
    with neighbours(count, seconds):
        run = one_run(ioc, P3_SAMPLES, offered, seconds, out_dir)
        boards = list(demo_boards())
        values = ioc.values("DAQC01_CV_ScanGapMax",
                            *(f"VME01:{name}:FifoPeak" for name in boards),
                            *(f"VME01:{name}:SIM_Cleared" for name in boards))
    return Condition(
        neighbours=count,
        run=run,
        scan_gap_max_ms=values[0],
        fifo_peak_percent=dict(zip(boards, values[1 : 1 + len(boards)])),
        cleared_events=int(sum(values[1 + len(boards) :])),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--seconds", type=float, default=60.0, help="generation time of a run")
    parser.add_argument("--neighbours", type=int, default=os.cpu_count() or 2,
                        help="busy processes beside the IOC (default: one per core)")
    parser.add_argument("--priority", type=int, default=50,
                        help="[crate.inloop] realtime_priority (0: normal policy)")
    parser.add_argument("--sim-priority", type=int, default=60,
                        help="[[crate]] sim_realtime_priority: the simulated boards make their "
                             "events on time, as hardware does (0: normal policy)")
    parser.add_argument("--switch-interval", type=float, default=0.001, metavar="SECONDS",
                        help="[crate.inloop] run_switch_interval_s (0: the interpreter's 5 ms)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    inloop = {"realtime_priority": args.priority,
              "run_switch_interval_s": args.switch_interval}
    workdir = Path(tempfile.mkdtemp(prefix="bench-rt-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-rt-", dir=TMPFS if TMPFS.is_dir() else None))
    fill_s = PHYSICAL_FIFO_WORDS * 4 / (CHANNELS * RATE_HZ * event_bytes(P3_SAMPLES))
    try:
        fill_tmpfs(out_dir, 4 * CHANNELS * RATE_HZ * event_bytes(P3_SAMPLES) * args.seconds)
        config = crate_config(workdir / "p13.toml", fifo_words=PHYSICAL_FIFO_WORDS,
                              event_rate_hz=RATE_HZ, trace_samples=P3_SAMPLES, inloop=inloop,
                              crate_keys={"sim_realtime_priority": args.sim_priority})
        with BenchIoc(["--config", str(config)], workdir) as ioc:
            quiet = measure(ioc, 0, args.seconds, out_dir)
            busy = measure(ioc, args.neighbours, args.seconds, out_dir)
            realtime = ioc.get("DAQC01_CV_RealTime")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    figure = Figure(
        id="P13",
        what=(f"longest board poll gap, 4 x {RATE_HZ:g} Hz/ch, 1 MiB FIFOs, "
              f"{args.neighbours} busy neighbours"),
        value=busy.scan_gap_max_ms,
        unit="ms",
        baseline=quiet.scan_gap_max_ms,
        baseline_what="quiet host",
        target=round(fill_s * 1000.0, 1),
        higher_is_better=False,
        conditions_met=busy.clean and quiet.clean,
        note=(f"{args.seconds:g} s per run, inLoop real-time {realtime} (priority "
              f"{args.priority}), crate process priority {args.sim_priority}, switch interval "
              f"{args.switch_interval * 1000:g} ms; "
              f"{quiet.summary()}; {busy.summary()}; target: the FIFO fill time, and no "
              "event dropped, cleared or lost"),
    )
    details = {name: {**asdict(cond), "run": asdict(cond.run)}
               for name, cond in (("quiet", quiet), ("busy", busy))}
    return finish(args.json, "P13", [figure], started, **details)


if __name__ == "__main__":
    sys.exit(main())

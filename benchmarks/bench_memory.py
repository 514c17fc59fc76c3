"""P7: resident memory of the crate IOC with its 200 x 1 MiB pool, after runs at load (spec 06).

The demo crate (default 1 MiB FIFOs, 200-sample events) runs at about
150 MB/s with a receiver for a short run, stops, and the IOC's resident set
(VmRSS) is read; the figure is the median over the repetitions, and the peak
(VmHWM) is reported too. The baseline, measured in the same run: the bare
pythonSoftIOC process (`bare_ioc.py`) serving as many records and holding the
same pool.

The locked memory (VmLck) is reported too: EPICS's iocInit locks the whole
address space (mlockall) when real-time scheduling is available (root),
which makes every thread stack and malloc arena resident; the crate IOC and
the bare baseline both switch that off.

    .venv/bin/python benchmarks/bench_memory.py [--json FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_end_to_end import CHANNELS, TMPFS, event_bytes, one_run
from common import (
    BareIoc,
    BenchIoc,
    Figure,
    crate_config,
    finish,
    median,
    proc_rss_bytes,
    proc_status_bytes,
)

RSS_TARGET_MB = 350.0
LOAD_MB_S = 150.0
SAMPLES = 200
RUN_SECONDS = 1.5


def measure(workdir: Path, out_dir: Path, repeat: int) -> dict:
    """RSS of the crate IOC after each loaded run, and of the bare IOC with the pool."""
    rate = LOAD_MB_S * 1e6 / (4 * CHANNELS * event_bytes(SAMPLES))
    config = crate_config(workdir / "memory.toml", fifo_words=262144, event_rate_hz=rate,
                          trace_samples=SAMPLES)
    with BareIoc(workdir, pool=True) as bare:
        bare_rss = proc_rss_bytes(bare.pid)
        bare_locked = proc_status_bytes(bare.pid, "VmLck")
    with BenchIoc(["--config", str(config)], workdir) as ioc:
        at_start = proc_rss_bytes(ioc.pid)
        after_runs = []
        received = []
        for _ in range(repeat):
            run = one_run(ioc, SAMPLES, LOAD_MB_S, RUN_SECONDS, out_dir)
            received.append(run.received_mb_s)
            after_runs.append(proc_rss_bytes(ioc.pid))
        peak = proc_status_bytes(ioc.pid, "VmHWM")
        locked = proc_status_bytes(ioc.pid, "VmLck")
    return {
        "rss_at_start_mb": at_start / 1e6,
        "rss_after_runs_mb": [value / 1e6 for value in after_runs],
        "peak_rss_mb": peak / 1e6,
        "locked_mb": locked / 1e6,
        "received_mb_s": received,
        "bare_rss_mb": bare_rss / 1e6,
        "bare_locked_mb": bare_locked / 1e6,
    }


def figure_of(result: dict) -> Figure:
    return Figure(
        id="P7",
        what="RSS after runs at load, 200 x 1 MiB pool",
        value=median(result["rss_after_runs_mb"]),
        unit="MB",
        baseline=result["bare_rss_mb"],
        baseline_what="bare softIOC + pool",
        target=RSS_TARGET_MB,
        higher_is_better=False,
        runs=result["rss_after_runs_mb"],
        note=(f"at start {result['rss_at_start_mb']:.0f} MB, peak {result['peak_rss_mb']:.0f} MB, "
              f"locked {result['locked_mb']:.0f} MB (baseline: {result['bare_locked_mb']:.0f}); "
              f"load {median(result['received_mb_s']):.0f} MB/s received"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="loaded runs (median; >= 5)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    repeat = max(5, args.repeat)
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=TMPFS if TMPFS.is_dir() else None))
    try:
        result = measure(workdir, out_dir, repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    figure = figure_of(result)
    return finish(args.json, "P7", [figure], started, measurement=result)


if __name__ == "__main__":
    sys.exit(main())

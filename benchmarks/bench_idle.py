"""P6: CPU of the crate IOC when idle but running (spec 06).

The demo crate with every board enabled at ``SIM_EventRate`` 0: a run is
started, a receiver (the product's client, in its own process, 6 requests in
flight) is connected and answered with INSUFF_DATA, and the IOC's CPU time
(user + system, all threads, from /proc/<pid>/stat) is sampled over
consecutive windows. The figure is the median window in % of one core. The
baseline, measured at the same time: the bare pythonSoftIOC process
(`bare_ioc.py`) serving as many records, doing nothing else.

    .venv/bin/python benchmarks/bench_idle.py [--json FILE] [--repeat N] [--window S]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    BareIoc,
    BenchIoc,
    Figure,
    crate_config,
    finish,
    median,
    proc_cpu_seconds,
)

TARGET_PERCENT = 5.0
SETTLE_S = 1.0


def cpu_windows(pids: dict[str, int], windows: int, seconds: float) -> dict[str, list[float]]:
    """% of one core used by each process in each of ``windows`` consecutive windows."""
    result: dict[str, list[float]] = {name: [] for name in pids}
    before = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    for _ in range(windows):
        time.sleep(seconds)  # the measuring window itself
        now = time.monotonic()
        for name, pid in pids.items():
            used = proc_cpu_seconds(pid)
            result[name].append(100.0 * (used - before[name]) / (now - start))
            before[name] = used
        start = now
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="windows (median; >= 5)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window")
    args = parser.parse_args(argv)
    started = time.monotonic()
    repeat = max(5, args.repeat)
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    receiver = None
    try:
        config = crate_config(workdir / "idle.toml", fifo_words=262144, event_rate_hz=0.0,
                              trace_samples=200)
        with BareIoc(workdir) as bare, BenchIoc(["--config", str(config)], workdir) as ioc:
            ioc.start_run()
            receiver = subprocess.Popen(
                [sys.executable, "-m", "receiver.client", f"127.0.0.1:{ioc.ports.data}",
                 "--seconds", str(repeat * args.window + 30), "--interval", "1000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
            )
            ioc.wait_value("DAQC01_CV_SenderRunning", "Running")
            time.sleep(SETTLE_S)  # let start-up work (first publications) pass
            pids = {"ioc": ioc.pid, "bare": bare.pid, "receiver": receiver.pid}
            windows = cpu_windows(pids, repeat, args.window)
            replies = ioc.getf("DAQC01_CV_SenderReplies")
            ioc.stop_run()
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.terminate()
            receiver.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    figure = Figure(
        id="P6",
        what="idle: running, receiver connected, SIM_EventRate 0",
        value=median(windows["ioc"]),
        unit="% core",
        baseline=median(windows["bare"]),
        baseline_what="bare softIOC",
        target=TARGET_PERCENT,
        higher_is_better=False,
        runs=windows["ioc"],
        note=(f"{repeat} windows of {args.window:g} s; {replies:.0f} data replies (the 0xE "
              f"empty headers); receiver process {median(windows['receiver']):.1f} % core"),
    )
    return finish(args.json, "P6", [figure], started, windows=windows)


if __name__ == "__main__":
    sys.exit(main())

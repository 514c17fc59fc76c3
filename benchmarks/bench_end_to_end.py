"""P3: end to end, simulated crate -> IOC -> the product's receiver (spec 06), and the sweep.

P3: the demo crate (4 digitizers, 200-sample events) offers a little more
than the 300 MB/s target for a few seconds per run; a receiver in its own
process pulls the data and (with the GEB writer present) writes GEB files to
tmpfs. A run passes when every generated event arrived (per board), no FIFO
overflowed (``SIM_Dropped`` = 0, no overflow type-F header) and no buffer was
lost. The figure is the receiver's payload rate from its first to its last
data reply; the baseline is P1's bare request/reply server (same reply size,
same pipeline, null receiver), measured in the same run. The sim FIFOs are
enlarged to 16 MiB per board for this run (spec 06 allows it) so a scheduling
hiccup of the 2-core machine does not count as an overflow.

The sweep (for the plot): the same path with header-only, 50, 200, 500 and
992-sample events, the sim offering more than the path carries; the figure is
what the receiver gets (overflows expected and counted).

    .venv/bin/python benchmarks/bench_end_to_end.py [--json FILE] [--repeat N] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    BenchIoc,
    Figure,
    crate_config,
    demo_boards,
    median,
    print_table,
    proc_cpu_seconds,
    write_json,
)

from ioc.packets import HEADER_WORDS

P3_TARGET_MB_S = 300.0
#: P3 offers this much (a little above the target), so the figure can show it was met.
P3_OFFERED_MB_S = 330.0
P3_SAMPLES = 200
SWEEP_SAMPLES = (0, 50, 200, 500, 992)
#: Sweep: offered load, far above what the path carries, capped by the sim's rate limit.
SWEEP_OFFERED_MB_S = 1500.0
MAX_RATE_HZ = 1_000_000.0
#: 16 MiB per board (the physical FIFO is 1 MiB).
FIFO_WORDS = 1 << 22
CHANNELS = 10
PIPELINE = 6
RECEIVER_TIMEOUT_S = 60.0
GEB_DIR_PARENT = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


def event_bytes(samples: int) -> int:
    return 4 * (HEADER_WORDS + samples // 2)


def rate_for(mb_s: float, samples: int, boards: int = 4) -> float:
    """Per-channel event rate that makes the crate offer ``mb_s``."""
    return min(MAX_RATE_HZ, mb_s * 1e6 / (boards * CHANNELS * event_bytes(samples)))


# ----------------------------------------------------------------- receivers


def receive(port: int, timeout: float) -> dict:
    """The client receiver (receiver.client): pull until every board sent its 0xD."""
    from ioc.decoder import KIND_TYPE_F
    from ioc.packets import CH_ERROR, EVENT_TYPE_OVERFLOW
    from receiver.client import Receiver

    marks = {"first_ns": 0, "first_bytes": 0, "last_ns": 0, "last_bytes": 0}

    def on_reply(tally) -> None:
        if tally.payload_bytes != marks["last_bytes"]:
            now = time.monotonic_ns()
            if not marks["first_ns"]:
                marks["first_ns"], marks["first_bytes"] = now, tally.payload_bytes
            marks["last_ns"], marks["last_bytes"] = now, tally.payload_bytes

    receiver = Receiver("127.0.0.1", port, pipeline=PIPELINE, connect_timeout=30.0,
                        read_timeout=30.0)
    tally = receiver.run(max_seconds=timeout, on_reply=on_reply)
    boards = {}
    for board, log in tally.boards.items():
        events = log.events
        overflow = (events["kind"] == KIND_TYPE_F) & (events["channel"] == CH_ERROR)
        overflow &= events["event_type"] == EVENT_TYPE_OVERFLOW
        boards[board] = {"events": int(log.data_events.size), "end_of_run": log.end_of_run,
                         "overflows": int(overflow.sum())}
    return {"kind": "client", "payload_bytes": tally.payload_bytes, "boards": boards,
            "all_done": tally.all_done, "cpu_s": time.process_time(), **marks}


class ReceiverProcess:
    """The receiver in its own process (like a real one); it reports JSON on stdout."""

    def __init__(self, port: int, timeout: float = RECEIVER_TIMEOUT_S) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--receive", str(port),
             "--receive-timeout", str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )

    def result(self, timeout: float = RECEIVER_TIMEOUT_S + 10) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"receiver failed ({self.proc.returncode}): {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- one run


@dataclass
class RunResult:
    samples: int
    offered_mb_s: float
    received_mb_s: float
    received_events: int
    generated_events: int
    dropped_events: int
    overflow_headers: int
    buffers_lost: float
    all_done: bool
    ioc_cores: float
    receiver_cores: float

    @property
    def lossless(self) -> bool:
        return (self.all_done and self.received_events == self.generated_events
                and self.dropped_events == 0 and self.overflow_headers == 0
                and self.buffers_lost == 0)


def exact(ioc: BenchIoc, name: str) -> float:
    """A counter read over PV Access (exact for large numbers)."""
    return float(ioc.pva(name))


def one_run(ioc: BenchIoc, samples: int, offered_mb_s: float, seconds: float) -> RunResult:
    """Start a run, let the crate generate for ``seconds``, stop, and account every event."""
    receiver = ReceiverProcess(ioc.ports.data)
    ioc_cpu_before, wall_before = proc_cpu_seconds(ioc.pid), time.monotonic()
    ioc.start_run()
    time.sleep(seconds)  # the measured run itself, not a wait for readiness
    ioc.stop_run()
    report = receiver.result()
    wall = time.monotonic() - wall_before
    ioc_cores = (proc_cpu_seconds(ioc.pid) - ioc_cpu_before) / wall
    generated = dropped = 0
    for name in demo_boards():
        generated += int(exact(ioc, f"VME01:{name}:SIM_Generated"))
        dropped += int(exact(ioc, f"VME01:{name}:SIM_Dropped"))
    boards = report["boards"].values()
    span_s = (report["last_ns"] - report["first_ns"]) / 1e9
    moved = report["last_bytes"] - report["first_bytes"]
    return RunResult(
        samples=samples,
        offered_mb_s=offered_mb_s,
        received_mb_s=moved / span_s / 1e6 if span_s > 0 else 0.0,
        received_events=sum(board["events"] for board in boards),
        generated_events=generated,
        dropped_events=dropped,
        overflow_headers=sum(board["overflows"] for board in boards),
        buffers_lost=exact(ioc, "DAQC01_OL_TotalBufsLost"),
        all_done=report["all_done"],
        ioc_cores=ioc_cores,
        receiver_cores=report["cpu_s"] / span_s if span_s > 0 else 0.0,
    )


def set_load(ioc: BenchIoc, samples: int, rate_hz: float) -> None:
    for name in demo_boards():
        ioc.put_ok(f"VME01:{name}:SIM_TraceLength", samples)
        ioc.put_ok(f"VME01:{name}:SIM_EventRate", f"{rate_hz:.1f}")


# ----------------------------------------------------------------- baseline


def bare_server_mb_s(repeat: int, seconds: float) -> list[float]:
    """P1's bare request/reply server to a null receiver in another process (same pipeline)."""
    import bench_sender

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = context.Process(target=bench_sender._receiver_worker, args=(theirs,), daemon=True)
    worker.start()
    server = bench_sender.BareServer(bench_sender.SenderConfig().max_segment)
    results = []
    try:
        for _ in range(repeat):
            ours.send(("127.0.0.1", server.port, PIPELINE, seconds))
            results.append(ours.recv()["mb_s"])
        ours.send(None)
        worker.join(5)
    finally:
        server.close()
        if worker.is_alive():
            worker.kill()
    return results


# --------------------------------------------------------------------- main


def run_p3(workdir: Path, repeat: int, seconds: float) -> tuple[list[RunResult], float]:
    rate = rate_for(P3_OFFERED_MB_S, P3_SAMPLES)
    config = crate_config(workdir / "p3.toml", fifo_words=FIFO_WORDS, event_rate_hz=rate,
                          trace_samples=P3_SAMPLES)
    with BenchIoc(["--config", str(config)], workdir) as ioc:
        runs = [one_run(ioc, P3_SAMPLES, P3_OFFERED_MB_S, seconds) for _ in range(repeat)]
    return runs, rate


def run_sweep(workdir: Path, seconds: float) -> list[RunResult]:
    config = crate_config(workdir / "sweep.toml", fifo_words=FIFO_WORDS, event_rate_hz=0.0,
                          trace_samples=P3_SAMPLES)
    results = []
    with BenchIoc(["--config", str(config)], workdir) as ioc:
        for samples in SWEEP_SAMPLES:
            rate = rate_for(SWEEP_OFFERED_MB_S, samples)
            set_load(ioc, samples, rate)
            offered = rate * 4 * CHANNELS * event_bytes(samples) / 1e6
            results.append(one_run(ioc, samples, offered, seconds))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="P3 runs (median; >= 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="generation time of a run")
    parser.add_argument("--no-sweep", action="store_true", help="skip the event-size sweep")
    parser.add_argument("--receive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--receive-timeout", type=float, default=RECEIVER_TIMEOUT_S,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        print(json.dumps(receive(args.receive, args.receive_timeout)), flush=True)
        return 0
    started = time.monotonic()
    repeat = max(5, args.repeat)
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        baseline_runs = bare_server_mb_s(repeat, 1.0)
        runs, rate = run_p3(workdir, repeat, args.seconds)
        sweep = [] if args.no_sweep else run_sweep(workdir, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lossless = all(run.lossless for run in runs)
    losses = [f"run {n}: {run}" for n, run in enumerate(runs) if not run.lossless]
    figure = Figure(
        id="P3",
        what=f"end to end, 4 digitizers, {P3_SAMPLES}-sample events, client receiver",
        value=median(run.received_mb_s for run in runs),
        unit="MB/s",
        baseline=median(baseline_runs),
        baseline_what="bare server",
        target=P3_TARGET_MB_S,
        runs=[run.received_mb_s for run in runs],
        conditions_met=lossless,
        note=(f"offered {P3_OFFERED_MB_S:g} MB/s ({rate:.0f} Hz/channel), FIFOs "
              f"{FIFO_WORDS * 4 >> 20} MiB per board; "
              + ("nothing lost, 0 overflows" if lossless else "LOSS: " + "; ".join(losses))),
    )
    print_table([figure])
    for point in sweep:
        print(f"  sweep {point.samples:4d} samples: offered {point.offered_mb_s:7.1f} MB/s, "
              f"received {point.received_mb_s:7.1f} MB/s, dropped {point.dropped_events}, "
              f"overflow headers {point.overflow_headers}")
    elapsed = time.monotonic() - started
    print(f"elapsed {elapsed:.1f} s")
    write_json(args.json, "P3", [figure], elapsed_s=elapsed,
               runs=[vars(run) for run in runs], baseline_runs_mb_s=baseline_runs,
               sweep=[{**vars(point), "event_bytes": event_bytes(point.samples)}
                      for point in sweep])
    return 0 if figure.passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The IOC's CPU with the simulated crate in process and as its own process (issue 15).

The demo crate's four digitizers at RATE events/s per channel, one run with a
receiver (the project's client, 6 requests in flight) taking everything; after
2 s of warm-up the CPU time (user + system, /proc/<pid>/stat) of the IOC and of
its crate process is measured over SECONDS, then `DAQC01_CV_ScanGapMax`, each
board's `FifoPeak` and the simulator's dropped / cleared counts are read.

    .venv/bin/python benchmarks/bench_backend_cpu.py sim 500 20
    .venv/bin/python benchmarks/bench_backend_cpu.py sim-inprocess 5000 15
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from common import proc_cpu_seconds  # also puts tests/ on sys.path
from dataflow import DEMO_SPECS, Background, crate_toml, receiver, start_run, stop_run
from ioc_harness import IocProcess, Ports

WARM_UP_S = 2.0


def crate_children(pid: int) -> list[int]:
    """The crate processes the IOC ``pid`` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if parent == pid and b"sim.process" in cmdline:
                found.append(int(entry.name))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=("sim", "sim-inprocess"))
    p.add_argument("rate", type=float, help="events/s per channel")
    p.add_argument("seconds", type=float, help="measurement window")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    ports = Ports.allocate()
    specs = tuple(dataclasses.replace(spec, rate_hz=args.rate) for spec in DEMO_SPECS)
    config = workdir / "crate.toml"
    config.write_text(crate_toml(specs).replace(
        "seed = 1\n", f'seed = 1\nbackend = "{args.backend}"\n', 1))
    argv = ["--config", str(config), "--data-port", str(ports.data),
            "--state-dir", str(workdir / "state")]
    ioc = IocProcess(argv, workdir, ports).start()
    try:
        pids = {"IOC": ioc.proc.pid}
        for pid in crate_children(ioc.proc.pid):
            pids["crate process"] = pid
        rx = Background(receiver(ioc, pipeline=6), max_seconds=args.seconds + 60)
        start_run(ioc)
        time.sleep(WARM_UP_S)
        before = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        began = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - began
        cpu = {name: 100 * (proc_cpu_seconds(pid) - before[name]) / elapsed
               for name, pid in pids.items()}
        boards = [spec.name for spec in specs]
        gap = ioc.get("DAQC01_CV_ScanGapMax")
        peaks = [ioc.get(f"VME01:{board}:FifoPeak") for board in boards]
        dropped = [ioc.get(f"VME01:{board}:SIM_Dropped") for board in boards]
        cleared = [ioc.get(f"VME01:{board}:SIM_Cleared") for board in boards]
        stop_run(ioc)
        rx.join(60)
    finally:
        ioc.kill()
    shares = ", ".join(f"{name} CPU {value:.1f} %" for name, value in cpu.items())
    print(f"{args.backend} at {args.rate:g}/s/ch: {shares}; ScanGapMax {gap} ms; "
          f"FifoPeak {peaks} %; dropped {dropped}; cleared {cleared}; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

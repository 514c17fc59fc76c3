"""Run `dgs-ioc` and print its crate clock origin, for the latency benchmark (P5).

Events carry crate timestamps (10 ns ticks since the origin); the origin is
``time.monotonic_ns()`` in the IOC process, and CLOCK_MONOTONIC is one clock
for every process on a Linux host, so a receiver in another process can turn a
timestamp into the moment the event entered its FIFO. The IOC does not print
the origin itself, so this launcher gives the simulated crate a clock that
announces it on creation; everything else is the unchanged `dgs-ioc`.

    python benchmarks/launch_ioc.py <dgs-ioc arguments>
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sim.crate
from ioc.main import main
from sim.clock import MonotonicClock


class AnnouncedClock(MonotonicClock):
    """The crate's real-time clock, printing its origin once created."""

    def __init__(self, origin_ns: int | None = None) -> None:
        super().__init__(origin_ns)
        print(f"launch_ioc: crate clock origin {self.origin_ns()} ns", flush=True)


if __name__ == "__main__":
    sim.crate.MonotonicClock = AnnouncedClock
    sys.exit(main())

"""Rate PVs across consecutive runs: never negative, as camonitor sees every update.

Each run zeroes the byte counters; a rate computed against the previous run's
totals would read negative at the start of every run but the first.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from dataflow import CRATE, Background, Pva, begin_over_pva, end_over_pva, epics_tool, receiver
from dataflow import ioc_process as crate_process
from ioc_harness import IocProcess

RUNS = 3
RATE_PVS = (
    *(f"DAQC{CRATE}_OL_DataRate{card}" for card in range(4)),
    f"DAQC{CRATE}_CV_SendRate",
    f"DAQC{CRATE}_CV_SenderWireRate",
)


@pytest.fixture
def crate(tmp_path) -> Iterator[IocProcess]:
    with crate_process(tmp_path, "--demo") as ioc:
        yield ioc


def monitor_updates(output: str) -> dict[str, list[float]]:
    """camonitor's lines ("NAME VALUE" with -t n) by PV name."""
    updates: dict[str, list[float]] = {name: [] for name in RATE_PVS}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] in updates:
            updates[fields[0]].append(float(fields[1]))
    return updates


def test_no_rate_is_ever_negative_over_consecutive_runs(crate):
    camonitor = subprocess.Popen(
        [epics_tool("camonitor"), "-t", "n", "-w", "5", *RATE_PVS],
        env=crate.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with Pva(crate) as pva:
            for _ in range(RUNS):
                rx = Background(receiver(crate), max_seconds=60)
                begin_over_pva(pva)
                for name in RATE_PVS:
                    pva.wait(name, lambda rate: rate > 0, 15, f"{name} > 0")
                end_over_pva(pva)
                rx.join(60)
                for name in RATE_PVS[:5]:  # rates return to 0 once the crate has stopped
                    pva.wait(name, lambda rate: rate == 0, 5, f"{name} back to 0")
    finally:
        camonitor.terminate()
        output, _ = camonitor.communicate(timeout=10)
    updates = monitor_updates(output)
    for name, values in updates.items():
        assert values, f"camonitor saw no update of {name}:\n{output}"
        assert sum(1 for v in values if v > 0) >= RUNS, f"{name} not positive in every run"
        negative = [v for v in values if v < 0]
        assert not negative, f"{name} went negative: {negative}"

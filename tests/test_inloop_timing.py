"""inLoop's timing figures on a running IOC: ScanGapMax and each board's FifoPeak.

They tell an operator how close the crate came to losing data this run: how
long a FIFO went without being looked at, and how full each FIFO got. A board
whose FIFO is too small for its rate must stand out (an alarm), a healthy one
must not, and both figures start afresh at every Start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dataflow import CRATE, BoardSpec, Pva, write_config
from dataflow import ioc_process as crate_process
from ioc_harness import IocProcess

from sim import Fault

NO_ALARM, MINOR, MAJOR = 0, 1, 2
#: 64 KiB at 1000 events/s per channel with 200-sample traces: full in about 14 ms.
SMALL_FIFO_WORDS = 16384
BOARDS = (
    BoardSpec("MDIG1", 0, 3, 101),  # the physical 1 MiB FIFO at the demo rate
    BoardSpec("MDIG2", 1, 4, 102, rate_hz=1000.0, fifo_words=SMALL_FIFO_WORDS),
)
GAP = f"DAQC{CRATE}_CV_ScanGapMax"
STATE = f"DAQC{CRATE}_CV_State"


def peak(board: str) -> str:
    return f"VME{CRATE}:{board}:FifoPeak"


@pytest.fixture
def crate(tmp_path) -> Iterator[IocProcess]:
    config = write_config(tmp_path, BOARDS)
    with crate_process(tmp_path, "--config", str(config)) as ioc:
        yield ioc


def start(pva: Pva) -> None:
    """Start without saving: inLoop reads every FIFO all the same."""
    pva.put("Online_CS_SaveData", 0)
    pva.put("Online_CS_StartStop", 1)
    pva.wait(STATE, lambda v: v == 1, 15, "Running")


def stop(pva: Pva) -> None:
    pva.put("Online_CS_StartStop", 0)
    pva.wait(STATE, lambda v: v == 0, 30, "Stopped")


def test_gap_and_fifo_peaks_show_the_run_and_start_afresh(crate):
    with Pva(crate) as pva:
        start(pva)
        gap = pva.wait(GAP, lambda ms: ms > 0, 15, "a gap between polls")
        healthy = pva.wait(peak("MDIG1"), lambda p: p > 0, 15, "MDIG1 data seen")
        tight = pva.wait(peak("MDIG2"), lambda p: p >= 80, 15, "MDIG2 close to full")
        assert gap < 1000
        assert healthy < 80 and pva.get(peak("MDIG1")).severity == NO_ALARM
        assert tight <= 100 and pva.get(peak("MDIG2")).severity in (MINOR, MAJOR)

        pva.put(f"VME{CRATE}:MDIG1:SIM_Fault", int(Fault.FIFO_OVERFLOW))
        pva.wait(peak("MDIG1"), lambda p: p == 100, 15, "MDIG1 full")
        assert pva.get(peak("MDIG1")).severity == MAJOR
        stop(pva)
        assert pva.number(peak("MDIG1")) == 100, "the figures stay until the next Start"

        start(pva)
        pva.wait(peak("MDIG1"), lambda p: 0 < p < 80, 15, "MDIG1 peak of the new run")
        assert pva.get(peak("MDIG1")).severity == NO_ALARM
        assert 0 < pva.wait(GAP, lambda ms: ms > 0, 15, "a gap in the new run") < 1000
        stop(pva)

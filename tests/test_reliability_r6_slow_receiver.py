"""R6 (spec 06, as the retention issue redefines it): a deliberately slow receiver.

The receiver takes one reply every 0.2 s while the crate produces about 36 MB/s:
qSender fills up to the memory budget (at least 180 MiB of event data, not 100
buffers), and only then are whole buffers discarded, counted per board in bytes
and events (`OL_LostMemory`, `OL_LostEventsMemory`, `OL_DataLost<card>`) and in
`TotalBufsLost` / `BufLostPerecnt`. No FIFO overflows meanwhile. Then the
receiver speeds up: qSender empties and the losses stop. At the end, per board,
what the receiver did not get is exactly what was counted as lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from dataflow import (
    BOARDS,
    CRATE,
    EVENT_BYTES,
    KIB,
    TYPE_F_BYTES,
    Background,
    Pva,
    assert_end_of_run_last_and_once,
    assert_pool_whole,
    data_keys,
    ioc_process,
    receiver,
    sim_figures,
    stop_run,
)
from ioc_harness import IocProcess, wait_until

SLOW_REPLY_S = 0.2
RATE_HZ = 2000
MIB = 1 << 20


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r6")
    with ioc_process(workdir, "--demo") as ioc:
        yield ioc


def test_a_slow_receiver_fills_the_memory_budget_losses_are_exact_and_it_recovers(crate):
    ioc = crate
    slow = threading.Event()
    slow.set()

    def pace(_tally) -> None:
        if slow.is_set():
            time.sleep(SLOW_REPLY_S)

    pva = Pva(ioc)
    for name in BOARDS:
        pva.put(f"VME{CRATE}:{name}:SIM_EventRate", RATE_HZ)
    rx = Background(receiver(ioc, pipeline=1), max_seconds=120, on_reply=pace)
    pva.put("Online_CS_SaveData", 1)
    pva.put("Online_CS_StartStop", 1)
    pva.wait(f"DAQC{CRATE}_OL_TotalBufsLost", lambda v: v > 0, 60, "the first discard")
    retained = pva.number(f"DAQC{CRATE}_CV_Retained")
    assert retained >= 180, f"discarding began with only {retained:.1f} MiB kept"
    first = pva.number(f"DAQC{CRATE}_OL_TotalBufsLost")
    pva.wait(f"DAQC{CRATE}_OL_TotalBufsLost", lambda v: v > first + 20, 30,
             "losses while the receiver stays slow")
    assert pva.number(f"DAQC{CRATE}_CV_Retained") <= 184 + 1

    slow.clear()
    pva.wait(f"DAQC{CRATE}_CV_Retained", lambda v: v < 5, 60, "qSender emptied")
    lost_at_recovery = pva.number(f"DAQC{CRATE}_OL_TotalBufsLost")
    percent_at_recovery = pva.number(f"DAQC{CRATE}_OL_BufLostPerecnt")
    time.sleep(2.0)  # a while of keeping up: nothing more may be lost
    assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == lost_at_recovery
    assert pva.number(f"DAQC{CRATE}_OL_BufLostPerecnt") < percent_at_recovery
    stop_run(ioc)
    tally = rx.join(90)

    assert tally.all_done
    lost_bytes = pva.get(f"DAQC{CRATE}_OL_LostMemory")
    lost_events = pva.get(f"DAQC{CRATE}_OL_LostEventsMemory")
    for card, (name, bid) in enumerate(BOARDS.items()):
        figures = sim_figures(pva, name)
        assert (figures.dropped, figures.cleared) == (0, 0), f"{name}: FIFO overflow"
        events = tally.boards[bid].events
        assert_end_of_run_last_and_once(events)
        missing = figures.generated - data_keys(events).size
        assert missing > 0, f"{name}: nothing lost, the budget was never reached"
        assert missing == lost_events[card], f"{name}: lost events miscounted"
        counted = round(lost_bytes[card] * MIB / KIB) * KIB
        # Discarded buffers may hold the odd 16-byte type-F header besides events.
        assert counted - KIB < missing * EVENT_BYTES + TYPE_F_BYTES * 8, name
        assert missing * EVENT_BYTES <= counted + KIB, name
        assert pva.number(f"DAQC{CRATE}_OL_DataLost{card}") == pytest.approx(
            lost_bytes[card], abs=1e-3
        )
    wait_until(lambda: pva.number(f"DAQC{CRATE}_CV_BuffersAvail") == 200, 20, "pool whole")
    pva.close()
    assert_pool_whole(ioc)

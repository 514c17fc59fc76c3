"""R6 (spec 06): a deliberately slow receiver.

The receiver takes one reply every 0.2 s while the demo crate produces about
200 buffers a second: qSender fills up to the bypass threshold (qSender + batch
> 100, spec 02 §3) and stays there, and from then on whole batches go back to
qFree unsent, counted per board (`OL_DataLost<card>`) and in `TotalBufsLost` /
`BufLostPerecnt`. Then the receiver speeds up: qSender empties, the losses stop
and the percentage falls. At the end, per board, what the receiver did not get
is exactly what the bypass counted (to the KiB resolution of `OL_DataLost`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    lost_kib,
    receiver,
    sim_figures,
    start_run,
    stop_run,
)
from ioc_harness import IocProcess, wait_until

BYPASS_THRESHOLD = 100
SLOW_REPLY_S = 0.2
#: Buffers one 50-ms outLoop batch holds at the demo rate, with room for a busy machine.
BATCH_MARGIN = 15
SAMPLE_PERIOD_S = 0.1


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r6")
    with ioc_process(workdir, "--demo") as ioc:
        yield ioc


@dataclass(frozen=True)
class Sample:
    at: float
    in_sender: float
    lost: float
    written: float
    percent: float


class Sampler:
    """qSender and the loss counters, sampled in a thread."""

    NAMES = tuple(
        f"DAQC{CRATE}_{suffix}"
        for suffix in (
            "OL_NumSendBuffers", "OL_TotalBufsLost", "OL_TotalBufsWritten", "OL_BufLostPerecnt",
        )
    )

    def __init__(self, pva: Pva) -> None:
        self.pva = pva
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self.samples.append(Sample(time.monotonic(), *self.pva.numbers(*self.NAMES)))

    def first_loss(self) -> Sample | None:
        return next((s for s in self.samples if s.lost > 0), None)

    def since(self, start: float) -> list[Sample]:
        return [s for s in self.samples if s.at >= start]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_bypass_engages_at_the_threshold_counts_losses_and_recovers(crate):
    ioc = crate
    slow = threading.Event()
    slow.set()

    def pace(_tally) -> None:
        if slow.is_set():
            time.sleep(SLOW_REPLY_S)

    rx = Background(receiver(ioc, pipeline=1), max_seconds=120, on_reply=pace)
    pva = Pva(ioc)
    sampler = Sampler(pva)
    try:
        start_run(ioc)
        first_loss = wait_until(sampler.first_loss, 30, "the bypass engaged")
        before_loss = [s for s in sampler.samples if s.lost == 0]
        # It engaged only once qSender was (nearly) full, and qSender never went past it.
        assert max(s.in_sender for s in [*before_loss, first_loss]) >= (
            BYPASS_THRESHOLD - BATCH_MARGIN
        )
        engaged_at = time.monotonic()
        pva.wait(f"DAQC{CRATE}_OL_TotalBufsLost", lambda v: v > first_loss.lost + 20, 30,
                 "losses while the receiver stays slow")
        assert max(s.in_sender for s in sampler.samples) <= BYPASS_THRESHOLD
        assert min(s.in_sender for s in sampler.since(engaged_at)) >= (
            BYPASS_THRESHOLD - BATCH_MARGIN
        ), "qSender left the threshold while the receiver was slow"

        slow.clear()
        pva.wait(f"DAQC{CRATE}_OL_NumSendBuffers", lambda v: v < 10, 30, "qSender emptied")
        recovered_at = time.monotonic()
        lost_at_recovery = pva.number(f"DAQC{CRATE}_OL_TotalBufsLost")

        def losses_stopped() -> bool:
            window = sampler.since(recovered_at + 1.0)
            return len(window) >= 15 and all(s.lost == window[0].lost for s in window)

        wait_until(losses_stopped, 15, "no more losses once the receiver keeps up", 0.2)
        recovered = sampler.since(recovered_at + 1.0)
        assert all(s.in_sender < BYPASS_THRESHOLD / 2 for s in recovered)
        assert recovered[-1].percent < recovered[0].percent, "BufLostPerecnt did not fall"
        assert recovered[0].lost - lost_at_recovery < 2 * BATCH_MARGIN
        stop_run(ioc)
        tally = rx.join(90)
    finally:
        sampler.close()

    assert tally.all_done
    lost, written, percent = pva.numbers(*Sampler.NAMES[1:])
    assert percent == round(100.0 * lost / written, 4)
    type_f_built = pva.number(f"DAQC{CRATE}_CV_InLoop2")
    for card, (name, bid) in enumerate(BOARDS.items()):
        figures = sim_figures(pva, name)
        assert (figures.dropped, figures.cleared) == (0, 0), name
        events = tally.boards[bid].events
        assert_end_of_run_last_and_once(events)
        missing = figures.generated - data_keys(events).size
        lost_bytes = lost_kib(pva, card) * KIB
        assert lost_bytes > 0, f"{name}: no loss counted for this board"
        # The bypass recycles data buffers and the odd 16-byte type-F header of this board.
        assert lost_bytes - TYPE_F_BYTES * type_f_built <= missing * EVENT_BYTES, name
        assert missing * EVENT_BYTES <= lost_bytes + KIB - 1, name
    pva.close()
    assert_pool_whole(ioc)

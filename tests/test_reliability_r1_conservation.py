"""R1 (spec 06): buffer conservation under load and every injected fault.

A crate of four digitizers and a master trigger runs at several times the demo
rate while every `SIM_Fault` is injected on every board it applies to, a
receiver pauses long enough for the sender bypass to engage, and SaveData is
switched off and on mid-run. Throughout, `BuffersOK` is watched with a monitor
(every change) and sampled; it must never say "Leak". At the end every buffer
is back in qFree. A buffer that a stage forgets stays "held" without breaking
the audit, so the final whole-pool check is what catches that kind of leak.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from dataflow import (
    CRATE,
    DEMO_SPECS,
    POOL_SIZE,
    TRIGGER_SPEC,
    Background,
    BoardSpec,
    Pva,
    Watch,
    assert_pool_whole,
    ioc_process,
    receiver,
    sim_figures,
    start_run,
    stop_run,
    write_config,
)
from ioc_harness import IocProcess, wait_until

from sim.faults import PACKET_FAULTS, Fault

RATE_HZ = 2000.0  # per channel: about 9 MB/s per digitizer
BOARD_SPECS = (
    *(BoardSpec(b.name, b.card, b.slot, b.package_data, rate_hz=RATE_HZ) for b in DEMO_SPECS),
    TRIGGER_SPEC,
)
FAULT_ROUNDS = 2
#: Long enough for qSender to reach the bypass threshold, well below the idle timeout.
PAUSE_S = 1.5
SAMPLE_PERIOD_S = 0.1


def faults_for(board: BoardSpec) -> list[Fault]:
    """Every fault the board accepts (a trigger refuses the packet faults)."""
    refused = PACKET_FAULTS if board.is_trigger else frozenset()
    return [f for f in Fault if f is not Fault.NONE and f not in refused]


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r1")
    config = write_config(workdir, BOARD_SPECS, sender={"idle_timeout_s": 10.0})
    with ioc_process(workdir, "--config", str(config)) as ioc:
        yield ioc


class PoolSampler:
    """Samples the pool PVs in a thread; also keeps a monitor on `BuffersOK`."""

    NAMES = tuple(
        f"DAQC{CRATE}_{suffix}"
        for suffix in (
            "CV_BuffersOK", "CV_BuffersAvail", "OL_NumSendBuffers", "CV_BuffersHeld", "CV_Retained",
        )
    )

    def __init__(self, ioc: IocProcess) -> None:
        self.pva = Pva(ioc)
        self.watch = Watch(self.pva, f"DAQC{CRATE}_CV_BuffersOK")
        self.samples: list[tuple[str, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            ok, free, sender, held, retained = self.pva.ctx.get(list(self.NAMES), timeout=10.0)
            self.samples.append((str(ok), float(free), float(sender), float(held),
                                 float(retained)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.watch.close()
        self.pva.close()

    def assert_never_leaked(self, min_samples: int) -> None:
        seen = [str(v) for v in self.watch.seen()]
        assert seen and seen[0] == "OK", seen
        assert "Leak" not in seen, f"BuffersOK monitor saw {seen}"
        assert len(self.samples) >= min_samples
        leaks = [s for s in self.samples if s[0] != "OK"]
        assert not leaks, f"BuffersOK sampled as Leak: {leaks[:5]}"


def inject_every_fault(pva: Pva) -> int:
    """One round: every applicable fault on every board, one kind per scan pass (so each
    shows on its own rather than hidden by another's FIFO reset); returns the read errors."""
    read_errors = 0
    for fault in Fault:
        if fault is Fault.NONE:
            continue
        for board in BOARD_SPECS:
            if fault in faults_for(board):
                pva.put(f"VME{CRATE}:{board.name}:SIM_Fault", int(fault))
                read_errors += fault is Fault.READ_ERROR
        wait_next_pass(pva)
    return read_errors


def wait_next_pass(pva: Pva) -> None:
    """Until inLoop has polled again: a clean poll or a type-F header (an overflowing
    board's polls all end in a reset and an 0xF header)."""
    names = (f"DAQC{CRATE}_CV_InLoop2", f"DAQC{CRATE}_CV_InLoop3")
    before = pva.numbers(*names)
    wait_until(lambda: pva.numbers(*names) != before, 10, "the next inLoop pass", 0.1)


def wait_read_errors(pva: Pva, count: int) -> None:
    """A read error shows at the board's next read: wait until all injected ones did."""
    pva.wait(f"DAQC{CRATE}_CV_ReadErrors", lambda v: v >= count, 20, "read errors consumed")


def test_buffers_ok_never_leaks_under_load_faults_full_memory_and_save_toggles(crate):
    ioc = crate
    sampler = PoolSampler(ioc)
    pause = threading.Event()

    def maybe_pause(_tally) -> None:
        if pause.is_set():
            deadline = time.monotonic() + PAUSE_S
            while pause.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)

    rx = Background(receiver(ioc, pipeline=6), max_seconds=120, on_reply=maybe_pause)
    pva = Pva(ioc)
    try:
        start_run(ioc)
        pva.wait(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > 50, 30, "data flowing")
        injected_read_errors = 0
        for _ in range(FAULT_ROUNDS):
            injected_read_errors += inject_every_fault(pva)
            wait_read_errors(pva, injected_read_errors)

        pause.set()
        pva.wait(f"DAQC{CRATE}_OL_TotalBufsLost", lambda v: v > 0, 30, "the memory budget used")
        pause.clear()

        ioc.put_ok("Online_CS_SaveData", "No Save")
        written = pva.number(f"DAQC{CRATE}_OL_TotalBufsWritten")
        pva.wait(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > written + 50, 20,
                 "buffers recycled without Save")
        ioc.put_ok("Online_CS_SaveData", "Save")
        injected_read_errors += inject_every_fault(pva)
        wait_read_errors(pva, injected_read_errors)
        stop_run(ioc)
        tally = rx.join(90)

        assert tally.all_done, "every board's 0xD reached the receiver"
        assert len(tally.boards_seen) == len(BOARD_SPECS)
        assert pva.number(f"DAQC{CRATE}_CV_ReadErrors") == injected_read_errors
        for board in BOARD_SPECS:
            assert sim_figures(pva, board.name).cleared > 0, f"{board.name}: no FIFO reset seen"
            if not board.is_trigger:
                assert pva.number(f"DAQC{CRATE}_OL_Errors{board.card}") > 0, board.name
        assert_pool_whole(ioc)
    finally:
        pva.close()
        sampler.close()
    sampler.assert_never_leaked(min_samples=20)
    free_seen = [s[1] for s in sampler.samples]
    assert min(free_seen) <= POOL_SIZE - 90, "the pool was never under load"
    # Undelivered data stay within the memory budget (184 MiB); only 0xD headers may pass it.
    assert max(s[4] for s in sampler.samples) <= 184 + 1
    assert max(s[1] for s in sampler.samples) <= POOL_SIZE
    assert ioc.proc.poll() is None
    assert "Traceback" not in ioc.log()


def test_conservation_across_runs_without_a_receiver_and_a_start_while_draining(crate):
    ioc = crate
    sampler = PoolSampler(ioc)
    pva = Pva(ioc)
    try:
        start_run(ioc)
        pva.wait(f"DAQC{CRATE}_OL_TotalBufsLost", lambda v: v > 0, 30, "memory full, nobody")
        inject_every_fault(pva)
        # Stop and Start at once: the Start waits for the drain; qSender's leftovers of the
        # stopped run, its 0xD headers included, are dropped at the new run's start.
        states = Watch(pva, f"DAQC{CRATE}_CV_State")
        ioc.put_ok("Online_CS_StartStop", "Stop")
        ioc.put_ok("Online_CS_StartStop", "Start")

        def drained_and_running() -> bool:
            seen = [str(v) for v in states.seen()]
            return "Draining" in seen[:-1] and seen[-1] == "Running"

        wait_until(drained_and_running, 20, "a drain, then the next run")
        states.close()
        inject_every_fault(pva)
        stop_run(ioc)
        tally = receiver(ioc, pipeline=6).run(max_seconds=60)
        assert tally.all_done and len(tally.boards_seen) == len(BOARD_SPECS)
        assert all(log.end_of_run == 1 for log in tally.boards.values()), "stale 0xD delivered"
        assert_pool_whole(ioc)
    finally:
        pva.close()
        sampler.close()
    sampler.assert_never_leaked(min_samples=10)
    assert ioc.proc.poll() is None
    assert "Traceback" not in ioc.log()

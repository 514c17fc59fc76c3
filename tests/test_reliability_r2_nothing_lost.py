"""R2 (spec 06): nothing lost end to end, without and with faults.

The reference is the simulator: `SIM_Generated` counts every event accepted
into a board's FIFO. Without faults, at a rate the receiver sustains, every
generated event arrives exactly once and in per-channel order. With faults,
per board: received = generated − cleared − the checker's counted losses,
where each loss is derived exactly from what the IOC publishes:

- FIFO overflow / underflow / read error: the FIFO reset throws its events
  away, and the simulator counts them in `SIM_Cleared`;
- bad length (code 5, fatal): the whole buffer is discarded; its first-error
  record says how long it was (extra1, words), every event is 114 words;
- bad marker (code 2): only the corrupted event is lost (it reaches the
  receiver as 114 unparseable words), unless it was the buffer's last event:
  then no marker follows, the error is fatal and the whole buffer goes. The
  record's offset tells which: the event starts at the offset;
- timestamp regression (code 8): nothing lost; the event arrives out of order.

Only one checker fault per board per run, so each is its card's first error
and its record is published. `OL_DataLost` (KiB resolution) must agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from dataflow import (
    CRATE,
    DEMO_SPECS,
    EVENT_WORDS,
    KIB,
    TRIGGER_SPEC,
    Background,
    BoardSpec,
    Pva,
    assert_channel_order,
    assert_end_of_run_last_and_once,
    assert_pool_whole,
    channel_regressions,
    data_keys,
    first_error,
    ioc_process,
    lost_kib,
    receiver,
    sim_figures,
    start_run,
    stop_run,
    write_config,
)
from ioc_harness import IocProcess

from receiver.client import Tally
from sim.faults import BAD_MARKER_WORD, BAD_PACKET_LENGTH, Fault

TRIGGER = BoardSpec(TRIGGER_SPEC.name, TRIGGER_SPEC.card, TRIGGER_SPEC.slot,
                    TRIGGER_SPEC.package_data, kind=TRIGGER_SPEC.kind, rate_hz=1000.0)
BOARD_SPECS = (*DEMO_SPECS, TRIGGER)
DIGITIZERS = DEMO_SPECS
CHECKER_FAULTS = (Fault.BAD_MARKER, Fault.BAD_LENGTH, Fault.TIMESTAMP_REGRESSION, Fault.NONE)
FIFO_FAULTS = (Fault.FIFO_OVERFLOW, Fault.FIFO_UNDERFLOW, Fault.READ_ERROR)


@pytest.fixture(scope="module")
def crate(tmp_path_factory) -> Iterator[IocProcess]:
    workdir = tmp_path_factory.mktemp("r2")
    with ioc_process(workdir, "--config", str(write_config(workdir, BOARD_SPECS))) as ioc:
        yield ioc


def run_with_receiver(ioc: IocProcess, pipeline: int, during) -> Tally:
    """A run with a receiver connected throughout; ``during(pva)`` acts mid-run."""
    written = f"DAQC{CRATE}_OL_TotalBufsWritten"
    with Pva(ioc) as pva:
        before = pva.number(written)  # the previous run's count, until this run publishes
    rx = Background(receiver(ioc, pipeline=pipeline), max_seconds=120)
    start_run(ioc)
    with Pva(ioc) as pva:
        pva.wait(written, lambda v: v > 100 and v != before, 30, "data flowing in this run")
        during(pva)
    stop_run(ioc)
    tally = rx.join(90)
    assert tally.all_done
    assert tally.boards_seen == {b.package_data for b in BOARD_SPECS}
    return tally


def assert_trigger_complete(pva: Pva, tally: Tally) -> None:
    """Trigger packets carry no board id: they are the receiver's trigger stream."""
    figures = sim_figures(pva, TRIGGER.name)
    stamps = tally.trigger_events["timestamp"].astype(np.int64)
    assert stamps.size == figures.generated - figures.cleared, "trigger packets"
    assert (np.diff(stamps) > 0).all(), "trigger packets out of order or duplicated"
    assert_end_of_run_last_and_once(tally.boards[TRIGGER.package_data].events)


def assert_sent_bytes_received(pva: Pva, tally: Tally) -> None:
    """What the sender says it put on the wire is what the receiver read (once published)."""
    received_kib = tally.payload_bytes // KIB
    pva.wait(f"DAQC{CRATE}_CV_SenderBytes", lambda mib: round(mib * KIB) == received_kib, 5,
             f"SenderBytes = {received_kib} KiB received")


def set_digitizer_rate(ioc: IocProcess, rate_hz: float) -> None:
    with Pva(ioc) as pva:
        for board in DIGITIZERS:
            pva.put(f"VME{CRATE}:{board.name}:SIM_EventRate", rate_hz)


@pytest.mark.parametrize(("pipeline", "rate_hz"), [(6, 500.0), (1, 1000.0)])
def test_every_generated_event_arrives_exactly_once_and_in_order(crate, pipeline, rate_hz):
    ioc = crate
    set_digitizer_rate(ioc, rate_hz)
    try:
        tally = run_with_receiver(ioc, pipeline, lambda pva: None)
    finally:
        set_digitizer_rate(ioc, DEMO_SPECS[0].rate_hz)
    with Pva(ioc) as pva:
        for board in DIGITIZERS:
            figures = sim_figures(pva, board.name)
            assert (figures.dropped, figures.cleared) == (0, 0), board.name
            events = tally.boards[board.package_data].events
            keys = data_keys(events)
            assert keys.size == figures.generated > 0, board.name
            assert np.unique(keys).size == keys.size, f"{board.name}: duplicates"
            assert_channel_order(events)
            assert_end_of_run_last_and_once(events)
            assert pva.number(f"DAQC{CRATE}_OL_Errors{board.card}") == 0
        assert_trigger_complete(pva, tally)
        assert pva.numbers(f"DAQC{CRATE}_OL_TotalBufsLost", f"DAQC{CRATE}_CV_SenderRequeued") == [
            0, 0,
        ]
        assert tally.unknown_words == 0
        assert_sent_bytes_received(pva, tally)
    assert_pool_whole(ioc)


def checker_loss(pva: Pva, board: BoardSpec, fault: Fault) -> tuple[int, int, int]:
    """Events the checker's fault cost this board, the bytes it discarded, the garbage words
    delivered instead; from the card's published first-error record."""
    code, offset, extra1, extra2 = first_error(pva, board.card)
    errors = pva.number(f"DAQC{CRATE}_OL_Errors{board.card}")
    if fault is Fault.NONE:
        assert (errors, code) == (0, 0), f"{board.name}: unexpected error"
        return 0, 0, 0
    assert errors == 1, f"{board.name}: {errors} errors for one {fault.name}"
    if fault is Fault.TIMESTAMP_REGRESSION:
        assert code == 8 and extra1 > extra2, (board.name, code, extra1, extra2)
        return 0, 0, 0
    buffer_words = extra1
    assert buffer_words % EVENT_WORDS == 0, f"{board.name}: a discarded buffer of odd size"
    if fault is Fault.BAD_LENGTH:
        assert (code, extra2) == (5, BAD_PACKET_LENGTH), (board.name, code, extra2)
        return buffer_words // EVENT_WORDS, buffer_words * 4, 0
    assert (code, extra2) == (2, BAD_MARKER_WORD), (board.name, code, extra2)
    if offset + EVENT_WORDS < buffer_words:  # a marker follows: realigned, one event lost
        return 1, 0, EVENT_WORDS
    return buffer_words // EVENT_WORDS, buffer_words * 4, 0


def inject_and_wait(pva: Pva, assignment: dict[str, Fault]) -> None:
    """The checker faults first (each seen by the checker), then each FIFO fault on every
    board, waiting for each to show before the next."""
    for name, fault in assignment.items():
        if fault is not Fault.NONE:
            pva.put(f"VME{CRATE}:{name}:SIM_Fault", int(fault))
    for board in DIGITIZERS:
        if assignment[board.name] is not Fault.NONE:
            pva.wait(f"DAQC{CRATE}_OL_Errors{board.card}", lambda v: v >= 1, 20, board.name)
    for fault in FIFO_FAULTS:
        read_errors = pva.number(f"DAQC{CRATE}_CV_ReadErrors")
        cleared = {b.name: sim_figures(pva, b.name).cleared for b in BOARD_SPECS}
        for board in BOARD_SPECS:
            pva.put(f"VME{CRATE}:{board.name}:SIM_Fault", int(fault))
        for board in BOARD_SPECS:
            pva.wait(f"VME{CRATE}:{board.name}:SIM_Cleared",
                     lambda v, before=cleared[board.name]: v > before, 20,
                     f"{fault.name} on {board.name}")
        if fault is Fault.READ_ERROR:
            pva.wait(f"DAQC{CRATE}_CV_ReadErrors",
                     lambda v, before=read_errors: v == before + len(BOARD_SPECS), 20,
                     "every read error")


@pytest.mark.parametrize("rotation", range(len(CHECKER_FAULTS)))
def test_received_plus_counted_losses_equal_generated_under_every_fault(crate, rotation):
    ioc = crate
    kinds = CHECKER_FAULTS[rotation:] + CHECKER_FAULTS[:rotation]
    assignment = {board.name: kind for board, kind in zip(DIGITIZERS, kinds, strict=True)}
    tally = run_with_receiver(ioc, 6, lambda pva: inject_and_wait(pva, assignment))
    garbage_words = 0
    with Pva(ioc) as pva:
        for board in DIGITIZERS:
            fault = assignment[board.name]
            figures = sim_figures(pva, board.name)
            lost_events, discarded_bytes, garbage = checker_loss(pva, board, fault)
            garbage_words += garbage
            events = tally.boards[board.package_data].events
            keys = data_keys(events)
            assert figures.cleared > 0, f"{board.name}: the FIFO faults cleared nothing"
            assert keys.size == figures.generated - figures.cleared - lost_events, (
                f"{board.name} ({fault.name}): received {keys.size}, generated "
                f"{figures.generated}, cleared {figures.cleared}, checker lost {lost_events}"
            )
            assert np.unique(keys).size == keys.size, f"{board.name}: duplicates"
            assert lost_kib(pva, board.card) == discarded_bytes // KIB, board.name
            expected_regressions = {0: 1} if fault is Fault.TIMESTAMP_REGRESSION else {}
            assert channel_regressions(events) == expected_regressions, board.name
            assert_end_of_run_last_and_once(events)
        assert_trigger_complete(pva, tally)
        assert tally.unknown_words == garbage_words
        assert pva.number(f"DAQC{CRATE}_OL_TotalBufsLost") == 0, "the receiver kept up"
        assert_sent_bytes_received(pva, tally)
    assert_pool_whole(ioc)

"""The backend conformance suite: what `ioc.hardware`'s contract promises, checked.

Any backend runs it by subclassing `BackendConformance` in a test module and
giving it a ``crate`` fixture that builds a fresh crate, for example::

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def crate(self):
            return backends.build(my_crate_config)

The crate needs at least one board whose events arrive within a few seconds of
master logic on. ``REGISTERS`` names, per board kind, a control register the
backend has and that reads back what is written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pytest
from ioc_harness import wait_until

from ioc.decoder import KIND_EVENT, decode
from ioc.hardware import MAIN_DATA_FIFO, TRIGGER_FIFOS, WORD, Board, BoardKind, Crate, FifoStatus
from ioc.packets import MARKER, TIMESTAMP_MASK, TRIGGER_MARKER

ARRIVAL_TIMEOUT_S = 5.0
#: How long a board with master logic off is watched for events entering anyway.
QUIET_WATCH_S = 0.3
#: How long reads and latches alternate in the latch-order check.
LATCH_WATCH_S = 1.0
FIFO_WORDS_MAX = 1 << 20


def _fifo(board: Board) -> int:
    return MAIN_DATA_FIFO if board.identity.kind.is_trigger else 0


def _wait_for_events(board: Board, fifo: int) -> FifoStatus:
    def filled() -> FifoStatus | None:
        status = board.status(fifo)
        return status if status.depth_words > 0 else None

    return wait_until(filled, ARRIVAL_TIMEOUT_S, f"events in {board.identity.name} FIFO {fifo}")


def _drain(board: Board, fifo: int) -> np.ndarray:
    """Everything now in the FIFO, read as inLoop reads it (event-bounded depth)."""
    depth = board.status(fifo).depth_words
    out = np.zeros(depth, dtype=WORD)
    assert board.read(out, depth, fifo) == depth
    return out


class BackendConformance:
    """The contract of `ioc.hardware.Board` and `Crate`, one test per promise."""

    REGISTERS: ClassVar[Mapping[BoardKind, str]] = {
        BoardKind.DIGITIZER_MASTER: "reg_led_threshold0",
        BoardKind.DIGITIZER_SLAVE: "reg_led_threshold0",
        BoardKind.TRIGGER_MASTER: "reg_TRIG_MASK",
    }

    @pytest.fixture
    def crate(self) -> Crate:
        raise NotImplementedError("a backend's test class gives its own crate fixture")

    @pytest.fixture
    def running(self, crate: Crate):
        """The crate with every board's master logic on; off again afterwards."""
        for board in crate.boards:
            board.select_fifo(_fifo(board))
            board.reset_fifo(_fifo(board))
            board.set_master_logic(True)
        yield crate
        for board in crate.boards:
            board.set_master_logic(False)

    def test_identities_unique_and_in_card_order(self, crate: Crate) -> None:
        identities = [board.identity for board in crate.boards]
        assert identities, "a crate has boards"
        for attribute in ("name", "slot", "card"):
            values = [getattr(identity, attribute) for identity in identities]
            assert len(set(values)) == len(values), f"duplicate {attribute}: {values}"
        assert [i.card for i in identities] == sorted(i.card for i in identities)
        assert all(isinstance(i.kind, BoardKind) for i in identities)
        assert {i.board_type for i in identities} <= {4, 12, 13}

    def test_clock_origin_is_in_the_past(self, crate: Crate) -> None:
        assert 0 < crate.clock_origin_ns() <= time.monotonic_ns()

    def test_before_run_returns_within_a_second_and_the_boards_still_read(
        self, crate: Crate
    ) -> None:
        began = time.monotonic()
        crate.before_run()
        assert time.monotonic() - began < 1.0, "a Start waits for before_run"
        for board in crate.boards:
            assert board.status(_fifo(board)).depth_words >= 0

    def test_read_takes_whole_events_and_returns_the_words_copied(self, running: Crate) -> None:
        for board in running.boards:
            fifo = _fifo(board)
            status = _wait_for_events(board, fifo)
            assert not status.empty and 0 < status.depth_words <= FIFO_WORDS_MAX
            board.set_master_logic(False)
            words = _drain(board, fifo)
            marker = TRIGGER_MARKER if board.identity.kind.is_trigger else MARKER
            assert words[0] == marker, f"{board.identity.name}: a read starts with an event"
            after = board.status(fifo)
            assert (after.empty, after.depth_words) == (True, 0)

    def test_reset_empties_the_fifo(self, running: Crate) -> None:
        for board in running.boards:
            fifo = _fifo(board)
            _wait_for_events(board, fifo)
            board.set_master_logic(False)
            board.reset_fifo(fifo)
            status = board.status(fifo)
            assert (status.empty, status.full, status.almost_full) == (True, False, False)
            assert status.depth_words == 0

    def test_nothing_enters_while_master_logic_is_off(self, crate: Crate) -> None:
        for board in crate.boards:
            board.set_master_logic(False)
            board.reset_fifo(_fifo(board))
        deadline = time.monotonic() + QUIET_WATCH_S
        while time.monotonic() < deadline:
            for board in crate.boards:
                assert board.status(_fifo(board)).depth_words == 0, board.identity.name
            time.sleep(0.02)

    def test_latched_timestamps_are_48_bit_and_advance(self, crate: Crate) -> None:
        for board in crate.boards:
            first = board.latch_timestamp()
            later = [board.latch_timestamp() for _ in range(100)]
            assert all(0 <= ts <= TIMESTAMP_MASK for ts in (first, *later))
            assert later == sorted(later) and first <= later[0]
        board = crate.boards[0]
        before = board.latch_timestamp()
        wait_until(lambda: board.latch_timestamp() > before, 1.0, "the timestamp to advance")

    def test_a_latched_timestamp_is_never_older_than_an_event_already_read(
        self, running: Crate
    ) -> None:
        """inLoop stamps its empty and error headers with it after reading; an online merge
        takes an empty header as the board's progress, so a stamp behind data already
        read would make the merge write later records late."""
        board = next(b for b in running.boards if not b.identity.kind.is_trigger)
        _wait_for_events(board, 0)
        newest, reads = -1, 0
        deadline = time.monotonic() + LATCH_WATCH_S
        while time.monotonic() < deadline:
            events = decode(_drain(board, 0)).events
            events = events[events["kind"] == KIND_EVENT]
            if events.size:
                newest = max(newest, int(events["timestamp"].max()))
                reads += 1
            latched = board.latch_timestamp()
            assert latched >= newest, f"latched {latched}, but an event read had {newest}"
        assert reads > 0

    def test_package_data_is_what_was_set(self, crate: Crate) -> None:
        for offset, board in enumerate(crate.boards):
            board.set_package_data(4000 + offset)
        assert [b.package_data for b in crate.boards] == [
            4000 + offset for offset in range(len(crate.boards))
        ]

    def test_registers_read_back_and_unknown_ones_are_key_errors(self, crate: Crate) -> None:
        for board in crate.boards:
            register = self.REGISTERS[board.identity.kind]
            board.write_register(register, 0x15)
            assert board.read_register(register) == 0x15
            with pytest.raises(KeyError):
                board.read_register("reg_no_such_register")
            with pytest.raises(KeyError):
                board.write_register("reg_no_such_register", 1)

    def test_a_trigger_fills_only_the_selected_fifo(self, crate: Crate) -> None:
        triggers = [b for b in crate.boards if b.identity.kind.is_trigger]
        if not triggers:
            pytest.skip("no trigger board in this crate")
        chosen = 3
        for board in triggers:
            for fifo in range(TRIGGER_FIFOS):
                board.reset_fifo(fifo)
            board.select_fifo(chosen)
            board.set_master_logic(True)
            try:
                _wait_for_events(board, chosen)
            finally:
                board.set_master_logic(False)
            others = [f for f in range(TRIGGER_FIFOS) if f != chosen]
            assert all(board.status(f).depth_words == 0 for f in others)

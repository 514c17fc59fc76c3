"""Each injected fault produces exactly the bytes or status of the spec 01 fault table.

Packet faults are checked against a twin board (same seed, same clock steps,
no fault): the faulty read must differ from the twin's in exactly the words
the fault names, and nowhere else.
"""

from __future__ import annotations

import numpy as np
import pytest

from ioc.hardware import WORD, BoardKind, ReadError
from ioc.packets import channel_id, packet_length, timestamp
from sim import Fault, ManualClock, SimBoardSpec, SimCrate
from sim.fifo import Fifo

EVENT_WORDS = 14 + 20 // 2  # 20-sample traces


class Twins:
    """Two identical digitizers on identical clocks; faults go to ``faulty`` only."""

    def __init__(self, **sim) -> None:
        self.clocks = (ManualClock(), ManualClock())
        spec = SimBoardSpec("MDIG1", BoardKind.DIGITIZER_MASTER, 3, 0, 101, **sim)
        self.faulty, self.clean = (SimCrate([spec], clock=c).board(0) for c in self.clocks)
        for board in (self.faulty, self.clean):
            board.set_master_logic(True)

    def step(self, ticks: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance both clocks and read both FIFOs completely."""
        reads = []
        for clock, board in zip(self.clocks, (self.faulty, self.clean), strict=True):
            clock.advance(ticks)
            reads.append(read_all(board))
        return reads[0], reads[1]


def read_all(board, fifo: int = 0) -> np.ndarray:
    depth = board.status(fifo).depth_words
    out = np.zeros(depth, dtype=WORD)
    board.read(out, depth, fifo)
    return out


def differing_words(faulty: np.ndarray, clean: np.ndarray) -> list[int]:
    assert faulty.size == clean.size
    return np.flatnonzero(faulty != clean).tolist()


def test_bad_marker_replaces_word_0_of_the_next_event_only():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    twins.step(100_000)
    twins.faulty.inject(Fault.BAD_MARKER)
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == [0]
    assert faulty[0] == 0xDEADBEEF
    assert faulty[:4].tobytes()[:4] == bytes.fromhex("DEADBEEF")
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == []


def test_bad_length_sets_the_length_field_of_the_next_event_to_600():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    twins.step(100_000)
    twins.faulty.inject(Fault.BAD_LENGTH)
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == [1]
    assert packet_length(int(faulty[1])) == 600
    assert int(faulty[1]) & ~(0x7FF << 16) == int(clean[1]) & ~(0x7FF << 16)
    assert faulty.size % EVENT_WORDS == 0  # the real words are unchanged


def test_a_fault_waits_for_the_next_event_when_none_arrives():
    twins = Twins(event_rate_hz=0, trace_samples=20)
    twins.faulty.inject(Fault.BAD_MARKER)
    assert twins.step(1_000_000)[0].size == 0
    for board in (twins.faulty, twins.clean):
        board.set_event_rate(5000)
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == [0]


def test_timestamp_regression_hits_the_next_channel_0_event_only():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    before, _ = twins.step(100_000)
    events = before.reshape(-1, EVENT_WORDS)
    channel0 = events[channel_id(events[:, 1]) == 0]
    predecessor = int(timestamp(channel0[-1, 2], channel0[-1, 3]))
    twins.faulty.inject(Fault.TIMESTAMP_REGRESSION)
    faulty, clean = twins.step(100_000)
    events = faulty.reshape(-1, EVENT_WORDS)
    first = int(np.flatnonzero(channel_id(events[:, 1]) == 0)[0])
    changed = differing_words(faulty, clean)
    assert set(changed) <= {first * EVENT_WORDS + 2, first * EVENT_WORDS + 3} and changed
    regressed = int(timestamp(events[first, 2], events[first, 3]))
    assert regressed < predecessor
    later = events[first + 1 :][channel_id(events[first + 1 :, 1]) == 0]
    later_stamps = timestamp(later[:, 2], later[:, 3]).astype(np.int64)
    assert later_stamps.size and (later_stamps > predecessor).all()
    assert (np.diff(later_stamps) > 0).all()


def test_fifo_overflow_fills_with_real_events_then_drops_until_the_reset():
    clock = ManualClock()
    spec = SimBoardSpec("MDIG1", BoardKind.DIGITIZER_MASTER, 3, 0, 101, event_rate_hz=5000,
                        trace_samples=20, fifo_words=10_000)
    board = SimCrate([spec], clock=clock).board(0)
    board.set_master_logic(True)
    clock.advance(50_000)
    first_part = read_all(board)
    generated_before = board.generated
    board.inject(Fault.FIFO_OVERFLOW)
    status = board.status()
    capacity_events = 10_000 // EVENT_WORDS
    assert status.full and status.almost_full
    assert status.depth_words == capacity_events * EVENT_WORDS
    assert board.generated == generated_before + capacity_events
    assert board.dropped == 0
    clock.advance(50_000)
    status = board.status()
    assert status.full and status.depth_words == capacity_events * EVENT_WORDS
    assert board.dropped > 0
    assert board.generated == generated_before + capacity_events
    fill = read_all(board)
    events = np.concatenate([first_part, fill]).reshape(-1, EVENT_WORDS)
    assert (events[:, 0] == 0xAAAAAAAA).all()
    assert (packet_length(events[:, 1]) == EVENT_WORDS - 1).all()
    board.reset_fifo()
    assert not board.status().full
    clock.advance(50_000)
    after = read_all(board).reshape(-1, EVENT_WORDS)
    assert after.shape[0] > 0
    events = np.concatenate([events, after])
    channels = channel_id(events[:, 1])
    stamps = timestamp(events[:, 2], events[:, 3]).astype(np.int64)
    for channel in range(10):
        assert (np.diff(stamps[channels == channel]) > 0).all()


def enabled_digitizer():
    """One digitizer with master logic on, on a clock that stands still."""
    spec = SimBoardSpec("MDIG1", BoardKind.DIGITIZER_MASTER, 3, 0, 101, event_rate_hz=5000,
                        trace_samples=20)
    board = SimCrate([spec], clock=ManualClock()).board(0)
    board.set_master_logic(True)
    return board


def test_overflow_reset_counts_what_it_cleared():
    board = enabled_digitizer()
    board.inject(Fault.FIFO_OVERFLOW)
    in_fifo = board.status().depth_words // EVENT_WORDS
    board.reset_fifo()
    assert board.cleared == in_fifo == board.generated
    assert board.cleared_by_channel.sum() == in_fifo


def test_an_overflow_fill_is_published_with_its_flag_already_up(monkeypatch):
    """The crate process's FIFOs are read without a lock: an IOC that sees the fill must
    see the overflow, or it reads the fill before the flag and clears nothing."""
    flag_at_publish: list[bool] = []
    publish = Fifo.commit

    def watched(fifo: Fifo, *args, **kwargs) -> None:
        flag_at_publish.append(fifo.full)
        publish(fifo, *args, **kwargs)

    monkeypatch.setattr(Fifo, "commit", watched)
    board = enabled_digitizer()
    board.inject(Fault.FIFO_OVERFLOW)
    assert board.status().full
    assert flag_at_publish == [True]


def test_fifo_underflow_reports_empty_with_depth_once():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    board, clock = twins.faulty, twins.clocks[0]
    board.inject(Fault.FIFO_UNDERFLOW)
    assert board.status().empty and board.status().depth_words == 0  # nothing to under-run yet
    clock.advance(100_000)
    status = board.status()
    assert status.empty and status.depth_words > 0
    status = board.status()
    assert not status.empty and status.depth_words > 0


def test_read_error_fails_the_next_read_and_removes_nothing():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    twins.step(100_000)
    twins.faulty.inject(Fault.READ_ERROR)
    twins.clocks[0].advance(100_000)
    depth = twins.faulty.status().depth_words
    assert depth > 0
    with pytest.raises(ReadError):
        twins.faulty.read(np.zeros(depth, dtype=WORD), depth)
    assert twins.faulty.status().depth_words == depth
    twins.clocks[1].advance(100_000)
    assert np.array_equal(read_all(twins.faulty), read_all(twins.clean))


def test_fault_none_and_integer_values():
    twins = Twins(event_rate_hz=5000, trace_samples=20)
    twins.faulty.inject(Fault.NONE)
    twins.faulty.inject(0)
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == []
    twins.faulty.inject(1)
    faulty, clean = twins.step(100_000)
    assert differing_words(faulty, clean) == [0]
    with pytest.raises(ValueError):
        twins.faulty.inject(7)
    assert [f.value for f in Fault] == list(range(7))

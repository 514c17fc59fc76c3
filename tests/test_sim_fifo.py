"""The simulated FIFO as inLoop sees it: lazy arrival, flags, depth, accounting, clock."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest

from ioc.hardware import WORD, BoardKind, FifoStatus
from ioc.packets import channel_id, packet_length, timestamp
from sim import (
    TICKS_PER_SECOND,
    Fault,
    ManualClock,
    MonotonicClock,
    SimBoardSpec,
    SimCrate,
    SimDigitizer,
)

HEADER_ONLY = 14  # words per event without a trace


def make_crate(clock=None, seed: int = 1, slots=(3,), **sim) -> SimCrate:
    specs = [
        SimBoardSpec(f"MDIG{i + 1}", BoardKind.DIGITIZER_MASTER, slot, i, 101 + i, **sim)
        for i, slot in enumerate(slots)
    ]
    return SimCrate(specs, seed=seed, clock=clock)


def read_words(board, nwords: int | None = None) -> np.ndarray:
    if nwords is None:
        nwords = board.status().depth_words
    out = np.zeros(nwords, dtype=WORD)
    assert board.read(out, nwords) == nwords
    return out


def events_of(words: np.ndarray, event_words: int) -> np.ndarray:
    assert words.size % event_words == 0
    return words.reshape(-1, event_words)


def test_nothing_arrives_while_master_logic_is_off():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=10_000).board(0)
    clock.advance_seconds(1.0)
    assert board.status() == FifoStatus(full=False, almost_full=False, empty=True, depth_words=0)
    board.set_master_logic(True)
    on_tick = clock.now_ticks()
    clock.advance_seconds(0.01)
    board.set_master_logic(False)
    off_tick = clock.now_ticks()
    clock.advance_seconds(1.0)
    words = events_of(read_words(board), 114)
    stamps = timestamp(words[:, 2], words[:, 3]).astype(np.int64)
    assert words.shape[0] == board.generated > 500
    assert (stamps > on_tick).all() and (stamps <= off_tick).all()
    clock.advance_seconds(0.5)
    assert board.status().depth_words == 0
    assert not board.master_logic


def test_events_arrive_lazily_at_the_configured_rate():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=1000, trace_samples=0, fifo_words=1 << 20).board(0)
    board.set_master_logic(True)
    assert board.status().depth_words == 0  # no time has passed
    clock.advance_seconds(2.0)
    expected = 10 * 1000 * 2.0
    depth = board.status().depth_words
    assert abs(depth / HEADER_ONLY - expected) < 6 * expected**0.5
    per_channel = board.generated_by_channel
    assert per_channel.shape == (10,) and per_channel.sum() == depth // HEADER_ONLY
    assert (np.abs(per_channel - expected / 10) < 6 * (expected / 10) ** 0.5).all()


def test_depth_counts_whole_events_and_reads_take_the_oldest_words():
    clock_a, clock_b = ManualClock(), ManualClock()
    board_a = make_crate(clock_a, event_rate_hz=5000).board(0)
    board_b = make_crate(clock_b, event_rate_hz=5000).board(0)
    for board, clock in ((board_a, clock_a), (board_b, clock_b)):
        board.set_master_logic(True)
        clock.advance(50_000)
    status = board_a.status()
    assert status.depth_words > 0 and status.depth_words % 114 == 0 and not status.empty
    whole = read_words(board_a)
    pieces = [read_words(board_b, 5), read_words(board_b, 200)]
    pieces.append(read_words(board_b, board_b.status().depth_words))
    assert np.array_equal(np.concatenate(pieces), whole)
    assert board_a.status().empty and board_a.status().depth_words == 0


def test_reading_more_than_the_depth_is_refused_and_removes_nothing():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=5000).board(0)
    board.set_master_logic(True)
    clock.advance(50_000)
    depth = board.status().depth_words
    with pytest.raises(ValueError):
        board.read(np.zeros(depth + 1, dtype=WORD), depth + 1)
    assert board.status().depth_words == depth


def test_almost_full_from_seven_eighths_and_full_when_an_event_does_not_fit():
    clock = ManualClock()
    capacity_events = 64
    board = make_crate(
        clock, event_rate_hz=1000, trace_samples=0, fifo_words=capacity_events * HEADER_ONLY
    ).board(0)
    board.set_master_logic(True)
    threshold = -(-capacity_events * HEADER_ONLY * 7 // 8)
    seen_depths = set()
    for _ in range(10_000):
        clock.advance(500)  # 0.05 events per step on average
        status = board.status()
        seen_depths.add(status.depth_words)
        assert status.almost_full == (status.depth_words >= threshold)
        assert status.full == (board.dropped > 0)
        if status.full:
            break
    # Both sides of 7/8 were seen close up.
    assert any(threshold - 2 * HEADER_ONLY <= depth < threshold for depth in seen_depths)
    assert any(threshold <= depth < threshold + 2 * HEADER_ONLY for depth in seen_depths)
    assert status.full and status.almost_full
    assert status.depth_words == capacity_events * HEADER_ONLY == board.generated * HEADER_ONLY

    clock.advance(200_000)
    assert board.status().depth_words == capacity_events * HEADER_ONLY
    dropped = board.dropped
    assert dropped > 10
    read_words(board, 10 * HEADER_ONLY)
    assert board.status().full  # latched until the reset
    board.reset_fifo()
    status = board.status()
    assert status == FifoStatus(full=False, almost_full=False, empty=True, depth_words=0)
    assert board.cleared == capacity_events - 10
    assert board.dropped == dropped
    assert board.generated == 10 + board.cleared
    assert (board.generated_by_channel.sum(), board.dropped_by_channel.sum(),
            board.cleared_by_channel.sum()) == (board.generated, board.dropped, board.cleared)


def test_a_long_pause_counts_its_losses_without_materialising_them():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=1_000_000, trace_samples=200).board(0)
    board.set_master_logic(True)
    clock.advance_seconds(100.0)  # 1e9 arrivals at 10 MHz per board
    tracemalloc.start()
    try:
        status = board.status()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert status.full and status.depth_words == (262144 // 114) * 114
    arrivals = board.generated + board.dropped
    assert abs(arrivals - 1e9) < 6 * 1e9**0.5
    assert (np.abs(board.dropped_by_channel - 1e8) < 6 * 1e8**0.5).all()


def test_accounting_balances_across_reads_resets_and_a_reset_of_the_counters():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=2000, trace_samples=0).board(0)
    board.set_master_logic(True)
    clock.advance(300_000)
    board.reset_accounting()  # run start: the events already in the FIFO are the old run's
    assert board.status().depth_words > 0 and board.generated == 0
    board.reset_fifo()
    assert board.cleared == 0
    received = 0
    rng = np.random.default_rng(7)
    for _ in range(100):
        clock.advance(int(rng.integers(1, 100_000)))
        action = rng.integers(3)
        if action == 0:
            received += read_words(board).size // HEADER_ONLY
        elif action == 1:
            board.reset_fifo()
    received += read_words(board).size // HEADER_ONLY
    assert board.generated > 1000 and board.cleared > 100
    assert received == board.generated - board.cleared


def test_per_channel_timestamps_strictly_increase_across_calls_and_resets():
    clock = ManualClock()
    board = make_crate(clock, event_rate_hz=200_000, trace_samples=0).board(0)
    board.set_master_logic(True)
    rng = np.random.default_rng(3)
    stamps_by_channel: dict[int, list[np.ndarray]] = {c: [] for c in range(10)}
    for step in range(300):
        clock.advance(int(rng.integers(0, 3_000)))
        if step % 37 == 36:
            board.reset_fifo()
        if step % 5 == 0:
            words = events_of(read_words(board), HEADER_ONLY)
            channels = channel_id(words[:, 1])
            stamps = timestamp(words[:, 2], words[:, 3]).astype(np.int64)
            for channel in range(10):
                stamps_by_channel[channel].append(stamps[channels == channel])
    for channel, parts in stamps_by_channel.items():
        stamps = np.concatenate(parts)
        assert stamps.size > 100, channel
        assert (np.diff(stamps) > 0).all(), channel


def test_same_seed_same_clock_steps_same_bytes():
    def run(seed: int, slot: int, watch_counters: bool = False) -> np.ndarray:
        clock = ManualClock()
        crate = make_crate(clock, seed=seed, slots=(slot,), event_rate_hz=3000)
        board = crate.board(0)
        board.set_master_logic(True)
        parts = []
        for step in (1, 50_000, 7, 120_000, 33_333):
            clock.advance(step)
            board.status()
            if watch_counters:  # as the IOC's 2 Hz publisher does, from its own thread
                assert board.generated >= 0
            clock.advance(step)
            parts.append(read_words(board))
        return np.concatenate(parts)

    reference = run(seed=1, slot=3)
    assert reference.size > 2_000
    assert run(seed=1, slot=3).tobytes() == reference.tobytes()
    assert run(seed=1, slot=3, watch_counters=True).tobytes() == reference.tobytes()
    assert run(seed=2, slot=3).tobytes() != reference.tobytes()
    other_slot = run(seed=1, slot=4)
    assert not np.array_equal(other_slot[2::114][:10], reference[2::114][:10])  # timestamps


def test_latch_timestamp_reads_the_crate_clock_in_48_bits():
    clock = ManualClock(start_ticks=(1 << 48) + 5)
    crate = make_crate(clock)
    assert crate.board(0).latch_timestamp() == 5
    clock.advance(10)
    assert crate.board(0).latch_timestamp() == 15


def test_the_real_time_clock_counts_10_ns_ticks_from_the_crate_origin():
    crate = make_crate()
    assert isinstance(crate.clock, MonotonicClock)
    first = crate.board(0).latch_timestamp()
    time.sleep(0.02)
    elapsed_ticks = crate.board(0).latch_timestamp() - first
    assert 0.02 * TICKS_PER_SECOND <= elapsed_ticks < 5 * TICKS_PER_SECOND
    now_ticks = (time.monotonic_ns() - crate.clock_origin_ns()) // 10
    assert abs(now_ticks - crate.board(0).latch_timestamp()) < TICKS_PER_SECOND


def test_crate_lists_boards_in_card_order_and_refuses_duplicates():
    specs = [
        SimBoardSpec("B", BoardKind.DIGITIZER_SLAVE, 5, 1, 102),
        SimBoardSpec("A", BoardKind.DIGITIZER_MASTER, 3, 0, 101),
        SimBoardSpec("T", BoardKind.TRIGGER_MASTER, 2, 2, 99),
    ]
    crate = SimCrate(specs)
    assert [b.identity.name for b in crate.boards] == ["A", "B", "T"]
    assert crate.board(1).identity.board_type == 13
    assert crate.board(2).identity.board_type == 4
    assert isinstance(crate.board(0), SimDigitizer)
    with pytest.raises(KeyError):
        crate.board(3)
    duplicate_slot = [*specs, SimBoardSpec("C", BoardKind.DIGITIZER_MASTER, 3, 4, 104)]
    with pytest.raises(ValueError, match="slot"):
        SimCrate(duplicate_slot)


def test_crate_reset_accounting_zeroes_every_board():
    clock = ManualClock()
    crate = make_crate(clock, slots=(3, 4), event_rate_hz=1000)
    for board in crate.boards:
        board.set_master_logic(True)
    clock.advance(100_000)
    assert all(board.status().depth_words > 0 for board in crate.boards)
    crate.reset_accounting()
    assert all(board.generated == board.dropped == board.cleared == 0 for board in crate.boards)


def test_callbacks_from_other_threads_while_the_reader_polls():
    """inLoop polls and reads while EPICS callbacks change settings and read counters."""
    board = make_crate(MonotonicClock(), event_rate_hz=20_000, trace_samples=20).board(0)
    board.set_master_logic(True)
    stop = threading.Event()
    errors: list[BaseException] = []
    received = [0]

    def reader() -> None:
        out = np.zeros(1 << 18, dtype=WORD)
        try:
            while not stop.is_set():
                status = board.status()
                if status.full:
                    board.reset_fifo()
                elif status.depth_words:
                    board.read(out, status.depth_words)
                    lengths = packet_length(out[1 : status.depth_words : 24])
                    received[0] += status.depth_words // 24
                    assert (lengths == 23).all()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 0.5
        rate = 10_000.0
        while time.monotonic() < deadline:
            rate = 30_000.0 - rate
            board.set_event_rate(rate)
            board.set_header_type(8 if rate > 15_000 else 7)
            board.inject(Fault.NONE)
            assert board.generated >= 0
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive() and not errors
    board.set_master_logic(False)
    received[0] += read_words(board).size // 24
    assert received[0] > 0
    assert received[0] == board.generated - board.cleared

"""The simulated master trigger: 16-word packets bit for bit (spec 04), in one FIFO only."""

from __future__ import annotations

import numpy as np
import pytest

from ioc.hardware import MAIN_DATA_FIFO, WORD, BoardKind, ReadError
from sim import Fault, ManualClock, SimBoardSpec, SimCrate, SimTrigger


def make_trigger(clock: ManualClock, **sim) -> SimTrigger:
    spec = SimBoardSpec("TRIG", BoardKind.TRIGGER_MASTER, 2, 4, 99, **sim)
    board = SimCrate([spec], clock=clock).board(4)
    assert isinstance(board, SimTrigger)
    return board


def read_all(board, fifo: int) -> np.ndarray:
    depth = board.status(fifo).depth_words
    out = np.zeros(depth, dtype=WORD)
    board.read(out, depth, fifo)
    return out


def decode(words: np.ndarray) -> list[dict]:
    """Spec 04's trigger table, word by word."""
    assert words.size % 16 == 0
    packets = []
    for start in range(0, words.size, 16):
        w = [int(x) for x in words[start : start + 16]]
        assert all(x >> 16 == 0 for x in w), "bits 31:16 must be 0"
        packets.append(
            {
                "marker": w[0],
                "trigger_type": w[1],
                "timestamp": w[2] << 32 | w[3] << 16 | w[4],
                "wheel": w[5],
                "multiplicity": w[6],
                "user": w[7],
                "coarse_tdc": w[8],
                "mask": w[9],
            }
        )
    return packets


def test_trigger_packets_follow_the_spec_bit_for_bit():
    clock = ManualClock(start_ticks=0x0002_0000_0000)
    board = make_trigger(clock, event_rate_hz=50_000)
    assert board.selected_fifo == MAIN_DATA_FIFO
    board.set_master_logic(True)
    read_ticks = []
    packets = []
    for _ in range(10):
        read_ticks.append(clock.advance(100_000))
        words = read_all(board, MAIN_DATA_FIFO)
        assert all(words[i : i + 1].tobytes() == bytes.fromhex("0000AAAA")
                   for i in range(0, words.size, 16))  # wire bytes of word 0
        packets += [(read_ticks[-1], p) for p in decode(words)]
    assert len(packets) == board.generated > 400
    assert board.generated_by_channel.shape == (1,)
    previous = 0x0002_0000_0000
    for index, (read_tick, packet) in enumerate(packets):
        assert packet["marker"] == 0xAAAA
        assert packet["trigger_type"] in (1, 2, 4)
        assert previous < packet["timestamp"] <= read_tick
        previous = packet["timestamp"]
        assert packet["wheel"] == index & 0xFFFF
        assert 1 <= packet["multiplicity"] <= 8
        assert packet["user"] == 0
        assert packet["coarse_tdc"] == (packet["timestamp"] >> 2) & 0xFFFF
        assert packet["mask"] & 1


def test_only_the_selected_fifo_fills_and_only_while_master_logic_is_on():
    clock = ManualClock()
    board = make_trigger(clock, event_rate_hz=10_000)
    clock.advance(1_000_000)
    assert all(board.status(f).empty for f in range(16))
    board.set_master_logic(True)
    clock.advance(100_000)
    depths = [board.status(f).depth_words for f in range(16)]
    assert depths[MAIN_DATA_FIFO] > 0 and depths[MAIN_DATA_FIFO] % 16 == 0
    assert sum(depths) == depths[MAIN_DATA_FIFO]
    board.select_fifo(9)
    clock.advance(100_000)
    assert board.status(MAIN_DATA_FIFO).depth_words == depths[MAIN_DATA_FIFO]
    assert board.status(9).depth_words > 0
    board.set_master_logic(False)
    stopped = [board.status(f).depth_words for f in range(16)]
    clock.advance(1_000_000)
    assert [board.status(f).depth_words for f in range(16)] == stopped
    board.reset_fifo(9)
    assert board.status(9).empty and board.status(MAIN_DATA_FIFO).depth_words > 0
    assert board.cleared == stopped[9] // 16
    with pytest.raises(ValueError):
        board.status(16)
    with pytest.raises(ValueError):
        board.select_fifo(-1)


@pytest.mark.parametrize(
    "fault", [Fault.BAD_MARKER, Fault.BAD_LENGTH, Fault.TIMESTAMP_REGRESSION]
)
def test_packet_faults_do_not_apply_to_a_trigger(fault):
    board = make_trigger(ManualClock())
    with pytest.raises(ValueError):
        board.inject(fault)


def test_trigger_fifo_faults():
    clock = ManualClock()
    board = make_trigger(clock, event_rate_hz=10_000, fifo_words=1600)
    board.set_master_logic(True)
    board.inject(Fault.NONE)
    board.inject(Fault.FIFO_UNDERFLOW)
    board.inject(Fault.READ_ERROR)
    clock.advance(100_000)
    status = board.status(MAIN_DATA_FIFO)
    assert status.empty and status.depth_words > 0
    with pytest.raises(ReadError):
        board.read(np.zeros(16, dtype=WORD), 16, MAIN_DATA_FIFO)
    assert board.status(MAIN_DATA_FIFO).depth_words == status.depth_words
    board.inject(Fault.FIFO_OVERFLOW)
    status = board.status(MAIN_DATA_FIFO)
    assert status.full and status.depth_words == 1600
    assert board.generated == 100
    clock.advance(100_000)
    assert board.status(MAIN_DATA_FIFO).depth_words == 1600 and board.dropped > 0
    stamps = [p["timestamp"] for p in decode(read_all(board, MAIN_DATA_FIFO))]
    assert len(stamps) == 100 and (np.diff(stamps) > 0).all()

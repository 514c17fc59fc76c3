"""inLoop against the simulated crate: real threads, the real pool, no EPICS.

A small collector thread plays outLoop: it copies every buffer inLoop queues
to qWritten and returns it to qFree, so the tests can check what a receiver
would get (whole events of one board, per-board order, the type-F headers)
and what the simulator counted (generated, dropped, cleared).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from ioc import packets
from ioc.board_reader import TRIGGER_CHUNK_WORDS, TRIGGER_MAX_WORDS, whole_events_words
from ioc.config import InLoopConfig
from ioc.hardware import WORD, BoardKind
from ioc.inloop import BoardSetup, InLoop, InLoopState
from ioc.pool import BufferPool, Owner
from ioc.scan_timing import PRESSURE_LATENCY_S, PRESSURE_READ_BYTES, read_rule, scan_delay
from sim import Fault, ManualClock, SimBoardSpec, SimCrate

SLOTS = (3, 4, 5, 6)
TRIGGER_SLOT = 2
DEFAULT_WAIT_S = 5.0


def digitizer(card: int, rate_hz: float = 500.0, trace_samples: int = 200, **sim) -> SimBoardSpec:
    return SimBoardSpec(
        f"MDIG{card + 1}",
        BoardKind.DIGITIZER_MASTER,
        SLOTS[card],
        card,
        101 + card,
        event_rate_hz=rate_hz,
        trace_samples=trace_samples,
        **sim,
    )


def trigger(card: int, rate_hz: float) -> SimBoardSpec:
    return SimBoardSpec("MTRIG", BoardKind.TRIGGER_MASTER, TRIGGER_SLOT, card, 99, rate_hz)


def eventually(predicate: Callable[[], bool], timeout: float = DEFAULT_WAIT_S) -> bool:
    """Poll ``predicate`` until true or ``timeout``: the readiness check of these tests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# ------------------------------------------------------------ what arrived


@dataclass(frozen=True, eq=False)
class Seen:
    """A copy of one buffer taken from qWritten."""

    card: int
    board_type: int
    fifo: int
    is_type_f: bool
    after_reset: bool
    words: np.ndarray  # native uint32 copy of the payload
    received_at: float

    @property
    def channel(self) -> int:
        return int(packets.channel_id(self.words[1]))

    @property
    def event_type(self) -> int:
        return int(packets.event_type(self.words[3]))

    def event_starts(self) -> list[int]:
        """Digitizer event offsets; fails unless the buffer is whole events, marker first."""
        starts, position = [], 0
        while position < self.words.size:
            assert self.words[position] == packets.MARKER, f"no marker at word {position}"
            starts.append(position)
            position += int(packets.packet_length(self.words[position + 1])) + 1
        assert position == self.words.size, "the last event runs past the end of the buffer"
        return starts

    def timestamps(self) -> np.ndarray:
        if self.board_type == BoardKind.TRIGGER_MASTER.board_type and not self.is_type_f:
            packets_ = self.words.reshape(-1, packets.TRIGGER_WORDS)
            return np.array([packets.trigger_timestamp(p) for p in packets_], dtype=np.int64)
        starts = np.array(self.event_starts())
        return packets.timestamp(self.words[starts + 2], self.words[starts + 3]).astype(np.int64)


class Collector:
    """Plays outLoop: copies each queued buffer, then returns it to qFree."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.seen: list[Seen] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            buf = self.pool.q_written.get(Owner.OUTLOOP, timeout=0.02)
            if buf is None:
                continue
            seen = Seen(
                buf.card,
                buf.board_type,
                buf.fifo,
                buf.is_type_f,
                buf.after_reset,
                buf.payload_words().astype(np.uint32),
                time.monotonic(),
            )
            with self._cond:
                self.seen.append(seen)
                self._cond.notify_all()
            self.pool.release(buf)

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout=DEFAULT_WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.seen), timeout)

    def settle(self, timeout: float = DEFAULT_WAIT_S) -> None:
        """Wait until every queued buffer has been collected."""

        def collected() -> bool:
            with self.pool.lock:
                return not any(b.owner in (Owner.WRITTEN, Owner.OUTLOOP) for b in self.pool.buffers)

        assert eventually(collected, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def of(self, card: int) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if s.card == card]


def data_of(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if not s.is_type_f]


def type_f_of(seen: list[Seen], channel: int | None = None) -> list[Seen]:
    return [s for s in seen if s.is_type_f and (channel is None or s.channel == channel)]


def event_count(seen: list[Seen]) -> int:
    total = 0
    for s in data_of(seen):
        if s.board_type == BoardKind.TRIGGER_MASTER.board_type:
            total += s.words.size // packets.TRIGGER_WORDS
        else:
            total += len(s.event_starts())
    return total


# ------------------------------------------------------------------ the rig


class Rig:
    """A simulated crate, the pool, inLoop, and the collector, wired as the IOC wires them."""

    def __init__(
        self,
        specs: list[SimBoardSpec],
        *,
        clock=None,
        config: InLoopConfig | None = None,
        disabled: frozenset[int] = frozenset(),
        fifo_num: int = 6,
    ) -> None:
        self.crate = SimCrate(specs, seed=7, clock=clock)
        self.pool = BufferPool()
        self.setups = {
            spec.card: BoardSetup(spec.card not in disabled, fifo_num, spec.package_data)
            for spec in specs
        }
        self.states: list[InLoopState] = []
        self._state_cond = threading.Condition()
        self.inloop = InLoop(
            self.crate,
            self.pool,
            config or InLoopConfig(),
            lambda: dict(self.setups),
            on_state=self._on_state,
        )
        self.collector = Collector(self.pool)
        self.held: list = []
        self.inloop.start()

    def _on_state(self, state: InLoopState) -> None:
        with self._state_cond:
            self.states.append(state)
            self._state_cond.notify_all()

    def wait_state(self, state: InLoopState, after: int = 0, timeout=DEFAULT_WAIT_S) -> None:
        with self._state_cond:
            assert self._state_cond.wait_for(lambda: state in self.states[after:], timeout), (
                f"inLoop never reached {state}: {self.states}"
            )

    def start_run(self) -> None:
        mark = len(self.states)
        self.crate.reset_accounting()
        self.inloop.request_start()
        with self._state_cond:
            assert self._state_cond.wait_for(
                lambda: {InLoopState.SCAN, InLoopState.NO_BOARDS} & set(self.states[mark:]),
                DEFAULT_WAIT_S,
            )

    def stop_run(self) -> None:
        self.inloop.request_stop()
        assert self.inloop.wait_idle(DEFAULT_WAIT_S + 2)
        self.collector.settle()

    def hold_free_buffers(self, leave: int) -> None:
        """Take buffers out of qFree (as if stuck downstream) until ``leave`` remain."""
        while len(self.pool.q_free) > leave:
            self.held.append(self.pool.q_free.get(Owner.SENDER))

    def release_held(self) -> None:
        self.pool.release_many(self.held)
        self.held.clear()

    def close(self) -> None:
        self.release_held()
        self.inloop.shutdown(1.0)
        self.collector.close()


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*args, **kwargs) -> Rig:
        rig = Rig(*args, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
        audit = rig.pool.audit()
        assert audit.ok and audit.free == audit.total, audit


def assert_conserved(rig: Rig, card: int, dropped: bool = False) -> None:
    """Events delivered = accepted into the FIFO - cleared by resets; none dropped unless said."""
    board = rig.crate.board(card)
    assert event_count(rig.collector.of(card)) == board.generated - board.cleared
    if not dropped:
        assert board.dropped == 0


def assert_one_end_marker_last(rig: Rig, card: int) -> None:
    seen = rig.collector.of(card)
    markers = type_f_of(seen, packets.CH_END_OF_RUN)
    assert len(markers) == 1, f"card {card}: {len(markers)} end-of-run headers"
    assert seen[-1] is markers[0], f"card {card}: data after the end-of-run header"


# ---------------------------------------------------------------- unit parts


def test_scan_delay_follows_the_free_buffer_count_up_to_the_read_latency():
    longest = 1.0  # the original formula, uncapped
    assert scan_delay(200, longest=longest) == pytest.approx(0.001)
    assert scan_delay(160, longest=longest) == pytest.approx(0.001)
    assert scan_delay(159, longest=longest) == pytest.approx(0.003)
    assert scan_delay(100, longest=longest) == pytest.approx(0.180)
    assert scan_delay(60, longest=longest) == pytest.approx(0.300)
    assert scan_delay(10, longest=longest) == pytest.approx(0.450)
    assert scan_delay(0, longest=longest) == pytest.approx(0.480)
    delays = [scan_delay(free) for free in range(200, -1, -1)]
    assert delays == sorted(delays)
    assert max(delays) == pytest.approx(0.020), "a FIFO must be visited every 20 ms"


def _events(sizes: list[int]) -> np.ndarray:
    """Digitizer-like events of the given total word counts (marker + N words)."""
    parts = []
    for size in sizes:
        event = np.zeros(size, dtype=np.uint32)
        event[0] = packets.MARKER
        event[1] = packets.word1(3, size - 1, 101, 0)
        parts.append(event)
    return np.concatenate(parts).astype(WORD)


def test_a_low_pool_reads_larger_but_within_a_quarter_of_the_fifo_and_its_fill_time():
    configured = (65536, 0.020)
    physical_fifo, fill_s = 1 << 18, 0.046  # 1 MiB at 22.6 MB/s
    assert read_rule(False, *configured, physical_fifo, fill_s) == configured
    pressure = (PRESSURE_READ_BYTES, PRESSURE_LATENCY_S)
    assert read_rule(True, *configured, 1 << 22, 0.8) == pressure  # 16 MiB, slow
    assert read_rule(True, *configured, None, None) == pressure  # not known yet
    # The physical FIFO: a quarter of it, and the configured latency (above a quarter of
    # its fill time); at half that rate, a quarter of its fill time.
    assert read_rule(True, *configured, physical_fifo, fill_s) == (256 * 1024, 0.020)
    assert read_rule(True, *configured, physical_fifo, 2 * fill_s) == (256 * 1024, 0.023)
    assert read_rule(True, 1 << 20, 0.5, physical_fifo, fill_s) == (1 << 20, 0.5)  # as set


def test_whole_events_cut_falls_on_the_last_event_boundary():
    words = _events([14, 114, 511, 14, 114])
    boundaries = np.cumsum([14, 114, 511, 14, 114])
    assert whole_events_words(words) == words.size
    for cut in range(1, words.size):
        expected = int(boundaries[boundaries <= cut].max(initial=0))
        assert whole_events_words(words[:cut]) == expected, cut


def test_whole_events_cut_ignores_a_trace_word_equal_to_the_marker():
    words = _events([114, 114, 114])
    words[114 + 50] = packets.MARKER  # inside the second event's trace
    assert whole_events_words(words[: 114 + 60]) == 114
    assert whole_events_words(words[: 2 * 114 + 5]) == 2 * 114


# ---------------------------------------------------------------- whole runs


def test_a_run_of_four_digitizers_delivers_whole_events_in_order(make_rig):
    rig = make_rig([digitizer(card) for card in range(4)])
    rig.start_run()
    assert rig.inloop.stats().running
    assert rig.inloop.enabled_cards() == frozenset(range(4))
    assert rig.collector.wait_for(
        lambda seen: all(len(data_of([s for s in seen if s.card == c])) >= 3 for c in range(4))
    )
    rig.stop_run()

    stats = rig.inloop.stats()
    assert not stats.running and stats.state is InLoopState.IDLE
    assert stats.run_serial == 1
    assert rig.inloop.board_types_by_slot() == (0, 0, 12, 12, 12, 12, 0)
    seen = rig.collector.seen
    data_bytes = sum(s.words.size * 4 for s in data_of(seen))
    assert stats.bytes_read == data_bytes
    assert stats.mib_read == data_bytes // (1 << 20)
    assert stats.type_f_built == len(type_f_of(seen))
    assert stats.polls >= 4 * 3
    assert stats.last_transfer > 0 and stats.read_errors == 0
    for card in range(4):
        mine = rig.collector.of(card)
        for s in data_of(mine):
            w1 = s.words[np.array(s.event_starts()) + 1]
            assert set(packets.geographic_address(w1).tolist()) == {SLOTS[card]}
            assert set(packets.board_id(w1).tolist()) == {101 + card}
            assert s.board_type == 12 and not s.after_reset
        stamps = np.concatenate([s.timestamps() for s in data_of(mine)])
        assert np.all(np.diff(stamps) > 0), f"card {card}: events out of order"
        assert_one_end_marker_last(rig, card)
        marker = mine[-1].words
        assert marker.size == packets.TYPE_F_WORDS
        assert marker[1] == packets.word1(SLOTS[card], 3, 101 + card, packets.CH_END_OF_RUN)
        assert marker[3] & 0xFFFF0000 == 0x0C0F0000
        assert packets.timestamp(marker[2], marker[3]) >= stamps[-1]
        assert_conserved(rig, card)


def test_a_board_disabled_at_start_stays_silent(make_rig):
    rig = make_rig([digitizer(card) for card in range(3)], disabled=frozenset({1}))
    rig.start_run()
    assert rig.inloop.enabled_cards() == frozenset({0, 2})
    assert rig.collector.wait_for(lambda seen: {0, 2} <= {s.card for s in data_of(seen)})
    rig.stop_run()
    assert rig.collector.of(1) == []
    assert rig.crate.board(1).generated == 0
    assert not rig.crate.board(1).master_logic
    for card in (0, 2):
        assert_one_end_marker_last(rig, card)
        assert_conserved(rig, card)


def test_no_enabled_board_means_no_boards_until_stop(make_rig):
    rig = make_rig([digitizer(0), digitizer(1)], disabled=frozenset({0, 1}))
    rig.start_run()
    assert rig.inloop.stats().state is InLoopState.NO_BOARDS
    assert rig.inloop.stats().running
    assert not rig.inloop.wait_idle(0.05)
    rig.stop_run()
    assert rig.states == [
        InLoopState.START,
        InLoopState.NO_BOARDS,
        InLoopState.IDLE,
    ]
    assert not rig.inloop.stats().running
    assert rig.collector.seen == []


def test_a_trickle_is_coalesced_into_one_buffer_per_latency_period(make_rig):
    rig = make_rig([digitizer(0, rate_hz=100, trace_samples=0)])  # 1000 events/s, 56 kB/s
    rig.start_run()
    began = time.monotonic()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 25)
    elapsed = time.monotonic() - began
    rig.stop_run()
    data = data_of(rig.collector.of(0))[:25]
    per_buffer = [len(s.event_starts()) for s in data]
    # One buffer per 20 ms, not one per 1 ms pass: ~20 events each, never a buffer per event.
    assert len(data) <= elapsed / 0.020 + 2
    assert np.median(per_buffer) >= 8
    assert rig.inloop.stats().polls > 2 * len(data)
    assert_conserved(rig, 0)


def test_a_fast_board_is_read_at_the_size_threshold_before_the_latency(make_rig):
    config = InLoopConfig(read_threshold_bytes=65536, max_latency_s=10.0)
    rig = make_rig([digitizer(0, rate_hz=2000)], config=config)  # ~9 MB/s
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 5)
    rig.stop_run()
    data = data_of(rig.collector.of(0))
    assert all(s.words.size * 4 >= 65536 for s in data[:-1])  # the last is the drain
    assert_conserved(rig, 0)


def test_too_few_free_buffers_reads_nothing_and_loses_nothing(make_rig):
    clock = ManualClock()
    rig = make_rig([digitizer(0, rate_hz=1000)], clock=clock)
    rig.hold_free_buffers(leave=InLoopConfig().min_free_buffers - 1)
    rig.start_run()
    clock.advance_seconds(0.05)  # ~500 events, far below the FIFO's capacity
    # Nothing to wait for: a pass that reads nothing leaves no trace but the time it took.
    time.sleep(0.3)
    assert rig.collector.seen == []
    assert rig.inloop.stats().polls == 0
    board = rig.crate.board(0)
    status = board.status()
    assert status.depth_words > 0 and not status.full
    assert board.generated > 0
    assert board.dropped == 0 and board.cleared == 0
    rig.release_held()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 1)
    rig.stop_run()
    assert_conserved(rig, 0)
    assert_one_end_marker_last(rig, 0)


def test_overflow_sends_error_header_resets_and_reenables(make_rig, caplog):
    caplog.set_level(logging.WARNING, logger="ioc.inloop")
    rig = make_rig([digitizer(0), digitizer(1)])
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 2)

    def data_after_errors(count: int) -> Callable[[list[Seen]], bool]:
        def ready(seen: list[Seen]) -> bool:
            mine = [s for s in seen if s.card == 1]
            errors = [i for i, s in enumerate(mine) if s.is_type_f and s.channel == 0xF]
            return len(errors) >= count and len(data_of(mine[errors[-1] + 1 :])) >= 2

        return ready

    for overflows in (1, 2):  # overflow headers are never prescaled
        rig.crate.board(1).inject(Fault.FIFO_OVERFLOW)
        assert rig.collector.wait_for(data_after_errors(overflows))
    rig.stop_run()
    mine = rig.collector.of(1)
    errors = type_f_of(mine, packets.CH_ERROR)
    assert len(errors) == 2
    for error in errors:
        assert error.event_type == packets.EVENT_TYPE_OVERFLOW
        assert error.words[3] & 0xFFFF0000 == 0x0C8F0000
        after = mine[mine.index(error) + 1]
        assert after.after_reset, "the first buffer after a reset must say so"
    assert sum(s.after_reset for s in mine) == 2
    assert rig.crate.board(1).cleared > 0
    assert rig.crate.board(1).master_logic is False  # turned off by the stop
    assert_conserved(rig, 1, dropped=True)  # the full FIFO refused arrivals until the reset
    assert_conserved(rig, 0)
    assert_one_end_marker_last(rig, 1)
    assert rig.inloop.stats().type_f_built == len(type_f_of(rig.collector.seen))
    # One line for the first overflow; the second, within 2 s, is held back (no log flood).
    assert len([r for r in caplog.records if "overflow" in r.getMessage()]) == 1


def test_underflow_sends_error_header_type_2_and_resets(make_rig):
    rig = make_rig([digitizer(0, rate_hz=2000)])
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 1)
    rig.crate.board(0).inject(Fault.FIFO_UNDERFLOW)
    assert rig.collector.wait_for(
        lambda seen: any(s.is_type_f and s.channel == packets.CH_ERROR for s in seen)
    )
    assert rig.collector.wait_for(lambda seen: any(s.after_reset and not s.is_type_f for s in seen))
    rig.stop_run()
    seen = rig.collector.seen
    error = type_f_of(seen, packets.CH_ERROR)
    assert len(error) == 1
    assert seen[seen.index(error[0]) + 1].after_reset
    assert rig.crate.board(0).cleared > 0
    assert error[0].event_type == packets.EVENT_TYPE_UNDERFLOW
    assert error[0].words[3] & 0xFFFF0000 == 0x0D0F0000
    assert_conserved(rig, 0)
    assert_one_end_marker_last(rig, 0)


def test_read_error_counts_releases_the_buffer_and_resets(make_rig):
    clock = ManualClock()
    rig = make_rig([digitizer(0, rate_hz=1000)], clock=clock)
    rig.start_run()
    board = rig.crate.board(0)
    board.inject(Fault.READ_ERROR)
    clock.advance_seconds(0.02)
    assert eventually(lambda: rig.inloop.stats().read_errors == 1)
    stats = rig.inloop.stats()
    assert stats.last_transfer == -3
    assert stats.bytes_read == 0
    assert eventually(lambda: len(rig.pool.q_free) == rig.pool.size)
    assert rig.pool.audit().ok
    assert board.cleared == board.generated > 0
    assert data_of(rig.collector.seen) == []
    clock.advance_seconds(0.02)  # the board was re-enabled: new data flow
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 1)
    rig.stop_run()
    seen = rig.collector.seen
    assert seen[0].channel == packets.CH_EMPTY and not seen[0].after_reset
    assert seen[1].after_reset and not seen[1].is_type_f
    assert rig.inloop.stats().read_errors == 1
    assert_conserved(rig, 0)
    assert_one_end_marker_last(rig, 0)


def test_trigger_reads_whole_packets_from_the_selected_fifo(make_rig):
    clock = ManualClock()
    rig = make_rig([trigger(0, rate_hz=50_000), digitizer(1)], clock=clock, fifo_num=3)
    board = rig.crate.board(0)
    read_sizes: list[int] = []
    original_read = board.read

    def recording_read(out, nwords, fifo=0):
        read_sizes.append((nwords, fifo))
        return original_read(out, nwords, fifo)

    board.read = recording_read
    rig.start_run()
    clock.advance_seconds(0.2)  # ~10 000 packets = 640 kB: more than one 256 KiB read
    assert eventually(lambda: event_count(rig.collector.of(0)) == board.generated > 0)
    rig.stop_run()

    assert board.selected_fifo == 3
    assert board.status(6).depth_words == 0
    data = data_of(rig.collector.of(0))
    assert len(data) >= 3
    assert data[0].words.size == TRIGGER_MAX_WORDS
    for s in data:
        assert s.fifo == 3 and s.board_type == 4
        assert s.words.size % packets.TRIGGER_WORDS == 0
        assert s.words.size <= TRIGGER_MAX_WORDS
        assert np.all(s.words[:: packets.TRIGGER_WORDS] == packets.TRIGGER_MARKER)
    stamps = np.concatenate([s.timestamps() for s in data])
    assert np.all(np.diff(stamps) > 0)
    assert all(n <= TRIGGER_CHUNK_WORDS and n % 16 == 0 and fifo == 3 for n, fifo in read_sizes)
    assert max(n for n, _ in read_sizes) == TRIGGER_CHUNK_WORDS
    marker = rig.collector.of(0)[-1]
    assert marker.words[1] == packets.word1(TRIGGER_SLOT, 3, 99, packets.CH_END_OF_RUN)
    assert_one_end_marker_last(rig, 0)
    assert_conserved(rig, 0)


def test_a_fifo_deeper_than_a_buffer_is_cut_at_event_boundaries(make_rig):
    clock = ManualClock()
    spec = digitizer(0, rate_hz=3000, fifo_words=4 * 262144)  # a 4 MiB simulated FIFO
    rig = make_rig([spec], clock=clock)
    rig.start_run()
    clock.advance_seconds(0.2)  # 6000 events x 456 bytes = 2.7 MB
    board = rig.crate.board(0)
    assert eventually(lambda: event_count(rig.collector.of(0)) == board.generated > 0)
    rig.stop_run()
    data = data_of(rig.collector.of(0))
    assert len(data) >= 3
    assert all(s.words.size <= 262144 for s in data)
    stamps = np.concatenate([s.timestamps() for s in data])  # every buffer whole events
    assert np.all(np.diff(stamps) > 0)
    assert_conserved(rig, 0)


def test_a_fifo_deeper_than_a_buffer_is_read_whole_in_one_visit(make_rig):
    """With the pool's flow control waiting between passes, a board whose FIFO holds
    several buffers' worth is emptied in one visit, not one buffer per pass."""
    clock = ManualClock()
    config = InLoopConfig(max_latency_s=1.0)
    # A 64 MiB FIFO: its fill-time guard (a quarter of 7 s at this rate) stays out of the
    # way, so passes come only every 0.39 s, far apart from the one that reads.
    rig = make_rig([digitizer(0, rate_hz=3000, fifo_words=64 * 262144)], clock=clock,
                   config=config)
    rig.hold_free_buffers(leave=30)  # the flow control now waits 0.39 s after each pass
    rig.start_run()
    assert eventually(lambda: rig.inloop.stats().polls >= 2)
    polls = rig.inloop.stats().polls
    clock.advance_seconds(0.2)  # 6000 events x 456 bytes = 2.7 MB: three buffers
    board = rig.crate.board(0)
    assert eventually(lambda: event_count(rig.collector.of(0)) == board.generated > 0)
    # One pass may have been under way (it found the FIFO empty), then one read it all.
    assert rig.inloop.stats().polls - polls <= 2
    rig.release_held()
    rig.stop_run()
    assert len(data_of(rig.collector.of(0))) >= 3
    assert_conserved(rig, 0)


def test_drain_deadline_resets_what_is_left_and_still_ends_every_board(make_rig, caplog):
    caplog.set_level(logging.WARNING, logger="ioc.inloop")
    clock = ManualClock()
    config = InLoopConfig(drain_timeout_s=0.3)
    specs = [digitizer(0, rate_hz=1000), digitizer(1, rate_hz=1000)]
    rig = make_rig(specs, clock=clock, config=config)
    rig.hold_free_buffers(leave=0)  # everything stuck downstream: nothing can be read
    rig.start_run()
    clock.advance_seconds(0.05)
    began = time.monotonic()
    rig.inloop.request_stop()
    boards = [rig.crate.board(card) for card in (0, 1)]
    assert eventually(lambda: all(board.cleared > 0 for board in boards))
    assert time.monotonic() - began >= 0.3
    rig.release_held()  # buffers come back within the grace period for the 0xD headers
    assert rig.inloop.wait_idle(DEFAULT_WAIT_S)
    rig.collector.settle()
    for card, board in enumerate(boards):
        assert board.cleared == board.generated > 0
        seen = rig.collector.of(card)
        assert [s.channel for s in seen] == [packets.CH_END_OF_RUN]
        assert seen[0].after_reset
        assert_conserved(rig, card)
    assert len([r for r in caplog.records if "drain timeout" in r.getMessage()]) == 1


def test_start_during_the_drain_starts_a_new_run_after_it(make_rig):
    rig = make_rig([digitizer(0), digitizer(1)])
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 2)
    mark = len(rig.states)
    rig.inloop.request_stop()
    rig.inloop.request_start()
    rig.wait_state(InLoopState.SCAN, after=mark)
    assert rig.states[mark:] == [
        InLoopState.STOPPING,
        InLoopState.IDLE,
        InLoopState.START,
        InLoopState.SCAN,
    ]
    stats = rig.inloop.stats()
    assert stats.running and stats.run_serial == 2
    rig.stop_run()
    for card in (0, 1):
        assert len(type_f_of(rig.collector.of(card), packets.CH_END_OF_RUN)) == 2


def test_shutdown_during_a_run_ends_every_board_and_the_thread(make_rig):
    rig = make_rig([digitizer(card) for card in range(3)])
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 3)
    began = time.monotonic()
    rig.inloop.shutdown(drain_timeout=1.0)
    assert time.monotonic() - began < 2.0
    assert not [t for t in threading.enumerate() if t.name == "inLoop"]
    rig.collector.settle()
    assert not rig.inloop.stats().running
    for card in range(3):
        assert_one_end_marker_last(rig, card)
        assert_conserved(rig, card)


def test_an_empty_board_sends_one_heartbeat_per_two_seconds(make_rig):
    rig = make_rig([digitizer(0, rate_hz=0)])
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(seen) >= 2, timeout=4.0)
    rig.stop_run()
    empties = type_f_of(rig.collector.seen, packets.CH_EMPTY)
    assert len(empties) == 2
    assert empties[1].received_at - empties[0].received_at >= 1.9
    assert empties[0].words[3] & 0xFFFF0000 == 0x0C0F0000
    assert data_of(rig.collector.seen) == []
    assert rig.inloop.stats().type_f_built == 3  # two 0xE and the 0xD


def test_an_empty_header_never_goes_out_ahead_of_events_older_than_it(make_rig):
    """Events that enter the FIFO between the poll that found it empty and the latch of
    the 0xE header's timestamp are older than the header: they go out first (an online
    merge takes a board's headers as its progress, and would write them late)."""
    clock = ManualClock()
    rig = make_rig([digitizer(0, rate_hz=5000)], clock=clock)
    board = rig.crate.board(0)
    latch = board.latch_timestamp
    windows = []

    def slow_latch() -> int:  # the first latch comes 1 ms after its poll
        if not windows:
            windows.append(clock.advance(100_000))
        return latch()

    board.latch_timestamp = slow_latch
    rig.start_run()  # the manual clock moves only in that latch: the first poll is empty
    assert rig.collector.wait_for(
        lambda seen: any(s.is_type_f and s.channel == packets.CH_EMPTY for s in seen)
    )
    rig.stop_run()
    seen = rig.collector.of(0)
    empty = type_f_of(seen, packets.CH_EMPTY)[0]
    header_ts = int(packets.timestamp(empty.words[2], empty.words[3]))
    before = [s for s in data_of(seen) if seen.index(s) < seen.index(empty)]
    after = [s for s in data_of(seen) if seen.index(s) > seen.index(empty)]
    assert before and header_ts >= windows[0] - 1
    assert all((s.timestamps() <= header_ts).all() for s in before)
    assert all((s.timestamps() >= header_ts).all() for s in after)
    assert_conserved(rig, 0)


def test_a_filling_fifo_is_polled_in_time_even_when_the_flow_control_would_wait(make_rig):
    """With most of the pool held downstream the flow control asks for 0.3 s between
    passes, longer than this FIFO takes to fill (1 MiB at ~9 MB/s: 115 ms); the wait
    is cut to a quarter of the fill time inLoop measures, so nothing overflows."""
    fill_time_s = 1.15e-1
    config = InLoopConfig(max_latency_s=0.5)
    rig = make_rig([digitizer(0, rate_hz=2000, fifo_words=1 << 18)], config=config)
    rig.hold_free_buffers(leave=60)
    assert scan_delay(60, longest=config.max_latency_s) == pytest.approx(0.3)
    rig.start_run()
    began = time.monotonic()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 30)
    assert time.monotonic() - began > 3 * fill_time_s  # long enough to have overflowed
    stats = rig.inloop.stats()
    rig.release_held()
    rig.stop_run()
    board = rig.crate.board(0)
    assert board.dropped == 0 and board.cleared == 0
    assert stats.scan_gap_max_ms < 1000 * fill_time_s / 2
    assert_conserved(rig, 0)


def test_a_low_pool_packs_reads_but_reads_a_physical_fifo_before_it_is_half_full(make_rig):
    """With a quarter of the pool or less free, reads grow to pack buffers, but not to
    half a 1 MiB FIFO filling at ~9 MB/s: they wait for a quarter of it (the latency is
    set out of the way, so sizes alone decide)."""
    config = InLoopConfig(max_latency_s=10.0)
    rig = make_rig([digitizer(0, rate_hz=2000, fifo_words=1 << 18)], config=config)
    rig.hold_free_buffers(leave=40)
    rig.start_run()
    assert rig.collector.wait_for(lambda seen: len(data_of(seen)) >= 12)
    rig.release_held()
    rig.stop_run()
    sizes = [s.words.size * 4 for s in data_of(rig.collector.of(0))[1:11]]
    assert min(sizes) >= 256 * 1024, sizes
    assert np.median(sizes) < PRESSURE_READ_BYTES, sizes
    assert_conserved(rig, 0)


def test_fifo_peak_and_scan_gap_measure_the_run_and_restart_at_start(make_rig):
    clock = ManualClock()
    small_fifo = 16384
    rig = make_rig(
        [digitizer(0, rate_hz=1000, trace_samples=0, fifo_words=small_fifo), digitizer(1)],
        clock=clock,
    )
    rig.start_run()
    assert eventually(lambda: rig.inloop.stats().polls >= 4)
    # inLoop cannot poll while the pool is short: the stall ScanGapMax must show.
    rig.hold_free_buffers(leave=InLoopConfig().min_free_buffers - 1)
    time.sleep(0.3)
    clock.advance_seconds(0.05)  # every event arrives at once, so one poll sees them all
    rig.release_held()
    assert rig.collector.wait_for(lambda seen: len(data_of(rig.collector.of(0))) >= 1)
    assert rig.collector.wait_for(lambda seen: len(data_of(rig.collector.of(1))) >= 1)
    stats = rig.inloop.stats()
    assert stats.scan_gap_max_ms >= 300
    header_only, with_trace = 14, 14 + 100
    expected = {
        "MDIG1": 100 * rig.crate.board(0).generated * header_only / small_fifo,
        "MDIG2": 100 * rig.crate.board(1).generated * with_trace / rig.crate.board(1).fifo_words,
    }
    assert stats.fifo_peak_percent == pytest.approx(expected)
    assert 0 < expected["MDIG2"] < expected["MDIG1"] < 100

    rig.crate.board(0).inject(Fault.FIFO_OVERFLOW)
    assert eventually(lambda: rig.inloop.stats().fifo_peak_percent["MDIG1"] == 100)
    rig.stop_run()

    rig.start_run()
    polls = rig.inloop.stats().polls
    assert eventually(lambda: rig.inloop.stats().polls >= polls + 4)
    stats = rig.inloop.stats()
    assert stats.fifo_peak_percent == {"MDIG1": 0, "MDIG2": 0}  # reset FIFOs, clock stopped
    assert 0 < stats.scan_gap_max_ms < 250
    rig.stop_run()

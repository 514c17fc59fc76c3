"""What every simulated board shares: FIFOs filled lazily from the crate clock.

A board does nothing between calls. Each call that looks at the FIFO first
"catches up": the events that arrived since the previous call (while master
logic was on) are built straight into the FIFO, those that no longer fit are
counted as dropped. Subclasses only say how big an event is and how to write
a batch of them.

Settings live in the board's register file (`sim.board_registers`, its map in
`sim.registers`): a register write first catches up, so it applies to the events
arriving after it.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass

import numpy as np

from ioc.hardware import Board, BoardIdentity, BoardKind, FifoStatus, ReadError
from ioc.packets import HEADER_TYPE_LED
from sim import registers
from sim.arrivals import ArrivalProcess
from sim.board_registers import BoardRegisters, check_package_data
from sim.clock import CrateClock
from sim.faults import PACKET_FAULTS, Fault
from sim.fifo import Fifo

#: Default FIFO size: 256 K words (1 MiB), the physical FIFO of a digitizer.
DEFAULT_FIFO_WORDS = 262144


@dataclass(frozen=True)
class SimBoardSpec:
    """One simulated board as configured (``[[crate.board]]`` plus its ``[crate.board.sim]``)."""

    name: str
    kind: BoardKind
    slot: int
    card: int
    package_data: int
    event_rate_hz: float = 500.0  # per channel (digitizers) or triggers per second
    trace_samples: int = 200
    header_type: int = HEADER_TYPE_LED
    fifo_words: int = DEFAULT_FIFO_WORDS


class SimBoard(BoardRegisters, Board):
    """A simulated board; the public methods are safe to call from several threads."""

    #: Channels whose events are counted separately (10 per digitizer, 1 per trigger).
    CHANNELS: int
    #: Number of FIFOs the board has.
    FIFOS: int
    #: The register whose bit 0 is the master logic enable, if the board has one.
    LOGIC_REGISTER: str | None = None

    def __init__(self, spec: SimBoardSpec, clock: CrateClock, crate_seed: int) -> None:
        if not 1 <= spec.slot <= 31:
            raise ValueError(f"slot {spec.slot} does not fit the 5-bit geographic address")
        self.identity = BoardIdentity(spec.name, spec.kind, spec.slot, spec.card)
        self._lock = threading.Lock()
        self._clock = clock
        # Two streams from (seed, slot): when events arrive (and how many are lost),
        # and what they contain. Content then depends only on event order, not on
        # how the arrivals were split into builds.
        timing_seed, content_seed = np.random.SeedSequence([crate_seed, spec.slot]).spawn(2)
        self._rng = np.random.default_rng(timing_seed)
        self._content_bits = np.random.default_rng(content_seed).bit_generator
        self._event_rate_hz = 0.0
        self._arrivals = ArrivalProcess(self._rng)
        self._fifos = [Fifo(spec.fifo_words, self.CHANNELS) for _ in range(self.FIFOS)]
        self._selected = 0
        self._logic_on = False
        self._registers = self._power_on(spec, check_package_data(spec.package_data))
        self._package_data = 0  # set by _decode_registers, like every register-borne setting
        # Share of each channel's arrivals that the board's settings let through (1.0 = all).
        self._channel_shares = np.ones(self.CHANNELS)
        self._pending: set[Fault] = set()
        self._unbuilt: list[np.ndarray] = []  # arrival ticks of events not yet written
        self._unbuilt_events = 0
        self._last_tick = 0  # latest timestamp put in the FIFO, for strict order
        self._epoch = 0
        self._generated = np.zeros(self.CHANNELS, dtype=np.int64)
        self._dropped = np.zeros(self.CHANNELS, dtype=np.int64)
        self._cleared = np.zeros(self.CHANNELS, dtype=np.int64)
        self._decode_registers()
        self.set_event_rate(spec.event_rate_hz)

    # What subclasses provide.

    @abc.abstractmethod
    def _event_words(self) -> int:
        """Words per event with the current settings."""

    @abc.abstractmethod
    def _write_events(self, block: np.ndarray, ticks: np.ndarray) -> np.ndarray:
        """Write one event per tick into ``block`` (n, event words); return their channels."""

    def _corrupt(self, block: np.ndarray, ticks: np.ndarray, channels: np.ndarray) -> None:
        """Apply pending packet faults to a freshly written batch (digitizers only)."""

    def _fifo(self, fifo: int) -> Fifo:
        return self._fifos[0]

    # Generation.

    def _arrive(self) -> None:
        """Register the events that arrived since the last call; their bytes come later.

        Status polls only need the count, so building the words is deferred to
        `_build` (read, reset, counters, settings changes); polls stay cheap.
        """
        if not self._logic_on:
            return
        now = self._clock.now_ticks()
        fifo = self._fifos[self._selected]
        room = fifo.free_words // self._event_words() - self._unbuilt_events
        ticks = self._arrivals.take(now, room + 1)
        lost = 0
        if ticks.size > room:
            lost = ticks.size - room + self._arrivals.skip(now)
            ticks = ticks[:room]
        if ticks.size:
            self._unbuilt.append(ticks)
            self._unbuilt_events += ticks.size
        if lost:
            fifo.full = True
            share = self._channel_shares / self._channel_shares.sum()
            self._dropped += self._rng.multinomial(lost, share)

    def _build(self) -> None:
        """Write the registered but unbuilt events into the selected FIFO."""
        if not self._unbuilt_events:
            return
        ticks = self._unbuilt[0] if len(self._unbuilt) == 1 else np.concatenate(self._unbuilt)
        self._unbuilt.clear()
        self._unbuilt_events = 0
        self._append(self._fifos[self._selected], ticks, self._event_words())

    def _catch_up(self) -> None:
        """Bring the FIFO contents up to the clock: every arrived event built."""
        self._arrive()
        self._build()

    def _append(self, fifo: Fifo, ticks: np.ndarray, event_words: int) -> None:
        count = ticks.size
        if count == 0:
            return
        if ticks[0] <= self._last_tick:
            ticks = np.maximum(ticks, self._last_tick + 1 + np.arange(count))
        block = fifo.reserve(count * event_words).reshape(count, event_words)
        channels = self._write_events(block, ticks)
        self._corrupt(block, ticks, channels)
        fifo.commit(event_words, channels, self._epoch)
        self._last_tick = int(ticks[-1])
        self._generated += np.bincount(channels, minlength=self.CHANNELS)

    def _fill_to_capacity(self) -> None:
        """The overflow fault: real events, one tick apart, until no further one fits.

        The flag goes up before the events are published: an IOC reading the crate
        process's window (no lock) that sees them sees the overflow too, so it resets the
        FIFO and they are cleared, rather than read in the moment between the two.
        """
        fifo = self._fifos[self._selected]
        event_words = self._event_words()
        count = fifo.free_words // event_words
        fifo.full = True
        self._append(fifo, self._last_tick + 1 + np.arange(count, dtype=np.int64), event_words)
        if self._arrivals.next_tick <= self._last_tick:
            self._arrivals.restart(self._last_tick)

    # The Board interface.

    @property
    def fifo_words(self) -> int:
        """Every FIFO of a simulated board has the configured capacity."""
        return self._fifos[0].capacity_words

    def status(self, fifo: int = 0) -> FifoStatus:
        with self._lock:
            target = self._fifo(fifo)
            self._arrive()
            depth = target.depth_words
            if target is self._fifos[self._selected]:
                depth += self._unbuilt_events * self._event_words()
            empty = depth == 0
            if depth and Fault.FIFO_UNDERFLOW in self._pending:
                self._pending.discard(Fault.FIFO_UNDERFLOW)
                empty = True
            almost_full = depth >= target.almost_full_words
            return FifoStatus(target.full, almost_full, empty, depth)

    def read(self, out: np.ndarray, nwords: int, fifo: int = 0) -> int:
        with self._lock:
            target = self._fifo(fifo)
            self._catch_up()
            if not 0 <= nwords <= target.depth_words:
                raise ValueError(f"read of {nwords} words, FIFO depth {target.depth_words}")
            if Fault.READ_ERROR in self._pending:
                self._pending.discard(Fault.READ_ERROR)
                raise ReadError(f"{self.identity.name}: simulated transfer failure")
            target.read(out, nwords)
            return nwords

    def reset_fifo(self, fifo: int = 0) -> None:
        with self._lock:
            target = self._fifo(fifo)
            self._catch_up()
            self._cleared += target.clear(self._epoch)

    def set_master_logic(self, on: bool) -> None:
        with self._lock:
            self._switch_logic(on)

    def _switch_logic(self, on: bool) -> None:
        if on == self._logic_on:
            return
        if on:
            self._arrivals.restart(max(self._clock.now_ticks(), self._last_tick))
        else:
            self._arrive()
        self._logic_on = on
        if self.LOGIC_REGISTER is not None:
            value = self._registers[self.LOGIC_REGISTER]
            self._registers[self.LOGIC_REGISTER] = registers.MASTER_LOGIC_ENABLE.put(value, on)

    def _apply_settings(self, register: str, value: int) -> None:
        """Restart the arrivals if the channel shares changed; follow the logic enable bit."""
        shares = self._channel_shares
        self._decode_registers()
        if not np.array_equal(shares, self._channel_shares):
            start = max(self._clock.now_ticks(), self._last_tick)
            self._arrivals.restart(start, self._event_rate_hz * self._channel_shares.sum())
        if register == self.LOGIC_REGISTER:
            self._switch_logic(bool(registers.MASTER_LOGIC_ENABLE.get(value)))

    def reinit_pipeline(self) -> None:
        """Nothing to do: the simulated pipeline keeps no state between events."""

    # Serving the board from a crate process (`sim.process`).

    def use_fifos(self, fifos: list) -> None:
        """Fill these FIFOs (same interface as `sim.fifo.Fifo`, e.g. rings in a shared
        window) instead of the board's own; only before master logic is first on."""
        if len(fifos) != self.FIFOS:
            raise ValueError(f"{self.identity.name} has {self.FIFOS} FIFOs, not {len(fifos)}")
        with self._lock:
            self._fifos = list(fifos)

    def fill_time_s(self) -> float:
        """How long the selected FIFO takes to fill from empty at the present settings
        (infinite while master logic is off or nothing arrives)."""
        with self._lock:
            words_per_s = self._event_rate_hz * self._channel_shares.sum() * self._event_words()
            if not self._logic_on or words_per_s <= 0:
                return float("inf")
            return self._fifos[self._selected].capacity_words / words_per_s

    def catch_up(self) -> None:
        """Build every event that has arrived (the crate process's pump calls it)."""
        with self._lock:
            self._catch_up()

    def claim_fault(self, fault: Fault) -> bool:
        """Take a pending reader-side fault (underflow, read error) off the board, so that
        whoever serves its status and reads signals it instead; False if none pending."""
        with self._lock:
            pending = fault in self._pending
            self._pending.discard(fault)
            return pending

    # Simulation controls (the SIM_* PVs).

    @property
    def master_logic(self) -> bool:
        with self._lock:
            return self._logic_on

    @property
    def event_rate_hz(self) -> float:
        with self._lock:
            return self._event_rate_hz

    def set_event_rate(self, hz: float) -> None:
        """Events per second per channel (digitizer) or triggers per second, from now on.

        A digitizer channel's rate before its enable and threshold select events.
        """
        hz = float(hz)
        with self._lock:
            self._arrive()
            start = max(self._clock.now_ticks(), self._last_tick)
            self._arrivals.restart(start, hz * self._channel_shares.sum())
            self._event_rate_hz = hz

    def inject(self, fault: Fault | int) -> None:
        """Make the board produce ``fault`` once (spec 01 fault table)."""
        fault = Fault(fault)
        if fault is Fault.NONE:
            return
        if self.identity.kind.is_trigger and fault in PACKET_FAULTS:
            raise ValueError(f"{fault.name} does not apply to a trigger board")
        with self._lock:
            self._catch_up()  # events that already arrived are not "the next event"
            if fault is Fault.FIFO_OVERFLOW:
                self._fill_to_capacity()
            else:
                self._pending.add(fault)

    # Accounting since reset_accounting().

    def reset_accounting(self) -> None:
        """Start counting afresh; events already in a FIFO no longer count when cleared."""
        with self._lock:
            self._catch_up()
            self._epoch += 1
            for counter in (self._generated, self._dropped, self._cleared):
                counter[:] = 0

    @property
    def generated(self) -> int:
        """Events accepted into the FIFO."""
        with self._lock:
            self._build()
            return int(self._generated.sum())

    @property
    def dropped(self) -> int:
        """Events that arrived when the FIFO had no room for them."""
        with self._lock:
            self._build()
            return int(self._dropped.sum())

    @property
    def cleared(self) -> int:
        """Events thrown away by FIFO resets."""
        with self._lock:
            self._build()
            return int(self._cleared.sum())

    @property
    def generated_by_channel(self) -> np.ndarray:
        with self._lock:
            self._build()
            return self._generated.copy()

    @property
    def dropped_by_channel(self) -> np.ndarray:
        with self._lock:
            self._build()
            return self._dropped.copy()

    @property
    def cleared_by_channel(self) -> np.ndarray:
        with self._lock:
            self._build()
            return self._cleared.copy()

"""What a system configuration is: the types `ioc.config` loads (spec 01).

Frozen dataclasses, so a loaded configuration cannot change under the IOC; the
defaults here are what a key left out of the file means. Where spec 01 is silent:

- a crate id is a two-digit string ("01"); one digit ("1") or a TOML integer
  0..99 is accepted and zero-padded (TOML cannot write ``01`` as an integer);
- ``ca_port`` / ``pva_port`` left out mean the EPICS defaults (5064 / 5075,
  or whatever the environment sets);
- the globals IOC serves PV Access on ``globals_pva``, by default the standard
  port 5075 on the ``globals_ca`` host;
- autosaved values go to ``state_dir``, by default a fixed per-user directory
  (`default_state_dir`) so that where an IOC is started from does not matter.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ioc.hardware import MAIN_DATA_FIFO, BoardKind
from ioc.packets import HEADER_TYPE_LED
from ioc.spectra import SPECTRUM_BINS

#: EPICS server ports used when the configuration names none.
DEFAULT_CA_PORT = 5064
DEFAULT_PVA_PORT = 5075
#: Autosave directory under $XDG_STATE_HOME (default ~/.local/state) when none is configured.
STATE_DIR_NAME = "dgs-crate-ioc"

_CRATE_ID = re.compile(r"[0-9]{2}")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming where and what."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class SimBoardConfig:
    """How the simulated backend drives one board."""

    event_rate_hz: float = 500.0  # per channel (digitizer) or triggers per second
    trace_samples: int = 200
    header_type: int = HEADER_TYPE_LED  # 7 LED / 8 CFD; TOML says "LED" / "CFD"
    fifo_words: int = 262144


@dataclass(frozen=True)
class ReplayConfig:
    """What the replay backend (``backend = "replay"``) plays back and how fast."""

    #: Run directories, GEB run files or ``--save-raw`` reply files (``[crate.replay] source``).
    source: tuple[str, ...] = ()
    #: Recorded pace divided by this; 0 (TOML "max") = as fast as the IOC reads.
    speed: float = 1.0
    #: Start again from the beginning when the recording ends.
    loop: bool = False
    #: Capacity of each replayed board FIFO in words (a real board's is 1 MiB).
    fifo_words: int = 262144


@dataclass(frozen=True)
class BoardConfig:
    """One board of a crate, as it appears in PV names and packets."""

    name: str
    kind: BoardKind
    card: int
    slot: int
    package_data: int
    enabled: bool = False  # CS_Ena at boot
    fifo_num: int = MAIN_DATA_FIFO  # FifoNum at boot (trigger boards)
    sim: SimBoardConfig = SimBoardConfig()
    #: CalGain0..9 / CalOffset0..9 at boot (digitizers); None: the backend's default
    #: (`ioc.monitoring.default_calibration`).
    cal_gain: tuple[float, ...] | None = None
    cal_offset: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SenderConfig:
    """Data-server settings (spec 02 §4)."""

    max_reply_bytes: int = 280000
    idle_wait_s: float = 0.020
    accept_delay_s: float = 0.0
    max_segment: int = 32764  # 0: leave the OS default
    idle_timeout_s: float = 10.0
    #: After Stop, how long undelivered data wait for a receiver; 0: until the next Start.
    delivery_timeout_s: float = 0.0
    #: Memory budget of undelivered data (MiB); past it whole incoming buffers are discarded.
    retain_mib: int = 184


@dataclass(frozen=True)
class InLoopConfig:
    """Reader coalescing and drain limits (spec 02 §2)."""

    read_threshold_bytes: int = 65536
    max_latency_s: float = 0.020
    drain_timeout_s: float = 5.0
    #: Read nothing while qFree holds fewer buffers (the original's 10; retention packs
    #: data into full buffers, so every other buffer is memory it can use).
    min_free_buffers: int = 4
    #: SCHED_FIFO priority of the inLoop thread (1..98), 0 for the normal policy; the
    #: IOC's other Python threads then run at priority 1 (`ioc.realtime`). Refused
    #: without the privilege, which is logged and shown.
    realtime_priority: int = 0
    #: The interpreter's thread switch interval while a run goes (its default is
    #: 5 ms); 0 leaves it alone.
    run_switch_interval_s: float = 0.0


@dataclass(frozen=True)
class CrateConfig:
    """One crate = one IOC process."""

    crate: str
    host: str = "127.0.0.1"
    ca_port: int | None = None
    pva_port: int | None = None
    data_port: int = 9001
    data_bind: str = "0.0.0.0"
    backend: str = "sim"
    #: Backend "sim": "spawn" starts the crate process with the IOC, "attach" uses a running
    #: `dgs-sim` serving window `sim_window` (None: "dgs-sim-<crate>-<data_port>").
    sim_process: str = "spawn"
    sim_window: str | None = None
    #: SCHED_FIFO priority of the crate process (0: the normal policy): simulated
    #: hardware makes its events on time whatever else the host runs, as boards do.
    sim_realtime_priority: int = 0
    seed: int = 1
    #: Bins of every Spectrum<n> waveform of the crate's digitizers (`ioc.spectra`).
    spectrum_bins: int = SPECTRUM_BINS
    #: Networks (CIDR) whose receivers the data port serves; empty: every address.
    allowed_receivers: tuple[str, ...] = ()
    #: Sampled events over the classic protocol (0: any free port); see ioc.sample_port.
    sample_port: int = 9002
    #: TCP port of the sampling service's PV Access server (0: any free port).
    sample_pva_port: int = 0
    #: What a classic client on the sample port gets (ioc.sample_filter; "": digitizer events).
    sample_filter: str = ""
    #: Events a sampling consumer may have queued before new samples are dropped.
    sample_queue_events: int = 20_000
    sender: SenderConfig = SenderConfig()
    inloop: InLoopConfig = InLoopConfig()
    replay: ReplayConfig = ReplayConfig()
    boards: tuple[BoardConfig, ...] = ()
    #: Lines to print at start-up about legal but probably unintended settings.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def board_by_card(self, card: int) -> BoardConfig | None:
        """The board at card index ``card``, or None for an empty index."""
        return next((board for board in self.boards if board.card == card), None)


@dataclass(frozen=True)
class SystemConfig:
    """A whole system: its crates and where the global run-control records live."""

    globals: str = "local"
    globals_ca: str = f"127.0.0.1:{DEFAULT_CA_PORT}"
    globals_pva: str | None = None  # None: DEFAULT_PVA_PORT on the globals_ca host
    state_dir: str | None = None  # None: default_state_dir()
    #: Refuse writes to the crate set-up (RUNPROTECT group) while a run is active.
    run_protect: bool = False
    crates: tuple[CrateConfig, ...] = ()
    source: str = field(default="", compare=False)  # file name or "demo"

    def crate(self, crate_id: str | int | None) -> CrateConfig:
        """The crate with this id; None picks the only crate."""
        if crate_id is None:
            if len(self.crates) != 1:
                raise ConfigError(
                    f"{self.source}: {len(self.crates)} crates "
                    f"({self._crate_ids()}): choose one with --crate"
                )
            return self.crates[0]
        try:
            wanted = normalize_crate_id(crate_id)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: {error}") from None
        for crate in self.crates:
            if crate.crate == wanted:
                return crate
        raise ConfigError(f"{self.source}: no crate {crate_id!r} (crates: {self._crate_ids()})")

    @property
    def globals_endpoint(self) -> tuple[str, int]:
        """``globals_ca`` split into host and CA port."""
        host, _, port = self.globals_ca.rpartition(":")
        return host, int(port)

    @property
    def globals_pva_endpoint(self) -> tuple[str, int]:
        """Where the globals IOC serves PV Access: ``globals_pva``, else the standard
        PVA port on the ``globals_ca`` host."""
        if self.globals_pva is None:
            return self.globals_endpoint[0], DEFAULT_PVA_PORT
        host, _, port = self.globals_pva.rpartition(":")
        return host, int(port)

    @property
    def state_directory(self) -> Path:
        """The autosave directory: ``state_dir`` (``~`` expanded), else `default_state_dir`."""
        if self.state_dir is None:
            return default_state_dir()
        return Path(self.state_dir).expanduser()

    def _crate_ids(self) -> str:
        return ", ".join(crate.crate for crate in self.crates)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/dgs-crate-ioc``, else ``~/.local/state/dgs-crate-ioc``.

    Per user and independent of the working directory, so a restarted IOC finds
    what it saved wherever it is started from.
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG rule: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / STATE_DIR_NAME


def normalize_crate_id(value: str | int) -> str:
    """``"01"``, ``1`` or ``"1"`` -> ``"01"``; ConfigError for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"crate id must be a two-digit string, got {show_value(value)}")
    text = str(value)
    if isinstance(value, int) or len(text) == 1:
        text = text.zfill(2)
    if not _CRATE_ID.fullmatch(text):
        raise ConfigError(f'crate id must be two digits "00".."99", got {show_value(value)}')
    return text


def show_value(value: Any) -> str:
    """A scalar value as a user would recognise it from the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)

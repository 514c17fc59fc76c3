"""System configuration: one TOML file describes every crate and its boards (spec 01).

Parsing is strict on purpose: a misspelt key or an out-of-range value stops
start-up with ONE line naming the file, crate, board and key, instead of the
IOC silently running with a default. Every key is optional except a crate's
``crate`` id and a board's name, kind, card, slot and package data, so old
files keep working when keys are added.

Choices where spec 01 is silent:

- a crate id is a two-digit string ("01"); one digit ("1") or a TOML integer
  0..99 is accepted and zero-padded (TOML cannot write ``01`` as an integer);
- ``ca_port`` / ``pva_port`` left out mean the EPICS defaults (5064 / 5075,
  or whatever the environment sets); for the port-clash check they count as
  5064 / 5075;
- crates on the same host must not share a CA, PVA, data or sampling port, and remote
  globals must not sit on any of those ports ("localhost" = 127.0.0.1);
- a file with several crates must use remote globals (the global records live
  in ONE place); the command line may still override one crate to "local";
- the globals IOC serves PV Access on ``globals_pva``, by default the standard
  port 5075 on the ``globals_ca`` host; in a file with remote globals it must
  not sit on a port of a crate on that host, nor on ``globals_ca``;
- autosaved values go to ``state_dir``, by default a fixed per-user directory
  (`default_state_dir`) so that where an IOC is started from does not matter;
  a relative ``state_dir`` in a file is relative to that file;
- a host written as digits and dots must be a valid IPv4 address ("999.1.1.1"
  is refused here rather than failing later as an unknown host name);
- legal but probably unintended files load with warnings (``CrateConfig.warnings``,
  one line each): a crate id written as an integer, a crate without boards, a
  crate whose boards are all disabled;
- a UTF-8 byte order mark at the start of a file is accepted;
- ``[crate.replay]`` (the replay backend): ``source`` is a path or an array of
  paths, relative ones relative to the file like ``state_dir``; ``speed = "max"``
  is kept as 0; whether the files are a recording is checked when the backend
  is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ioc import backends
from ioc.hardware import MAIN_DATA_FIFO, TRIGGER_FIFOS, BoardKind
from ioc.packets import (
    DIGITIZER_CHANNELS,
    HEADER_TYPE_CFD,
    HEADER_TYPE_LED,
    MAX_TRACE_SAMPLES,
    PACKAGE_DATA_MAX,
)
from ioc.pool import BUFFER_BYTES, POOL_SIZE
from ioc.realtime import PRIORITY_RANGE
from ioc.sample_filter import SampleFilter
from ioc.spectra import MAX_SPECTRUM_BINS, SPECTRUM_BINS

#: Card indices 0..6 and VME slots 1..7 of a crate.
CARDS = 7
SLOTS = range(1, CARDS + 1)
#: EPICS server ports used when the configuration names none.
DEFAULT_CA_PORT = 5064
DEFAULT_PVA_PORT = 5075
#: TOML spelling of the simulated digitizer header types (SIM_HeaderType enum).
HEADER_TYPES = {"LED": HEADER_TYPE_LED, "CFD": HEADER_TYPE_CFD}
GLOBALS_MODES = ("local", "remote")
#: EPICS record names hold at most 60 characters; the longest board record is
#: ``VME01:<name>:user_package_data``, which leaves this much for the name.
MAX_BOARD_NAME = 60 - len("VME00:") - len(":user_package_data")
#: Reserved for the placeholder records of empty card indices (``VME01:X:CS_Ena``).
PLACEHOLDER_BOARD = "X"
#: The retention budget leaves inLoop room to read while qSender is full (in MiB = buffers).
RETAIN_MIB_MAX = (POOL_SIZE * BUFFER_BYTES >> 20) - 10
#: Largest simulated FIFO (256 MiB); a real board's is 1 MiB.
MAX_SIM_FIFO_WORDS = 1 << 26

_BOARD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_CRATE_ID = re.compile(r"[0-9]{2}")
#: Autosave directory under $XDG_STATE_HOME (default ~/.local/state) when none is configured.
STATE_DIR_NAME = "dgs-crate-ioc"


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
                    f"({_names(c.crate for c in self.crates)}): choose one with --crate"
                )
            return self.crates[0]
        try:
            wanted = normalize_crate_id(crate_id)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: {error}") from None
        for crate in self.crates:
            if crate.crate == wanted:
                return crate
        raise ConfigError(
            f"{self.source}: no crate {crate_id!r} (crates: {_names(c.crate for c in self.crates)})"
        )

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
        raise ConfigError(f"crate id must be a two-digit string, got {_show(value)}")
    text = str(value)
    if isinstance(value, int) or len(text) == 1:
        text = text.zfill(2)
    if not _CRATE_ID.fullmatch(text):
        raise ConfigError(f'crate id must be two digits "00".."99", got {_show(value)}')
    return text


# Per-key rules: the TOML type and a value check returning the problem or None.

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class _Key:
    kind: type
    check: Check | None = None


def _between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}"


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _multiple_of(step: int) -> Check:
    return lambda v: None if v % step == 0 else f"must be a multiple of {step}"


def _one_of(*choices: str) -> Check:
    quoted = [repr(c) for c in choices]
    listed = " or ".join(quoted) if len(quoted) < 3 else "one of " + ", ".join(quoted)
    return lambda v: None if v in choices else f"must be {listed}"


def _all(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        return next((p for p in (c(value) for c in checks) if p), None)

    return check


def _port(allow_zero: bool) -> Check:
    return _between(0 if allow_zero else 1, 65535)


def _host(v: str) -> str | None:
    problem = "must be a host name or IPv4 address"
    if _DOTTED_NUMBERS.fullmatch(v):  # no host name is all digits: an address
        try:
            ipaddress.IPv4Address(v)
        except ValueError:
            return problem
        return None
    return None if _HOST_NAME.fullmatch(v) else problem


def _host_port(v: str) -> str | None:
    host, colon, port = v.rpartition(":")
    if not colon or _host(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        return 'must be "host:port" with a port 1..65535'
    return None


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _backend(v: str) -> str | None:
    return backends.problem(v)


def _window_name(v: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
        return "must be a file name: letters, digits, '.', '_' or '-' (at most 100)"
    return None


def _board_name(v: str) -> str | None:
    if not _BOARD_NAME.fullmatch(v):
        return "must be a PV name part: a letter, then letters, digits or '_'"
    if v == PLACEHOLDER_BOARD:
        return "must not be 'X' (reserved for the empty-card placeholder records)"
    if len(v) > MAX_BOARD_NAME:
        return f"must be at most {MAX_BOARD_NAME} characters (EPICS record names hold 60)"
    return None


def _networks(v: list[Any]) -> str | None:
    for item in v:
        if not isinstance(item, str):
            return f"must hold CIDR strings such as \"10.0.0.0/8\", not {_describe(item)}"
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"holds {item!r}, which is not an address or CIDR network"
    return None


def _sample_filter(v: str) -> str | None:
    try:
        SampleFilter.parse(v)
    except ValueError as err:
        return str(err)
    return None


def _per_channel(low: float, high: float) -> Check:
    """An array of one number per digitizer channel, each within low..high."""

    def check(v: list[Any]) -> str | None:
        numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        if len(v) != DIGITIZER_CHANNELS or not numbers:
            return f"must be an array of {DIGITIZER_CHANNELS} numbers"
        if not all(low <= x <= high for x in v):
            return f"must hold numbers {low:g}..{high:g}"
        return None

    return check


def _max_segment(v: int) -> str | None:
    return None if v == 0 or 536 <= v <= 65535 else "must be 0 (OS default) or 536..65535"


_SYSTEM_KEYS = {
    "globals": _Key(str, _one_of(*GLOBALS_MODES)),
    "globals_ca": _Key(str, _host_port),
    "globals_pva": _Key(str, _host_port),
    "state_dir": _Key(str, _non_empty),
    "run_protect": _Key(bool),
}
_CRATE_KEYS = {
    "host": _Key(str, _host),
    "ca_port": _Key(int, _port(allow_zero=False)),
    "pva_port": _Key(int, _port(allow_zero=False)),
    "data_port": _Key(int, _port(allow_zero=True)),
    "data_bind": _Key(str, _host),
    "backend": _Key(str, _backend),
    "sim_process": _Key(str, _one_of("spawn", "attach")),
    "sim_window": _Key(str, _window_name),
    "sim_realtime_priority": _Key(int, _between(0, PRIORITY_RANGE[1])),
    "seed": _Key(int, _between(0, 2**64 - 1)),
    "spectrum_bins": _Key(int, _between(64, MAX_SPECTRUM_BINS)),
    "allowed_receivers": _Key(list, _networks),
    "sample_port": _Key(int, _port(allow_zero=True)),
    "sample_pva_port": _Key(int, _port(allow_zero=True)),
    "sample_filter": _Key(str, _sample_filter),
    "sample_queue_events": _Key(int, _between(1, 10_000_000)),
}
_SENDER_KEYS = {
    "max_reply_bytes": _Key(int, _between(2048, 10_000_000)),
    "idle_wait_s": _Key(float, _at_least(0)),
    "accept_delay_s": _Key(float, _at_least(0)),
    "max_segment": _Key(int, _max_segment),
    "idle_timeout_s": _Key(float, _positive),
    "delivery_timeout_s": _Key(float, _at_least(0)),
    "retain_mib": _Key(int, _between(1, RETAIN_MIB_MAX)),
}
_INLOOP_KEYS = {
    "read_threshold_bytes": _Key(int, _all(_between(4, BUFFER_BYTES), _multiple_of(4))),
    "max_latency_s": _Key(float, _positive),
    "drain_timeout_s": _Key(float, _positive),
    "min_free_buffers": _Key(int, _between(1, POOL_SIZE - 1)),
    "realtime_priority": _Key(int, _between(0, PRIORITY_RANGE[1])),
    "run_switch_interval_s": _Key(float, _between(0, 0.1)),
}
_BOARD_KEYS = {
    "name": _Key(str, _board_name),
    "kind": _Key(str, _one_of(*(k.value for k in BoardKind))),
    "card": _Key(int, _between(0, CARDS - 1)),
    "slot": _Key(int, _between(SLOTS.start, SLOTS.stop - 1)),
    "package_data": _Key(int, _between(0, PACKAGE_DATA_MAX)),
    "enabled": _Key(bool),
    "fifo_num": _Key(int, _between(0, TRIGGER_FIFOS - 1)),
    "cal_gain": _Key(list, _per_channel(1e-6, 1000.0)),
    "cal_offset": _Key(list, _per_channel(-10000.0, 10000.0)),
}
_BOARD_REQUIRED = ("name", "kind", "card", "slot", "package_data")
#: Fastest replay pace the configuration accepts (beyond it, "max" says what is meant).
MAX_REPLAY_SPEED = 1_000_000.0
REPLAY_SPEED_MAX = "max"
_REPLAY_KEYS = {
    "loop": _Key(bool),
    "fifo_words": _Key(int, _all(_between(1024, MAX_SIM_FIFO_WORDS), _multiple_of(16))),
}
_REPLAY_SPECIAL_KEYS = ("source", "speed")
_SIM_KEYS = {
    "event_rate_hz": _Key(float, _between(0, 1_000_000)),
    "trace_samples": _Key(int, _all(_between(0, MAX_TRACE_SAMPLES), _multiple_of(2))),
    "header_type": _Key(str, _one_of(*HEADER_TYPES)),
    "fifo_words": _Key(int, _all(_between(1024, MAX_SIM_FIFO_WORDS), _multiple_of(16))),
}


def _toml_type(value: Any) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", dict: "table", list: "array"}.get(
        type(value), "date/time"
    )


def _show(value: Any) -> str:
    """A scalar value as a user would recognise it from the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _describe(value: Any) -> str:
    """A value's TOML type, and the value itself when it is a plain scalar."""
    kind = _toml_type(value)
    return kind if kind in ("table", "array", "date/time") else f"{kind} {_show(value)}"


def _checked(where: str, key: str, value: Any, rule: _Key) -> Any:
    """``value`` converted to the rule's type, or ConfigError naming the problem."""
    wanted = {
        int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array"
    }[rule.kind]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if rule.kind is float and is_number:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value}")
    elif rule.kind is int and isinstance(value, float) and value.is_integer():
        raise ConfigError(f"{where}: {key} must be an integer, got float {value} (drop the '.0')")
    elif not isinstance(value, rule.kind) or (rule.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {wanted}, got {_describe(value)}")
    problem = rule.check(value) if rule.check else None
    if problem:
        raise ConfigError(f"{where}: {key} {problem}, got {_show(value)}")
    return value


def _reject_unknown(where: str, table: Mapping[str, Any], known: Iterable[str], name: str):
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            table_name = "" if name in where else f" in {name}"
            raise ConfigError(f"{where}: unknown key {key!r}{table_name}{hint}")


def _read_keys(
    where: str,
    table: Mapping[str, Any],
    rules: Mapping[str, _Key],
    name: str,
    subtables: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The checked values of ``rules`` present in ``table``; unknown keys are errors."""
    _reject_unknown(where, table, [*rules, *subtables], name)
    return {
        key: _checked(where, key, table[key], rule) for key, rule in rules.items() if key in table
    }


def _subtable(where: str, table: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table, got {_describe(value)}")
    return value


def _table_list(where: str, table: Mapping[str, Any], key: str, name: str) -> list[Any]:
    """An array of tables (``[[name]]``); a single ``[name]`` table counts as one."""
    value = table.get(key, [])
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{where}: {key} must be an array of tables [[{name}]]")
    return value


def _parse_sim(where: str, table: Mapping[str, Any]) -> SimBoardConfig:
    values = _read_keys(where, table, _SIM_KEYS, "[crate.board.sim]")
    if "header_type" in values:
        values["header_type"] = HEADER_TYPES[values["header_type"]]
    return SimBoardConfig(**values)


def _parse_replay(where: str, table: Mapping[str, Any]) -> ReplayConfig:
    """``[crate.replay]``: ``source`` is a path or an array of paths, ``speed`` a number
    or "max"; the files themselves are checked when the backend is built."""
    _reject_unknown(where, table, [*_REPLAY_SPECIAL_KEYS, *_REPLAY_KEYS], "[crate.replay]")
    values: dict[str, Any] = _read_keys(
        where, {k: v for k, v in table.items() if k in _REPLAY_KEYS}, _REPLAY_KEYS,
        "[crate.replay]",
    )
    if "source" in table:
        source = table["source"]
        paths = [source] if isinstance(source, str) else source
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(
                f"{where}: source must be a path or an array of paths, got {_describe(source)}"
            )
        if not paths or not all(p.strip() for p in paths):
            raise ConfigError(f"{where}: source must name at least one file or directory")
        values["source"] = tuple(paths)
    if "speed" in table:
        values["speed"] = _replay_speed(where, table["speed"])
    return ReplayConfig(**values)


def _replay_speed(where: str, value: Any) -> float:
    """A pace factor 0 < speed <= MAX_REPLAY_SPEED, or 0 / "max" for as fast as read."""
    if value == REPLAY_SPEED_MAX:
        return 0.0
    wanted = f'must be a number 0..{MAX_REPLAY_SPEED:g} or "max"'
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: speed {wanted}, got {_describe(value)}")
    if not math.isfinite(value) or not 0 <= value <= MAX_REPLAY_SPEED:
        raise ConfigError(f"{where}: speed {wanted}, got {_show(value)}")
    return float(value)


def _parse_board(crate_where: str, index: int, table: Mapping[str, Any]) -> BoardConfig:
    where = f"{crate_where} board #{index}"
    if "name" in table:
        name = _checked(where, "name", table["name"], _BOARD_KEYS["name"])
        where = f"{crate_where} board {name}"
    values = _read_keys(where, table, _BOARD_KEYS, "[crate.board]", subtables=("sim",))
    for key in _BOARD_REQUIRED:
        if key not in values:
            raise ConfigError(f"{where}: missing required key {key!r}")
    values["kind"] = BoardKind(values["kind"])
    for key in ("cal_gain", "cal_offset"):
        if key in values:
            values[key] = tuple(float(x) for x in values[key])
    sim_where = f"{where} [crate.board.sim]"
    return BoardConfig(**values, sim=_parse_sim(sim_where, _subtable(where, table, "sim")))


def _parse_crate(source: str, index: int, table: Mapping[str, Any]) -> CrateConfig:
    where = f"{source}: crate #{index}"
    if "crate" not in table:
        raise ConfigError(f"{where}: missing required key 'crate' (the two-digit crate id)")
    try:
        crate_id = normalize_crate_id(table["crate"])
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    where = f"{source}: crate {crate_id}"
    values = _read_keys(
        where,
        table,
        _CRATE_KEYS,
        "[[crate]]",
        subtables=("crate", "sender", "inloop", "replay", "board"),
    )
    sender_where = f"{where} [crate.sender]"
    inloop_where = f"{where} [crate.inloop]"
    sender = _read_keys(
        sender_where, _subtable(where, table, "sender"), _SENDER_KEYS, "[crate.sender]"
    )
    inloop = _read_keys(
        inloop_where, _subtable(where, table, "inloop"), _INLOOP_KEYS, "[crate.inloop]"
    )
    replay = _parse_replay(f"{where} [crate.replay]", _subtable(where, table, "replay"))
    if values.get("backend") == backends.REPLAY_NAME and not replay.source:
        raise ConfigError(
            f'{where}: backend "replay" needs [crate.replay] source = "<run directory or files>"'
        )
    boards = tuple(
        _parse_board(where, number, board)
        for number, board in enumerate(_table_list(where, table, "board", "crate.board"), 1)
    )
    if "allowed_receivers" in values:
        values["allowed_receivers"] = tuple(values["allowed_receivers"])
    return CrateConfig(
        crate=crate_id,
        **values,
        sender=SenderConfig(**sender),
        inloop=InLoopConfig(**inloop),
        replay=replay,
        boards=boards,
        warnings=_crate_warnings(where, table["crate"], crate_id, boards),
    )


def _crate_warnings(
    where: str, written_id: Any, crate_id: str, boards: tuple[BoardConfig, ...]
) -> tuple[str, ...]:
    """Settings that load but probably do not say what was meant."""
    warnings = []
    if isinstance(written_id, int):
        warnings.append(
            f"{where}: crate = {written_id} is an integer; write the two-digit string "
            f'crate = "{crate_id}"'
        )
    if not boards:
        warnings.append(f"{where}: no [[crate.board]]: the IOC serves its PVs but no data")
    elif not any(board.enabled for board in boards):
        warnings.append(
            f"{where}: every board is disabled (enabled = false): no data until one is "
            f"enabled (VME{crate_id}:<board>:CS_Ena)"
        )
    return tuple(warnings)


def _names(items: Iterable[str]) -> str:
    return ", ".join(items)


def _first_duplicate(pairs: Iterable[tuple[Any, Any]]) -> tuple[Any, list[Any]] | None:
    """The first value seen twice and the names of everything holding it."""
    holders: dict[Any, list[str]] = {}
    for value, holder in pairs:
        holders.setdefault(value, []).append(holder)
    return next(((v, h) for v, h in holders.items() if len(h) > 1), None)


def _check_crate(where: str, crate: CrateConfig) -> None:
    duplicate = _first_duplicate((b.name, str(b.card)) for b in crate.boards)
    if duplicate:
        name, cards = duplicate
        raise ConfigError(f"{where}: duplicate name {name} (cards {_names(cards)})")
    for key in ("card", "slot"):
        duplicate = _first_duplicate((getattr(b, key), b.name) for b in crate.boards)
        if duplicate:
            value, holders = duplicate
            raise ConfigError(f"{where}: duplicate {key} {value} ({_names(holders)})")
    triggers = [b.name for b in crate.boards if b.kind.is_trigger]
    if len(triggers) > 1:
        raise ConfigError(
            f"{where}: at most one trigger_master per crate, got {len(triggers)} "
            f"({_names(triggers)})"
        )


def _same_host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _check_system(system: SystemConfig, source: str, *, file_rules: bool) -> None:
    """Rules that span boards and crates, run after every key passed its own check."""
    duplicate = _first_duplicate((c.crate, c.crate) for c in system.crates)
    if duplicate:
        raise ConfigError(f"{source}: duplicate crate {duplicate[0]}")
    for crate in system.crates:
        _check_crate(f"{source}: crate {crate.crate}", crate)

    duplicate = _first_duplicate(
        (b.package_data, (c.crate, b.name)) for c in system.crates for b in c.boards
    )
    if duplicate:
        value, holders = duplicate
        crates = {crate for crate, _ in holders}
        if len(crates) == 1:
            where = f"{source}: crate {holders[0][0]}"
            listed = _names(name for _, name in holders)
        else:
            where = source
            listed = _names(f"crate {crate} {name}" for crate, name in holders)
        raise ConfigError(
            f"{where}: duplicate package_data {value} ({listed}): it must be unique in the system"
        )

    endpoints: dict[tuple[str, int], str] = {}
    for crate in system.crates:
        host = _same_host(crate.host)
        for key, port in (
            ("ca_port", crate.ca_port or DEFAULT_CA_PORT),
            ("pva_port", crate.pva_port or DEFAULT_PVA_PORT),
            ("data_port", crate.data_port),
            ("sample_port", crate.sample_port),
            ("sample_pva_port", crate.sample_pva_port),
        ):
            if port == 0:
                continue
            user = f"crate {crate.crate} {key}"
            if (host, port) in endpoints:
                raise ConfigError(
                    f"{source}: {user} {port} clashes with {endpoints[host, port]} on {crate.host}"
                )
            endpoints[host, port] = user

    if system.globals == "remote":
        host, port = system.globals_endpoint
        user = endpoints.get((_same_host(host), port))
        if user:
            raise ConfigError(
                f"{source}: globals_ca {system.globals_ca} clashes with {user}; remote "
                "globals need their own IOC (dgs-ioc --globals-only) on a port of its own"
            )
        endpoints[_same_host(host), port] = "globals_ca"
        host, port = system.globals_pva_endpoint
        user = endpoints.get((_same_host(host), port))
        # Only the globals IOC and run control use globals_pva, and they read the file;
        # a crate following globals given on its command line does not.
        if user and file_rules:
            which = system.globals_pva or f"{host}:{port} (the default)"
            raise ConfigError(
                f"{source}: globals_pva {which} clashes with {user}; give the globals IOC "
                'a PV Access port of its own with [system] globals_pva = "host:port"'
            )
    if file_rules and system.globals == "local" and len(system.crates) > 1:
        raise ConfigError(
            f"{source}: globals = 'local' with {len(system.crates)} crates: the global "
            "run-control records live in one place; use globals = 'remote' and "
            "dgs-ioc --globals-only"
        )


def parse_config(text: str, source: str) -> SystemConfig:
    """A validated system from TOML text; ``source`` names it in messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: invalid TOML: {error}") from None
    _reject_unknown(source, document, ("system", "crate"), "the top level")
    system_values = _read_keys(
        f"{source}: [system]", _subtable(source, document, "system"), _SYSTEM_KEYS, "[system]"
    )
    crate_tables = _table_list(source, document, "crate", "crate")
    if not crate_tables:
        raise ConfigError(f"{source}: no [[crate]] table: a system needs at least one crate")
    crates = tuple(_parse_crate(source, n, table) for n, table in enumerate(crate_tables, 1))
    system = SystemConfig(**system_values, crates=crates, source=source)
    _check_system(system, source, file_rules=True)
    return system


def load_config(path: str | os.PathLike[str]) -> SystemConfig:
    """Read and validate a configuration file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            text = file.read().decode("utf-8-sig")  # editors on Windows may add a BOM
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    system = _anchor_replay_sources(parse_config(text, source), source)
    state_dir = system.state_dir
    if state_dir is not None and not os.path.isabs(os.path.expanduser(state_dir)):
        anchored = os.path.join(os.path.dirname(os.path.abspath(source)), state_dir)
        system = dataclasses.replace(system, state_dir=anchored)
    return system


def _anchor_replay_sources(system: SystemConfig, source: str) -> SystemConfig:
    """Relative replay sources are relative to the configuration file, like ``state_dir``."""
    base = os.path.dirname(os.path.abspath(source))
    crates = tuple(
        dataclasses.replace(
            crate,
            replay=dataclasses.replace(
                crate.replay,
                source=tuple(
                    os.path.join(base, os.path.expanduser(path)) for path in crate.replay.source
                ),
            ),
        )
        for crate in system.crates
    )
    return dataclasses.replace(system, crates=crates)


def demo_config() -> SystemConfig:
    """The demonstration system of spec 01 (``dgs-ioc --demo``)."""
    boards = tuple(
        BoardConfig(
            name=f"MDIG{card + 1}",
            kind=BoardKind.DIGITIZER_MASTER,
            card=card,
            slot=card + 3,
            package_data=101 + card,
            enabled=True,
        )
        for card in range(4)
    )
    crate = CrateConfig(crate="01", data_port=9001, data_bind="127.0.0.1", seed=1, boards=boards)
    system = SystemConfig(globals="local", crates=(crate,), source="demo")
    _check_system(system, system.source, file_rules=True)
    return system


def with_overrides(
    system: SystemConfig,
    crate: str | int | None,
    *,
    data_port: int | None = None,
    globals: str | None = None,
    globals_ca: str | None = None,
    ca_port: int | None = None,
    pva_port: int | None = None,
    state_dir: str | None = None,
    sample_port: int | None = None,
) -> tuple[SystemConfig, CrateConfig]:
    """Apply command-line overrides to the selected crate; None leaves a value as it is.

    The result is validated again, except that ``globals = "local"`` is allowed
    in a multi-crate file here: running one crate standalone is deliberate.
    """
    chosen = system.crate(crate)
    source = f"{system.source} with command-line overrides"
    crate_changes = {
        key: value
        for key, value in (
            ("data_port", data_port), ("ca_port", ca_port), ("pva_port", pva_port),
            ("sample_port", sample_port),
        )
        if value is not None
    }
    system_changes = {
        key: value
        for key, value in (
            ("globals", globals),
            ("globals_ca", globals_ca),
            ("state_dir", state_dir),
        )
        if value is not None
    }
    for key, value in crate_changes.items():
        _checked(f"{source}: crate {chosen.crate}", key, value, _CRATE_KEYS[key])
    for key, value in system_changes.items():
        _checked(source, key, value, _SYSTEM_KEYS[key])
    updated = dataclasses.replace(chosen, **crate_changes)
    crates = tuple(updated if c is chosen else c for c in system.crates)
    result = dataclasses.replace(system, crates=crates, **system_changes)
    _check_system(result, source, file_rules=False)
    return result, updated


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def _toml_lines(values: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]


def dump_config(system: SystemConfig) -> str:
    """The system as TOML that `parse_config` reads back to an equal system."""
    header_names = {code: name for name, code in HEADER_TYPES.items()}
    lines = ["[system]", *_toml_lines({k: getattr(system, k) for k in _SYSTEM_KEYS})]
    for crate in system.crates:
        lines += ["", "[[crate]]", f"crate = {_toml_value(crate.crate)}"]
        lines += _toml_lines({k: getattr(crate, k) for k in _CRATE_KEYS})
        lines += ["", "[crate.sender]", *_toml_lines(dataclasses.asdict(crate.sender))]
        lines += ["", "[crate.inloop]", *_toml_lines(dataclasses.asdict(crate.inloop))]
        if crate.replay != ReplayConfig():
            replay_values = dataclasses.asdict(crate.replay)
            replay_values["speed"] = crate.replay.speed or REPLAY_SPEED_MAX
            lines += ["", "[crate.replay]", *_toml_lines(replay_values)]
        for board in crate.boards:
            board_values = {k: getattr(board, k) for k in _BOARD_KEYS}
            board_values["kind"] = board.kind.value
            sim_values = dataclasses.asdict(board.sim)
            sim_values["header_type"] = header_names[board.sim.header_type]
            lines += ["", "[[crate.board]]", *_toml_lines(board_values)]
            lines += ["[crate.board.sim]", *_toml_lines(sim_values)]
    return "\n".join(lines) + "\n"

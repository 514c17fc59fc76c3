"""The key schema of a configuration file: each key's TOML type and allowed values.

A rule is a `Key`: the type the value must have and a check that returns the
problem in words (or None). `checked_value` applies one rule and turns a
problem into a `ConfigError` naming the key and the value as written. Where
spec 01 is silent, a host written as digits and dots must be a valid IPv4
address ("999.1.1.1" is refused here rather than failing later as an unknown
host name).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ioc import backends
from ioc.config_types import ConfigError, show_value
from ioc.hardware import CARDS, TRIGGER_FIFOS, BoardKind
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
from ioc.spectra import MAX_SPECTRUM_BINS

#: Card indices 0..6 and VME slots 1..7 of a crate.
SLOTS = range(1, CARDS + 1)
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
#: Fastest replay pace the configuration accepts (beyond it, "max" says what is meant).
MAX_REPLAY_SPEED = 1_000_000.0
REPLAY_SPEED_MAX = "max"

_BOARD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


#: A value check: the problem in words ("must be ..."), or None.
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Key:
    """One key's rule: the TOML type its value must have, and what else it must be."""

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
            return f"must hold CIDR strings such as \"10.0.0.0/8\", not {describe_value(item)}"
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


#: The keys of each table: [system], [[crate]], [crate.sender], [crate.inloop],
#: [[crate.board]], [crate.replay] (besides source and speed), [crate.board.sim].
SYSTEM_KEYS = {
    "globals": Key(str, _one_of(*GLOBALS_MODES)),
    "globals_ca": Key(str, _host_port),
    "globals_pva": Key(str, _host_port),
    "state_dir": Key(str, _non_empty),
    "run_protect": Key(bool),
}
CRATE_KEYS = {
    "host": Key(str, _host),
    "ca_port": Key(int, _port(allow_zero=False)),
    "pva_port": Key(int, _port(allow_zero=False)),
    "data_port": Key(int, _port(allow_zero=True)),
    "data_bind": Key(str, _host),
    "backend": Key(str, _backend),
    "sim_process": Key(str, _one_of("spawn", "attach")),
    "sim_window": Key(str, _window_name),
    "sim_realtime_priority": Key(int, _between(0, PRIORITY_RANGE[1])),
    "seed": Key(int, _between(0, 2**64 - 1)),
    "spectrum_bins": Key(int, _between(64, MAX_SPECTRUM_BINS)),
    "allowed_receivers": Key(list, _networks),
    "sample_port": Key(int, _port(allow_zero=True)),
    "sample_pva_port": Key(int, _port(allow_zero=True)),
    "sample_filter": Key(str, _sample_filter),
    "sample_queue_events": Key(int, _between(1, 10_000_000)),
}
SENDER_KEYS = {
    "max_reply_bytes": Key(int, _between(2048, 10_000_000)),
    "idle_wait_s": Key(float, _at_least(0)),
    "accept_delay_s": Key(float, _at_least(0)),
    "max_segment": Key(int, _max_segment),
    "idle_timeout_s": Key(float, _positive),
    "delivery_timeout_s": Key(float, _at_least(0)),
    "retain_mib": Key(int, _between(1, RETAIN_MIB_MAX)),
}
INLOOP_KEYS = {
    "read_threshold_bytes": Key(int, _all(_between(4, BUFFER_BYTES), _multiple_of(4))),
    "max_latency_s": Key(float, _positive),
    "drain_timeout_s": Key(float, _positive),
    "min_free_buffers": Key(int, _between(1, POOL_SIZE - 1)),
    "realtime_priority": Key(int, _between(0, PRIORITY_RANGE[1])),
    "run_switch_interval_s": Key(float, _between(0, 0.1)),
}
BOARD_KEYS = {
    "name": Key(str, _board_name),
    "kind": Key(str, _one_of(*(k.value for k in BoardKind))),
    "card": Key(int, _between(0, CARDS - 1)),
    "slot": Key(int, _between(SLOTS.start, SLOTS.stop - 1)),
    "package_data": Key(int, _between(0, PACKAGE_DATA_MAX)),
    "enabled": Key(bool),
    "fifo_num": Key(int, _between(0, TRIGGER_FIFOS - 1)),
    "cal_gain": Key(list, _per_channel(1e-6, 1000.0)),
    "cal_offset": Key(list, _per_channel(-10000.0, 10000.0)),
}
REPLAY_KEYS = {
    "loop": Key(bool),
    "fifo_words": Key(int, _all(_between(1024, MAX_SIM_FIFO_WORDS), _multiple_of(16))),
}
SIM_KEYS = {
    "event_rate_hz": Key(float, _between(0, 1_000_000)),
    "trace_samples": Key(int, _all(_between(0, MAX_TRACE_SAMPLES), _multiple_of(2))),
    "header_type": Key(str, _one_of(*HEADER_TYPES)),
    "fifo_words": Key(int, _all(_between(1024, MAX_SIM_FIFO_WORDS), _multiple_of(16))),
}


def _toml_type(value: Any) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", dict: "table", list: "array"}.get(
        type(value), "date/time"
    )


def describe_value(value: Any) -> str:
    """A value's TOML type, and the value itself when it is a plain scalar."""
    kind = _toml_type(value)
    return kind if kind in ("table", "array", "date/time") else f"{kind} {show_value(value)}"


def checked_value(where: str, key: str, value: Any, rule: Key) -> Any:
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
        raise ConfigError(f"{where}: {key} must be {wanted}, got {describe_value(value)}")
    problem = rule.check(value) if rule.check else None
    if problem:
        raise ConfigError(f"{where}: {key} {problem}, got {show_value(value)}")
    return value


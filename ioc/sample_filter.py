"""What a sampling consumer asks for, and the header fields it is matched on (issue 17).

A filter is written as words, e.g. ``"board=101,102 ch=0-3 energy=100-4000
prescale=100"`` (README "Online monitoring"). Its trigger-pattern words follow
the DD system's control words, mapped onto what DGS packets carry:

- compared for equality: ``event_type`` (word 3 bits 25:23, the trigger
  type) and ``header_type`` (word 3 bits 19:16, 7 LED / 8 CFD);
- bitwise: ``flags_all`` (every one of these bits of word 4 set) and
  ``flags_none`` (none of them set); word 4 bits 15 pile-up, 14 pile-up only,
  11 CFD valid, 9 peak valid, 8 external discriminator, 7 timestamp match,
  6 veto.

The master trigger's 16-word packets carry the trigger pattern itself, so a
filter may take them instead of (``source=trigger``, or any trigger term) or
besides (``source=any``) the digitizer events: ``trigger_type`` (word 1) is
compared for equality, and ``trigger_all`` / ``trigger_none`` test the bits
of the trigger bit mask (word 9). Digitizer terms (channels, types, flags,
energy) select digitizer events only, trigger terms trigger packets only;
``board`` selects both (a trigger packet's board is its board's package
data). A digitizer term with ``source=trigger`` is refused: it could match
nothing.

Energy is (post-rise sum − pre-rise sum) / M in digitizer units (ADC counts of
pulse amplitude), M = `FILTER_LENGTH`. Fields are gathered from a buffer only
when a filter needs them, one vectorised pass per header word.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ioc import packets
from ioc.decoder import gather

#: The energy filter length M of the digitizers' pre/post-rise sums.
FILTER_LENGTH = 256
#: Header words 0..9 hold every field a filter or a sample reads.
HEADER_FIELD_WORDS = 10


class Source(enum.Enum):
    """Which packets a consumer samples."""

    DIGITIZER = "digitizer"
    TRIGGER = "trigger"
    ANY = "any"


#: Filter terms that select digitizer events, and those that select trigger packets.
DIGITIZER_TERMS = ("ch", "header_type", "event_type", "flags_all", "flags_none", "energy")
TRIGGER_TERMS = ("trigger_type", "trigger_all", "trigger_none")


class Mode(enum.Enum):
    """What a consumer wants of the matching events."""

    ALL = "all"  # every matching event
    PRESCALE = "prescale"  # 1 in N
    RECENT = "recent"  # the most recent one, on request
    READY = "ready"  # the K most recent, kept ready


@dataclass(frozen=True)
class SampleFilter:
    """What one consumer asks for; empty selections mean "any"."""

    boards: frozenset[int] = frozenset()
    channel_mask: int = 0x3FF
    header_type: int | None = None
    event_type: int | None = None
    flags_all: int = 0
    flags_none: int = 0
    energy_min: int | None = None
    energy_max: int | None = None
    source: Source = Source.DIGITIZER
    trigger_type: int | None = None
    trigger_all: int = 0
    trigger_none: int = 0
    mode: Mode = Mode.ALL
    #: N of PRESCALE, K of READY.
    count: int = 1
    traces: bool = False

    @classmethod
    def parse(cls, text: str) -> SampleFilter:
        """Parse ``"board=101,102 ch=0-3 prescale=100 energy=100-4000 traces"``."""
        fields: dict = {}
        for token in text.split():
            key, _, value = token.partition("=")
            key = key.lower()
            try:
                _parse_token(fields, key, value)
            except ValueError as err:
                raise ValueError(f"bad sample filter term {token!r}: {err}") from None
        if "source" not in fields and any(name in fields for name in TRIGGER_TERMS):
            fields["source"] = Source.TRIGGER
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.source is Source.TRIGGER and self._digitizer_terms():
            raise ValueError(
                f"bad sample filter: {', '.join(self._digitizer_terms())} select digitizer "
                "events, not trigger packets (source=any samples both)"
            )
        if self.source is Source.DIGITIZER and self._trigger_terms():
            raise ValueError(
                f"bad sample filter: {', '.join(self._trigger_terms())} select trigger "
                "packets, not digitizer events (source=any samples both)"
            )

    def _digitizer_terms(self) -> list[str]:
        given = [self.channel_mask != 0x3FF, self.header_type is not None,
                 self.event_type is not None, bool(self.flags_all), bool(self.flags_none),
                 self.energy_min is not None or self.energy_max is not None]
        return [term for term, set_ in zip(DIGITIZER_TERMS, given, strict=True) if set_]

    def _trigger_terms(self) -> list[str]:
        given = [self.trigger_type is not None, bool(self.trigger_all), bool(self.trigger_none)]
        return [term for term, set_ in zip(TRIGGER_TERMS, given, strict=True) if set_]

    @property
    def takes_digitizer(self) -> bool:
        return self.source is not Source.TRIGGER

    @property
    def takes_trigger(self) -> bool:
        return self.source is not Source.DIGITIZER

    def text(self) -> str:
        """The filter in the syntax `parse` reads."""
        terms = []
        if self.boards:
            terms.append("board=" + ",".join(map(str, sorted(self.boards))))
        if self.channel_mask != 0x3FF:
            terms.append("ch=" + ",".join(str(c) for c in range(10) if self.channel_mask >> c & 1))
        for name in ("header_type", "event_type"):
            if getattr(self, name) is not None:
                terms.append(f"{name}={getattr(self, name)}")
        for name in ("flags_all", "flags_none"):
            if getattr(self, name):
                terms.append(f"{name}=0x{getattr(self, name):x}")
        if self.energy_min is not None or self.energy_max is not None:
            low = "" if self.energy_min is None else self.energy_min
            high = "" if self.energy_max is None else self.energy_max
            terms.append(f"energy={low}-{high}")
        if self.source is not Source.DIGITIZER:
            terms.append(f"source={self.source.value}")
        if self.trigger_type is not None:
            terms.append(f"trigger_type={self.trigger_type}")
        for name in ("trigger_all", "trigger_none"):
            if getattr(self, name):
                terms.append(f"{name}=0x{getattr(self, name):x}")
        if self.mode is not Mode.ALL:
            count = "" if self.mode is Mode.RECENT else f"={self.count}"
            terms.append(self.mode.value + count)
        if self.traces:
            terms.append("traces")
        return " ".join(terms) or "all"

    def match(self, f: HeaderFields) -> np.ndarray | None:
        """Boolean mask of one buffer's events this filter takes; None: all of them.

        Only the fields the filter names are read (`HeaderFields` gathers them
        on first use); a buffer of another board is rejected by its first event.
        """
        if self.boards and f.single_board is not None and f.single_board not in self.boards:
            return np.zeros(f.count, dtype=bool)
        mask: np.ndarray | None = None

        def narrow(condition: np.ndarray) -> None:
            nonlocal mask
            mask = condition if mask is None else mask & condition

        if self.channel_mask != 0x3FF:
            narrow((self.channel_mask >> f["channel"].astype(np.int64)) & 1 == 1)
        if self.boards and f.single_board is None:
            narrow(np.isin(f["board"], list(self.boards)))
        if self.header_type is not None:
            narrow(f["header_type"] == self.header_type)
        if self.event_type is not None:
            narrow(f["event_type"] == self.event_type)
        if self.flags_all:
            narrow((f["flags"] & self.flags_all) == self.flags_all)
        if self.flags_none:
            narrow((f["flags"] & self.flags_none) == 0)
        if self.energy_min is not None:
            narrow(f["energy"] >= self.energy_min)
        if self.energy_max is not None:
            narrow(f["energy"] <= self.energy_max)
        return mask

    def match_trigger(self, board: int, f: TriggerFields) -> np.ndarray | None:
        """Boolean mask of one trigger buffer's packets this filter takes; None: all of them."""
        if self.boards and board not in self.boards:
            return np.zeros(f.count, dtype=bool)
        mask: np.ndarray | None = None
        if self.trigger_type is not None:
            mask = f["trigger_type"] == self.trigger_type
        if self.trigger_all:
            taken = (f["trigger_mask"] & self.trigger_all) == self.trigger_all
            mask = taken if mask is None else mask & taken
        if self.trigger_none:
            taken = (f["trigger_mask"] & self.trigger_none) == 0
            mask = taken if mask is None else mask & taken
        return mask


def _numbers(value: str) -> list[int]:
    """``"0-3,7"`` → [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in value.split(","):
        low, dash, high = part.partition("-")
        out.extend(range(int(low, 0), int(high, 0) + 1) if dash else [int(part, 0)])
    return out


def _parse_token(fields: dict, key: str, value: str) -> None:
    if key in ("board", "boards"):
        fields["boards"] = frozenset(_numbers(value))
    elif key in ("ch", "channel", "channels"):
        channels = _numbers(value)
        if any(not 0 <= c <= 9 for c in channels):
            raise ValueError("channels are 0..9")
        fields["channel_mask"] = sum(1 << c for c in set(channels))
    elif key in ("header_type", "event_type", "flags_all", "flags_none", "trigger_type",
                 "trigger_all", "trigger_none"):
        fields[key] = int(value, 0)
    elif key == "source":
        if value.lower() not in {source.value for source in Source}:
            raise ValueError("source is digitizer, trigger or any")
        fields["source"] = Source(value.lower())
    elif key == "trigger" and not value:
        fields["source"] = Source.TRIGGER
    elif key == "energy":
        match = re.fullmatch(r"(-?\d*)-(-?\d*)", value)
        if not match:
            raise ValueError("energy=LOW-HIGH (either may be left out)")
        low, high = match.groups()
        fields["energy_min"] = int(low) if low else None
        fields["energy_max"] = int(high) if high else None
    elif key in ("prescale", "ready"):
        count = int(value)
        if count < 1:
            raise ValueError("must be at least 1")
        fields["mode"], fields["count"] = Mode(key), count
    elif key in ("recent", "all", "every") and not value:
        fields["mode"] = Mode.RECENT if key == "recent" else Mode.ALL
    elif key == "traces" and not value:
        fields["traces"] = True
    else:
        raise ValueError("unknown term")


class HeaderFields:
    """Header fields of a buffer's events, each gathered (vectorised) when first asked for."""

    def __init__(self, native: np.ndarray, offsets: np.ndarray, *, whole: bool = False) -> None:
        """``whole``: gather the ten header words of every event at once (a few events)."""
        self.native = native
        self.offsets = offsets
        self.count = offsets.size
        self._words: dict[int, np.ndarray] = {}
        self._fields: dict[str, np.ndarray] = {}
        if whole:
            block = gather(native, offsets[:, None] + np.arange(HEADER_FIELD_WORDS))
            self._words = {index: block[:, index] for index in range(HEADER_FIELD_WORDS)}
        first, last = self.word(1)[[0, -1]] if whole else gather(native, offsets[[0, -1]] + 1)
        board = int(packets.board_id(first))
        #: The board of every event when the first and last agree (a buffer is one board's).
        self.single_board = board if board == int(packets.board_id(last)) else None

    def word(self, index: int) -> np.ndarray:
        if index not in self._words:
            self._words[index] = gather(self.native, self.offsets + index)
        return self._words[index]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._fields:
            self._fields[name] = FIELD_DECODERS[name](self)
        return self._fields[name]


def _energy(f: HeaderFields) -> np.ndarray:
    """(post-rise sum − pre-rise sum) / M, digitizer units (words 8 and 9)."""
    w8 = f.word(8).astype(np.int64)
    w9 = f.word(9).astype(np.int64)
    post = (w8 >> 24) | (w9 & 0xFFFF) << 8
    pre = w8 & 0xFFFFFF
    return (post - pre) // FILTER_LENGTH


FIELD_DECODERS: dict[str, Callable[[HeaderFields], np.ndarray]] = {
    "board": lambda f: packets.board_id(f.word(1)),
    "channel": lambda f: packets.channel_id(f.word(1)),
    "header_type": lambda f: packets.header_type(f.word(3)),
    "event_type": lambda f: packets.event_type(f.word(3)),
    "flags": lambda f: f.word(4) & 0xFFFF,
    "timestamp": lambda f: packets.timestamp(f.word(2), f.word(3)),
    "energy": _energy,
}


class TriggerFields:
    """Fields of a buffer's 16-word trigger packets, each gathered when first asked for."""

    def __init__(self, native: np.ndarray, offsets: np.ndarray) -> None:
        self.native = native
        self.offsets = offsets
        self.count = offsets.size
        self._fields: dict[str, np.ndarray] = {}

    def word(self, index: int) -> np.ndarray:
        """Word ``index`` of every packet: a 16-bit value (bits 31:16 are 0, spec 04)."""
        return gather(self.native, self.offsets + index) & 0xFFFF

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._fields:
            self._fields[name] = TRIGGER_FIELD_DECODERS[name](self)
        return self._fields[name]


def _trigger_timestamp(f: TriggerFields) -> np.ndarray:
    """Words 2, 3, 4 hold timestamp bits 47:32, 31:16, 15:0."""
    high, middle, low = (f.word(index).astype(np.uint64) for index in (2, 3, 4))
    return high << np.uint64(32) | middle << np.uint64(16) | low


TRIGGER_FIELD_DECODERS: dict[str, Callable[[TriggerFields], np.ndarray]] = {
    "trigger_type": lambda f: f.word(1),
    "timestamp": _trigger_timestamp,
    "multiplicity": lambda f: f.word(6),
    "trigger_mask": lambda f: f.word(9),
}

"""Bit layouts of digitizer, type-F and trigger packets (spec 04).

The single source of field positions for the simulator, the IOC stages, the
decoder and the receiver. Every word is 32 bits, big-endian in buffers and on
the wire; functions here work on plain integers or ``>u4`` numpy arrays.
"""

from __future__ import annotations

import numpy as np

from ioc.hardware import WORD

#: Word 0 of every digitizer and type-F packet.
MARKER = 0xAAAAAAAA
#: Word 0 of every master-trigger packet (wire bytes 00 00 AA AA).
TRIGGER_MARKER = 0x0000AAAA

#: Words 0..13 of a digitizer event.
HEADER_WORDS = 14
#: Header length field (word 3, bits 31:26) of a digitizer event.
DIGITIZER_HEADER_LENGTH = 13
#: A type-F status header is 4 words (its own 16-byte buffer).
TYPE_F_WORDS = 4
TYPE_F_HEADER_LENGTH = 3
#: outLoop rejects a packet length N above this (code 5).
MAX_PACKET_LENGTH = 510
#: Most trace samples an event can carry (N = 13 + 992 / 2 = 509).
MAX_TRACE_SAMPLES = 992
#: Master-trigger packets are fixed at 16 words.
TRIGGER_WORDS = 16
#: The channel every record of a trigger board is given (GEB files, sampled events):
#: after the digitizer channels 0..9 and the type-F 0xD..0xF, so it never collides.
TRIGGER_CHANNEL = 16
#: Channels of an ANL digitizer.
DIGITIZER_CHANNELS = 10

HEADER_TYPE_LED = 7
HEADER_TYPE_CFD = 8
HEADER_TYPE_F = 0xF

#: Type-F channel ids.
CH_END_OF_RUN = 0xD
CH_EMPTY = 0xE
CH_ERROR = 0xF
TYPE_F_CHANNELS = (CH_END_OF_RUN, CH_EMPTY, CH_ERROR)

#: Type-F event types (word 3, bits 25:23).
EVENT_TYPE_NONE = 0
EVENT_TYPE_OVERFLOW = 1
EVENT_TYPE_UNDERFLOW = 2

TIMESTAMP_MASK = (1 << 48) - 1
PACKAGE_DATA_MAX = 4094


def word1(slot: int, length: int, board_id: int, channel: int) -> int:
    """Word 1: geographic address, packet length N, board id, channel id."""
    return (
        (slot & 0x1F) << 27
        | (length & 0x7FF) << 16
        | (board_id & 0xFFF) << 4
        | (channel & 0xF)
    )


def word3(
    header_length: int,
    event_type: int,
    header_type: int,
    timestamp: int,
    *,
    cfd_sum_mode: bool = False,
    trigger_ts_mode: bool = False,
    peq_bypass: bool = False,
) -> int:
    """Word 3: header length, event type, mode bits, header type, timestamp 47:32."""
    return (
        (header_length & 0x3F) << 26
        | (event_type & 0x7) << 23
        | int(cfd_sum_mode) << 22
        | int(trigger_ts_mode) << 21
        | int(peq_bypass) << 20
        | (header_type & 0xF) << 16
        | (timestamp >> 32) & 0xFFFF
    )


def type_f_words(slot: int, package_data: int, channel: int, event_type: int, timestamp: int):
    """The four words of a type-F status header (spec 04), as a ``>u4`` array."""
    return np.array(
        [
            MARKER,
            word1(slot, TYPE_F_HEADER_LENGTH, package_data, channel),
            timestamp & 0xFFFFFFFF,
            word3(TYPE_F_HEADER_LENGTH, event_type, HEADER_TYPE_F, timestamp),
        ],
        dtype=WORD,
    )


# Field extraction, vectorised: each takes words (ints or uint arrays).


def packet_length(w1):
    """Packet length N (words after word 0) from word 1."""
    return (w1 >> 16) & 0x7FF


def geographic_address(w1):
    return (w1 >> 27) & 0x1F


def board_id(w1):
    return (w1 >> 4) & 0xFFF


def channel_id(w1):
    return w1 & 0xF


def header_type(w3):
    return (w3 >> 16) & 0xF


def event_type(w3):
    return (w3 >> 23) & 0x7


def header_length(w3):
    return (w3 >> 26) & 0x3F


def timestamp(w2, w3):
    """48-bit timestamp from words 2 (bits 31:0) and 3 (bits 47:32)."""
    if isinstance(w2, np.ndarray):
        return (w3.astype(np.uint64) & 0xFFFF) << np.uint64(32) | w2.astype(np.uint64)
    return (int(w3) & 0xFFFF) << 32 | int(w2)


def trigger_timestamp(words) -> int:
    """48-bit timestamp of a 16-word trigger packet (words 2, 3, 4 hold 47:32, 31:16, 15:0)."""
    return (int(words[2]) & 0xFFFF) << 32 | (int(words[3]) & 0xFFFF) << 16 | int(words[4]) & 0xFFFF


def trace_samples(trace_words: np.ndarray, raw: bool = False) -> np.ndarray:
    """Trace words 14..N as samples in time order: bits 13:0, then bits 29:16.

    With ``raw`` the full 16-bit halves are returned (timing and down-sampling
    marks included), else the 14-bit ADC values.
    """
    w = trace_words.astype(np.uint32)
    out = np.empty(w.size * 2, dtype=np.uint16)
    out[0::2] = w & 0xFFFF
    out[1::2] = w >> 16
    if not raw:
        out &= 0x3FFF
    return out

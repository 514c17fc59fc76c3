"""The data protocol on TCP 9001, both versions, as bytes (spec 05; docs/protocol.md).

**Classic** (gtReceiver): the receiver sends 4-byte requests, the big-endian
integer 1; the IOC answers each with a 16-byte header (type, recLen, status,
recs) and, for a data reply, recLen payload bytes. Nothing else is ever sent.

**Version 2** (this product's receivers): acknowledged and run-tagged on the
same port. The client opens with a hello (its first word can never be a
classic request); the IOC answers with its crate, the run whose data it holds
and its state. Requests then carry how many replies the client asks for and
an acknowledgement: the stream offset below which every byte is safely
stored. Every reply names its run and the stream offset of its first byte;
the IOC keeps a reply's bytes until they are acknowledged, and a new v2
connection for the same run resumes at the first unacknowledged byte.

All integers are big-endian. Both sides of the product use these codecs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# ---------------------------------------------------------------- classic

#: Message types of the classic header.
REQUEST = 1
SENDER_OFF = 3
SERVER_SUMMARY = 4
INSUFF_DATA = 5

CLASSIC_REQUEST = struct.pack(">i", REQUEST)
CLASSIC_HEADER = struct.Struct(">iiii")
INSUFF_DATA_HEADER = CLASSIC_HEADER.pack(INSUFF_DATA, 0, 0, 0)
#: Tells a classic receiver the IOC will not serve it now: it closes and connects again.
SENDER_OFF_HEADER = CLASSIC_HEADER.pack(SENDER_OFF, 0, 0, 0)


# ------------------------------------------------------------- version 2

VERSION = 2
#: First word of a v2 hello ("DGS2"); classic clients only ever send 1.
HELLO_MAGIC = b"DGS2"
#: First word of every later v2 request ("DGSR").
REQUEST_MAGIC = b"DGSR"

#: magic, version, flags, run wanted (-1: whatever the IOC holds), its start (ns, 0: any),
#: then the length of the client's description (UTF-8, at most MAX_DESCRIPTION bytes).
HELLO = struct.Struct(">4sHHiQI")
MAX_DESCRIPTION = 4096
#: magic, replies asked for (0: acknowledgement only), acknowledged stream offset.
V2_REQUEST = struct.Struct(">4sIQ")
#: type, payload length, status, run, stream offset, acknowledged offset.
V2_HEADER = struct.Struct(">iiiiQQ")
#: crate, state, run start (ns since the epoch), largest reply, number of boards.
HELLO_INFO = struct.Struct(">IIQII")
BOARD_ID = struct.Struct(">I")

#: v2 reply types beyond the classic data / no-data ones.
HELLO_REPLY = 6
REFUSED = 7

NO_RUN = -1
#: Status bit of HELLO and INSUFF_DATA replies: the run's data are all delivered
#: and acknowledged (the low byte is the crate's `_CV_State`).
COMPLETE = 0x100
STATE_MASK = 0xFF


class Refusal(enum.IntEnum):
    """Why the IOC refused a v2 connection (the status of a REFUSED reply)."""

    WRONG_RUN = 1  # it holds another run (or none): ask again later
    BUSY = 2  # another receiver is being served: ask again later
    BAD_HELLO = 3  # unknown version or malformed hello: do not retry

    @property
    def retry(self) -> bool:
        return self in (Refusal.WRONG_RUN, Refusal.BUSY)


@dataclass(frozen=True)
class Hello:
    """What a v2 client asks for when it connects, and how it describes itself.

    The IOC hands the description of the last v2 client of a run to the next
    one (in its hello reply), so a receiver taking over from a killed one can
    find what that one wrote (`receiver.journal`).
    """

    run: int = NO_RUN
    run_start_ns: int = 0
    version: int = VERSION
    flags: int = 0
    description: str = ""

    def pack(self) -> bytes:
        text = self.description.encode()[:MAX_DESCRIPTION]
        fixed = HELLO.pack(HELLO_MAGIC, self.version, self.flags, self.run, self.run_start_ns,
                           len(text))
        return fixed + text

    @staticmethod
    def description_bytes(fixed: bytes) -> int:
        """Length of the description that follows the fixed part of a hello."""
        return min(HELLO.unpack(fixed)[5], MAX_DESCRIPTION)

    @classmethod
    def unpack(cls, fixed: bytes, description: bytes = b"") -> Hello:
        magic, version, flags, run, start, _length = HELLO.unpack(fixed)
        if magic != HELLO_MAGIC:
            raise ValueError(f"not a hello: {magic!r}")
        return cls(run, start, version, flags, description.decode("utf-8", "replace"))


@dataclass(frozen=True)
class RunInfo:
    """What the IOC tells a v2 client about itself and the run it holds."""

    crate: int
    run: int
    run_start_ns: int
    state: int
    complete: bool
    max_reply: int
    boards: tuple[int, ...] = ()

    def pack(self) -> bytes:
        ids = b"".join(BOARD_ID.pack(board) for board in self.boards)
        return HELLO_INFO.pack(
            self.crate, self.status, self.run_start_ns, self.max_reply, len(self.boards)
        ) + ids

    @property
    def status(self) -> int:
        return self.state | (COMPLETE if self.complete else 0)

    @classmethod
    def unpack(cls, run: int, data: bytes) -> tuple[RunInfo, str]:
        """The info and any text after it (a refusal's message)."""
        crate, status, start, max_reply, count = HELLO_INFO.unpack_from(data)
        end = HELLO_INFO.size + count * BOARD_ID.size
        boards = tuple(b for (b,) in BOARD_ID.iter_unpack(data[HELLO_INFO.size : end]))
        info = cls(crate, run, start, status & STATE_MASK, bool(status & COMPLETE), max_reply,
                   boards)
        return info, bytes(data[end:]).decode("utf-8", "replace")


@dataclass(frozen=True)
class V2Header:
    type: int
    length: int
    status: int
    run: int
    offset: int
    acked: int

    def pack(self) -> bytes:
        return V2_HEADER.pack(self.type, self.length, self.status, self.run, self.offset,
                              self.acked)

    @classmethod
    def unpack(cls, data: bytes) -> V2Header:
        return cls(*V2_HEADER.unpack(data))


def v2_request(count: int, ack: int) -> bytes:
    return V2_REQUEST.pack(REQUEST_MAGIC, count, ack)

"""The shared-memory "VME window" of a simulated crate process.

A crate process (`sim.process`) creates one file under /dev/shm that the IOC maps,
as a crate PC maps a VME bridge's windows: a header (identity, heartbeat, the
boards' layout), one control block per board (FIFO positions and flags, the faults
the reader must see) and every FIFO's ring of 32-bit big-endian words. The crate
process writes events and the tail position; the IOC copies words out and moves the
head position; neither needs a system call for that. Calls that need an answer go
through the command socket beside it (`sim.commands`).

Positions are absolute word counts (never wrapped), so depth = tail - head and a
ring index is position % capacity. Every control value is a native int64, written
with one aligned store.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ioc.hardware import WORD

SHM_DIR = Path("/dev/shm")
MAGIC = 0x4447_5357_494E_0002  # "DGSWIN", layout version 2
PAGE = 4096
HEADER_BYTES = PAGE
#: Where the JSON layout starts in the header, and its room.
LAYOUT_OFFSET = 128
#: int64 slots per board control block: flags and FIFO positions, then the register image.
CONTROL_SLOTS = 64 + 512
#: First slot of the register image (values in the order of the board's register names).
REGISTER_BASE = 64
REGISTER_SLOTS = CONTROL_SLOTS - REGISTER_BASE
#: Header slots. H_BUILDING is 1 while the crate process builds events: they become
#: visible in the FIFOs before the heartbeat moves past them (`built_until_ns`).
H_MAGIC, H_INSTANCE, H_HEARTBEAT_NS, H_ORIGIN_NS, H_PID, H_CLOSED, H_BUILDING = range(7)
#: Board control slots: faults the reader side signals, then 3 slots per FIFO.
C_UNDERFLOW, C_READ_ERROR = 0, 1
_FIFO_BASE = 8
F_HEAD, F_TAIL, F_FULL = range(3)


def shm_path(name: str) -> Path:
    """The window file of window ``name``."""
    return SHM_DIR / name


def socket_address(name: str) -> str:
    """The command socket beside window ``name`` (Linux abstract namespace: no file to leak)."""
    return f"\0dgs-sim/{name}"


@dataclass(frozen=True)
class BoardLayout:
    """Where one board lives in the window."""

    name: str
    fifos: int
    fifo_words: int


def _ring_bytes(board: BoardLayout) -> int:
    return board.fifos * board.fifo_words * WORD.itemsize


class Window:
    """A mapped window: numpy views of its header, control blocks and rings."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._map = mmap.mmap(fd, size)
        os.close(fd)
        self.header = np.ndarray(8, dtype=np.int64, buffer=self._map)
        text = bytes(self._map[LAYOUT_OFFSET:HEADER_BYTES]).rstrip(b"\0")
        self.layout = [BoardLayout(**item) for item in json.loads(text)] if text else []
        self._controls: list[np.ndarray] = []
        self._rings: list[list[np.ndarray]] = []
        if self.layout:
            self._map_boards()

    @classmethod
    def create(cls, name: str, layout: list[BoardLayout], origin_ns: int) -> Window:
        """A new window (an old file of that name is replaced); magic is written last."""
        path = shm_path(name)
        text = json.dumps([board.__dict__ for board in layout]).encode()
        if len(text) > HEADER_BYTES - LAYOUT_OFFSET:
            raise ValueError("too many boards for one window header")
        size = _total_bytes(layout)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        window = cls(path, fd, size)
        window._map[LAYOUT_OFFSET : LAYOUT_OFFSET + len(text)] = text
        window.layout = layout
        window._map_boards()
        window.header[H_INSTANCE] = secrets.randbits(62)
        window.header[H_ORIGIN_NS] = origin_ns
        window.header[H_PID] = os.getpid()
        window.header[H_HEARTBEAT_NS] = 0
        window.header[H_MAGIC] = MAGIC
        return window

    @classmethod
    def attach(cls, name: str) -> Window:
        """The window a crate process serves (OSError if none; ValueError if not ready)."""
        path = shm_path(name)
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            os.close(fd)
            raise ValueError(f"{path} is not a crate window (yet)")
        window = cls(path, fd, size)
        if window.header[H_MAGIC] != MAGIC or size != _total_bytes(window.layout):
            window.close()
            raise ValueError(f"{path} is not a crate window (yet)")
        return window

    def _map_boards(self) -> None:
        ring_offset = _rings_offset(len(self.layout))
        for index, board in enumerate(self.layout):
            offset = HEADER_BYTES + index * CONTROL_SLOTS * 8
            self._controls.append(
                np.ndarray(CONTROL_SLOTS, dtype=np.int64, buffer=self._map, offset=offset)
            )
            rings = []
            for fifo in range(board.fifos):
                start = ring_offset + fifo * board.fifo_words * WORD.itemsize
                rings.append(
                    np.ndarray(board.fifo_words, dtype=WORD, buffer=self._map, offset=start)
                )
            self._rings.append(rings)
            ring_offset += _ring_bytes(board)

    @property
    def instance(self) -> int:
        """A random number per crate process start: a restarted process has a new one."""
        return int(self.header[H_INSTANCE])

    def control(self, board: int) -> np.ndarray:
        """Board ``board``'s control slots (see C_* and `fifo_control`)."""
        return self._controls[board]

    def fifo_control(self, board: int, fifo: int) -> np.ndarray:
        """The head, tail and full slots (F_*) of one FIFO."""
        start = _FIFO_BASE + 3 * fifo
        return self._controls[board][start : start + 3]

    def registers(self, board: int) -> np.ndarray:
        """The board's register image (the crate process keeps it current)."""
        return self._controls[board][REGISTER_BASE:]

    def ring(self, board: int, fifo: int) -> np.ndarray:
        return self._rings[board][fifo]

    def close(self) -> None:
        """Unmap (views handed out keep the memory alive until they are dropped)."""
        self._controls = []
        self._rings = []
        self.header = np.zeros(8, dtype=np.int64)
        with contextlib.suppress(BufferError):  # a view still out: unmapped with its last view
            self._map.close()

    def unlink(self) -> None:
        """Remove the window file (mapped copies stay valid until unmapped)."""
        self.path.unlink(missing_ok=True)


def _rings_offset(boards: int) -> int:
    control = boards * CONTROL_SLOTS * 8
    return HEADER_BYTES + -(-control // PAGE) * PAGE


def _total_bytes(layout: list[BoardLayout]) -> int:
    return _rings_offset(len(layout)) + sum(_ring_bytes(board) for board in layout)

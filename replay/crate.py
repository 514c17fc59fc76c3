"""The replay crate: the configured boards, fed from a recording by one thread.

Building it finds the recording's files, reads each board's first block (a
file that is not a recording stops start-up here, with one line) and takes
the earliest timestamp as the replay's time zero. Then a feeder thread keeps
every board's queue topped up, reading the files ahead of the replay, so the
IOC's scan loop only ever copies memory. With ``loop`` a board whose packets
are all queued starts over, its timestamps counted on from its last one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ioc.config import CrateConfig
from ioc.hardware import BoardIdentity, Crate
from replay.board import ReplayBoard
from replay.packets import Packets, RecordingError
from replay.recording import BoardStream, FamilyCursor, Strangers, Wanted, families

log = logging.getLogger("dgs.replay")

#: How long the feeder sleeps when no board wants packets (a board wakes it sooner).
FEEDER_IDLE_S = 0.05


@dataclass
class _Feed:
    """The feeder's side of one board: where its stream is in the recording."""

    board: ReplayBoard
    stream: BoardStream
    first: Packets | None  # read while building, queued first
    generation: int = 0
    offset: int = 0  # added to the keys of this pass (loop)
    last_key: int | None = None  # last key read in this pass
    ended: bool = False


class ReplayCrate(Crate):
    """A crate whose boards replay a recorded run (``backend = "replay"``)."""

    def __init__(self, config: CrateConfig) -> None:
        settings = config.replay
        if not settings.source:
            raise RecordingError('[crate.replay] source names no recording')
        self._origin_ns = time.monotonic_ns()
        self._loop = settings.loop
        self._wake = threading.Event()
        self._closed = False
        boards = sorted(config.boards, key=lambda b: b.card)
        found = families(settings.source)
        self.strangers = Strangers(
            frozenset(b.package_data for b in boards if not b.kind.is_trigger),
            any(b.kind.is_trigger for b in boards),
        )
        counted: set[int] = set()
        streams = []
        for board in boards:
            wanted = Wanted(board.package_data, board.kind.is_trigger)
            cursors = []
            for index, family in enumerate(found):
                if not family.may_hold(wanted.board, wanted.trigger):
                    continue
                counts = family.board is None and index not in counted
                counted.add(index)
                cursors.append(FamilyCursor(family, wanted, self.strangers if counts else None))
            streams.append(BoardStream(cursors))
        unread: dict[str, int] = {}
        for index, family in enumerate(found):
            if index not in counted:
                kind = "trigger board" if family.trigger else "board"
                label = f"{kind} {family.board}"
                unread[label] = unread.get(label, 0) + len(family.paths)
        for label, files in unread.items():
            self.strangers.add(f"{label} ({files} files)", 0)
        firsts = [stream.next() for stream in streams]
        keys = [int(first.keys[0]) for first in firsts if first is not None]
        if not keys:
            ids = ", ".join(str(b.package_data) for b in boards)
            raise RecordingError(
                f"the recording holds no packets of the configured boards (package data {ids})"
            )
        first_key = min(keys)
        self.boards = []
        self._feeds = []
        for config_board, stream, first in zip(boards, streams, firsts, strict=True):
            board = ReplayBoard(
                BoardIdentity(config_board.name, config_board.kind, config_board.slot,
                              config_board.card),
                config_board.package_data,
                fifo_words=settings.fifo_words,
                speed=settings.speed,
                first_key=first_key,
                origin_ns=self._origin_ns,
                wake=self._wake,
            )
            if first is None:
                log.warning("replay: %s (package data %d): no packets in the recording",
                            config_board.name, config_board.package_data)
            self.boards.append(board)
            self._feeds.append(_Feed(board, stream, first, ended=first is None))
        self._first_key = first_key
        self._thread = threading.Thread(target=self._feed_all, name="replay-feeder", daemon=True)
        self._thread.start()

    def clock_origin_ns(self) -> int:
        return self._origin_ns

    def close(self) -> None:
        """Stop the feeder and close the files (the IOC just exits; tests call it)."""
        self._closed = True
        self._wake.set()
        self._thread.join(5)
        for feed in self._feeds:
            feed.stream.close()

    def _feed_all(self) -> None:
        while not self._closed:
            self._wake.clear()
            busy = False
            for feed in self._feeds:
                try:
                    busy |= self._top_up(feed)
                except (RecordingError, OSError) as error:
                    log.error("replay: %s: %s; its replay ends here", feed.board.identity.name,
                              error)
                    feed.ended = True
                except Exception:
                    log.exception("replay: %s: feeding failed", feed.board.identity.name)
                    feed.ended = True
            if not busy:
                self._wake.wait(FEEDER_IDLE_S)

    def _top_up(self, feed: _Feed) -> bool:
        """Queue one more block for the board if it wants one; whether anything was done."""
        generation, wants = feed.board.wanted()
        if generation != feed.generation:
            feed.stream.rewind()
            feed.generation, feed.offset, feed.last_key = generation, 0, None
            feed.first, feed.ended = None, False
        if not wants or feed.ended:
            return False
        block, feed.first = (feed.first, None) if feed.first is not None else (None, None)
        if block is None:
            block = feed.stream.next()
        if block is None:
            if self._loop and feed.last_key is not None:
                feed.offset += feed.last_key - self._first_key + 1
                feed.last_key = None
                feed.stream.rewind()
                return True
            feed.ended = True
            log.info("replay: %s: every recorded packet is queued", feed.board.identity.name)
            if all(other.ended for other in self._feeds) and self.strangers.counts:
                skipped = ", ".join(
                    f"{label}: {n}" if n else label for label, n in self.strangers.counts.items()
                )
                log.info("replay: records skipped (boards not in the configuration): %s", skipped)
            return False
        feed.last_key = int(block.keys[-1])
        if feed.offset:
            block.keys = block.keys + feed.offset
        feed.board.offer(generation, block)
        return True

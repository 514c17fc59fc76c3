"""Printing that can never stop run control halfway.

`dgs-system` and `dgs-run` print progress while they start and end runs. When
their output goes to a pipe whose reader has left (``make system | tee log``
and Ctrl-C, which ends ``tee`` too) or to a closed descriptor, a plain
``print`` raises in the middle of ending a run, and the run is never finished
or logged. A `Console` writes each line, and after the first failure it
points that descriptor at /dev/null (so the interpreter's final flush cannot
fail either) and carries on quietly; a copy of every line can go to a file,
so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TextIO


class Console:
    """Lines to stdout or stderr that never raise; optionally copied to ``copy_to``."""

    def __init__(self, copy_to: Path | None = None) -> None:
        self.copy_to = copy_to
        self.lost: set[str] = set()  # "stdout" / "stderr" once writing to it failed
        _hold_closed_descriptors()

    def say(self, text: str) -> None:
        self._write("stdout", text)

    def warn(self, text: str) -> None:
        self._write("stderr", text)

    def _write(self, which: str, text: str) -> None:
        if self.copy_to is not None:
            with contextlib.suppress(OSError), open(self.copy_to, "a", encoding="utf-8") as copy:
                copy.write(text + "\n")
        stream: TextIO | None = getattr(sys, which)
        if stream is None:  # the descriptor was closed when the program started
            self.lost.add(which)
        if stream is None or which in self.lost:
            return
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            self.lost.add(which)
            _silence(stream)


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null, so later writes and the final flush at
    exit succeed; whatever was still buffered for the closed reader is dropped."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _hold_closed_descriptors() -> None:
    """A descriptor 1 or 2 closed at start-up gets /dev/null, so that no file opened later
    takes its number and receives what libraries write to "stdout" or "stderr"."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)

"""The acknowledgement journal of a v2 receiver, and how another receiver recovers
the files of one that was killed.

A v2 receiver acknowledges a reply only once its records are written, so the
IOC keeps every byte a receiver may not have stored. But a receiver killed
after writing a reply and before acknowledging it leaves records that the IOC
will send again to whoever takes over: both directories would hold them. So
before each acknowledgement the receiver appends one line to its journal
(``<run>/.<run>.journal_<n>``, one per IOC connection): the stream offset it is
about to acknowledge and the size of every file the reply touched. The IOC
tells a new receiver of the same run how the previous one described itself
(host, run directory, journal) and which offset it really saw acknowledged.
`recover` then cuts that directory back to that offset, file by file, and
closes the files the killed receiver left half-written (``.part`` names) under
their final names: the two directories together hold every record once.

The journal is locked (``flock``) while its receiver lives, so a directory is
never recovered under a receiver that is still running.

Format: a JSON header line, then ``<offset> <file> <bytes> [<file> <bytes> ...]``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.files import READ_ONLY

JOURNAL_PREFIX = "journal_"
#: Last line of the journal of a receiver that ended by itself (files closed, all written).
CLOSED = "# closed"


def journal_path(run_dir: Path, run_name: str, index: int) -> Path:
    return run_dir / f".{run_name}.{JOURNAL_PREFIX}{index}"


def describe(journal: Path) -> str:
    """How a receiver describes itself in its v2 hello (the IOC hands it to the next one)."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "journal": str(journal.absolute())})


class Journal:
    """One connection's acknowledgement journal, held locked while the receiver lives."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, (json.dumps(header) + "\n").encode())

    def record(self, offset: int, sizes: dict[str, int]) -> None:
        """Everything below stream ``offset`` is written; these files have these sizes."""
        fields = [str(offset)]
        for name, size in sizes.items():
            fields += [name, str(size)]
        os.write(self._fd, (" ".join(fields) + "\n").encode())

    def close(self, stored: int) -> None:
        """The receiver ends with everything below ``stored`` written: nothing to recover."""
        os.write(self._fd, f"{CLOSED} {stored}\n".encode())
        os.fchmod(self._fd, READ_ONLY)
        os.close(self._fd)


@dataclass(frozen=True)
class Recovery:
    """What `recover` did to a killed receiver's directory."""

    run_dir: Path
    acked: int
    trimmed: dict[str, int]  # file -> bytes taken back
    removed: list[str]
    closed: list[str]

    def summary(self) -> str:
        if not (self.trimmed or self.removed or self.closed):
            return f"took over from {self.run_dir}: its files hold exactly what it acknowledged"
        taken = sum(self.trimmed.values())
        return (
            f"recovered {self.run_dir}: cut back to byte {self.acked} of the run "
            f"({taken} bytes in {len(self.trimmed)} file(s) taken back, {len(self.removed)} "
            f"removed, {len(self.closed)} half-written file(s) closed)"
        )


class RecoveryError(Exception):
    """The directory cannot be recovered (still in use, or not readable here)."""


def recover(description: str, acked: int) -> Recovery:
    """Cut the directory of the receiver ``description`` back to stream offset ``acked``."""
    try:
        previous = json.loads(description)
        journal = Path(previous["journal"])
    except (ValueError, KeyError, TypeError) as error:
        raise RecoveryError(f"unreadable description {description!r}") from error
    if previous.get("host") != socket.gethostname():
        raise RecoveryError(f"it ran on {previous.get('host')}, not on this host")
    try:
        journal.chmod(0o644)  # a receiver that ended by itself left it read-only
        fd = os.open(journal, os.O_RDWR | os.O_APPEND)
    except OSError as error:
        raise RecoveryError(f"cannot open its journal: {error}") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecoveryError(f"{journal.parent} is still in use by a receiver") from None
        with open(fd, closefd=False, encoding="utf-8") as text:
            lines = text.read().splitlines()
        if lines and lines[-1] == f"{CLOSED} {acked}":
            return Recovery(journal.parent, acked, {}, [], [])  # it ended cleanly right there
        header = json.loads(lines[0]) if lines else {}
        sizes = _sizes_at(lines[1:], acked)
        result = _cut_back(journal.parent, sizes, acked, header.get("files", ""))
        if header.get("run"):
            _write_summary(journal.parent, header["run"], result)
        os.write(fd, f"# recovered to {acked} by pid {os.getpid()}\n".encode())
        return result
    finally:
        os.close(fd)


def _sizes_at(records: list[str], acked: int) -> dict[str, int]:
    """Per file named in the journal, its size once stream offset ``acked`` was written
    (0 for files only later records name)."""
    sizes: dict[str, int] = {}
    for line in records:
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        offset = int(fields[0])
        for name, size in zip(fields[1::2], fields[2::2], strict=True):
            if offset <= acked:
                sizes[name] = int(size)
            else:
                sizes.setdefault(name, 0)
    return sizes


def _write_summary(run_dir: Path, run_name: str, recovery: Recovery) -> None:
    """The killed receiver wrote no summary: say what its directory holds now, in the
    space it had set aside for one."""
    final = run_dir / f"{run_name}.summary.json"
    part = run_dir / f".{final.name}.part"
    if final.exists():
        return
    files = sorted(p for p in run_dir.iterdir() if p.name.startswith(f"{run_name}.") and
                   p.is_file() and p.suffix != ".json")
    document = {
        "run": run_name,
        "exit_code": None,
        "recovered": {"by_pid": os.getpid(), "host": socket.gethostname(),
                      "acknowledged_offset": recovery.acked, "trimmed": recovery.trimmed,
                      "removed": recovery.removed, "closed": recovery.closed},
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files],
    }
    with open(part, "r+" if part.exists() else "x", encoding="utf-8") as out:
        out.write(json.dumps(document, indent=1) + "\n")
        out.truncate()
    os.chmod(part, READ_ONLY)
    os.link(part, final)
    part.unlink()


def _named_in_journals(run_dir: Path) -> set[str]:
    """Files any journal of the directory names (a receiver of several IOCs has several)."""
    names: set[str] = set()
    for journal in run_dir.glob(f".*.{JOURNAL_PREFIX}*"):
        for line in journal.read_text(encoding="utf-8").splitlines()[1:]:
            if line and not line.startswith("#"):
                names.update(line.split()[1::2])
    return names


def _cut_back(run_dir: Path, sizes: dict[str, int], acked: int, prefix: str) -> Recovery:
    trimmed: dict[str, int] = {}
    removed: list[str] = []
    closed: list[str] = []
    for name, size in sizes.items():
        final, part = run_dir / name, run_dir / f".{name}.part"
        path = part if part.exists() else final
        if not path.exists():
            continue
        extra = path.stat().st_size - size
        if size == 0:
            path.chmod(0o644)
            path.unlink()
            removed.append(name)
            continue
        if extra > 0:
            path.chmod(0o644)
            os.truncate(path, size)
            trimmed[name] = extra
        if path == part:
            os.link(part, final)
            part.unlink()
            closed.append(name)
        final.chmod(READ_ONLY)
    named = _named_in_journals(run_dir)
    for part in run_dir.glob(f".{prefix}*.part"):  # begun in a reply never acknowledged
        name = part.name[1 : -len(".part")]
        if prefix and name not in named:
            part.unlink()
            removed.append(name)
    return Recovery(run_dir, acked, trimmed, removed, closed)

"""Autosave: values that must survive an IOC restart, on disk before anyone acts on them.

The global run-control records (`Online_CS_StartStop`, `_SaveData`, `_RunNumber`)
are kept in ``<state_dir>/<name>.json``. A put of one of them is accepted only
once the whole file has been rewritten with the new value (the IOC saves it
while validating the put, in the thread that serves the client), so by the time
the client hears back, and before any monitor such as a crate's sees the value,
it is on disk; a put that cannot be saved is refused. A temporary file is
written and synced, then renamed over the old one, so a kill at any moment
leaves either the old or the new file, never a torn one. pythonSoftIOC's own
autosave writes on a timer, which forgot a run number reserved less than a
second before a kill.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

#: JSON-representable scalar values of the records kept here.
Value = int | float | str

log = logging.getLogger("dgs.autosave")

SUFFIX = ".json"


class AutosaveFile:
    """The saved values of one IOC, by record name."""

    def __init__(self, path: Path, saved: Mapping[str, Value]) -> None:
        self.path = path
        self.saved: dict[str, Value] = dict(saved)
        self._values: dict[str, Value] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, name: str) -> AutosaveFile:
        """Create the directory if needed and read what an earlier run saved.

        Raises OSError naming the directory when it cannot be created or
        written, so a read-only location stops start-up instead of losing the
        first value saved.
        """
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"autosave directory {directory}: {err.strerror or err}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OSError(f"autosave directory {directory}: not writable")
        path = directory / f"{name}{SUFFIX}"
        return cls(path, _read(path))

    def start(self, values: Mapping[str, Value]) -> None:
        """Begin from the values the IOC serves now, and write them at once."""
        with self._lock:
            self._write(values)
            self._values = dict(values)

    def save(self, name: str, value: Value) -> str | None:
        """Write the file with ``name`` = ``value``: None once it is on disk, else why not
        (the value is then not kept)."""
        with self._lock:
            values = {**self._values, name: value}
            try:
                self._write(values)
            except OSError as err:
                return f"cannot autosave to {self.path}: {err.strerror or err}"
            self._values = values
        return None

    def _write(self, values: Mapping[str, Value]) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w") as file:
            json.dump(values, file, indent=1, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _read(path: Path) -> dict[str, Value]:
    """What ``path`` holds; an unreadable file is set aside (kept as ``.bad``), not lost."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        log.warning("cannot read autosave file %s (%s): starting from the boot values", path, err)
        return {}
    try:
        saved = json.loads(text)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        log.warning(
            "autosave file %s is unreadable (%s): starting from the boot values; kept as %s",
            path,
            err,
            bad,
        )
        return {}
    return {
        name: value
        for name, value in saved.items()
        if isinstance(value, int | float | str) and not isinstance(value, bool)
    }

"""A system's control directory: the state file that lets a later ``dgs-run`` (another
process) continue where an earlier one left off, the lock that keeps two operators from
acting on the system at once, and the run log beside them."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from runctl.runstate import REFUSED, Progress, RunStatus

#: Control files and run data, relative to the working directory (ignored by git).
DEFAULT_CONTROL_DIR = "data"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
RUN_LOG_FILE = "runs.jsonl"


class ControlDir:
    """The state file and the lock of one control directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> RunStatus:
        """The run as the last step left it; STOP when no step was ever taken here."""
        path = self.path / STATE_FILE
        if not path.exists():
            return RunStatus()
        return RunStatus.from_json(path.read_text())

    def save(self, status: RunStatus) -> None:
        """Replace the state file whole, so a reader never sees half of it."""
        path = self.path / STATE_FILE
        partial_path = path.with_name(path.name + ".partial")
        partial_path.write_text(status.to_json())
        os.replace(partial_path, path)

    def exclusive(self, step: Callable[[], Iterator[Progress]]) -> Iterator[Progress]:
        """Run ``step`` holding the system's lock; refuse if another operator holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield Progress(
                    REFUSED,
                    f"another operator is acting on {self.path} right now; "
                    "try again when it has finished",
                )
                return
            yield from step()

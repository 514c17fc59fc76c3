"""Run directories (``<data_dir>/crate<NN>/run<NNNNN>/``): which run numbers are taken,
what in a run directory is data, and clearing the ones a run that never began left.

Nothing is ever overwritten: a run number whose directory holds anything is skipped, and
only the receiver's own side files of a run that never began are removed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ioc.config import CrateConfig
from runctl.runstate import ReceiverProcess, RunStatus

#: The receiver's side files of a run (``<run>.<name>.json``): they describe the run, they
#: are not its data; nor are its acknowledgement journals (``.<run>.journal_<n>``).
BEGIN_SNAPSHOT = "pvs_begin"
SIDE_FILES = ("summary", BEGIN_SNAPSHOT, "pvs_end")
JOURNAL = re.compile(r"\.run\d{5,}\.journal_\d+")
RUN_DIR_NAME = re.compile(r"run(\d{5,})")


def run_name(number: int) -> str:
    """The product's run name: ``run`` + the number in five digits (spec 04)."""
    return f"run{number:05d}"


def run_dir_of(status: RunStatus, crate: str) -> Path:
    """Where ``crate``'s files of the run go: its receiver's directory, else the default."""
    for receiver in status.receivers:
        if receiver.crate == crate:
            return Path(receiver.run_dir)
    return Path(status.data_dir) / f"crate{crate}" / (status.name or "")


def _data_files(run_dir: Path) -> list[Path]:
    """The run's data files; the receiver's JSON side files (summary, PV snapshots)
    and files still being written (hidden) are not data."""
    if not run_dir.is_dir():
        return []
    return [
        path
        for path in run_dir.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".json"
    ]


def dir_usage(run_dir: Path) -> tuple[int, int]:
    """(data files, their bytes) of a run directory; (0, 0) if it does not exist."""
    files = _data_files(run_dir)
    return len(files), sum(path.stat().st_size for path in files)


def receiver_summary(run_dir: Path) -> tuple[int | None, int | None]:
    """(payload bytes, records) the receiver's summary reports, None if it wrote none."""
    try:
        document = json.loads((run_dir / f"{run_dir.name}.summary.json").read_text())
        iocs = document["iocs"]
        return sum(i["payload_bytes"] for i in iocs), sum(i["records"] for i in iocs)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _holds_something(path: Path) -> bool:
    """Whether a would-be run directory is in use (the receiver accepts only an empty one)."""
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def used_run_numbers(crate_dir: Path) -> set[int]:
    """Run numbers whose directory under ``crate_dir`` exists and holds something."""
    if not crate_dir.is_dir():
        return set()
    return {
        int(match[1])
        for path in crate_dir.iterdir()
        if (match := RUN_DIR_NAME.fullmatch(path.name)) and _holds_something(path)
    }


def free_run_number(data_dir: Path, crates: Sequence[CrateConfig], first: int) -> tuple[int, str]:
    """The first run number from ``first`` on whose run directory is free for every crate,
    and a note naming the numbers skipped."""
    used: set[int] = set()
    for crate in crates:
        used |= used_run_numbers(data_dir / f"crate{crate.crate}")
    number = first
    while number in used:
        number += 1
    if number == first:
        return number, ""
    names = run_name(first) if number == first + 1 else f"{run_name(first)}..{run_name(number - 1)}"
    return number, f"; skipped {names} (run directory in use in {data_dir})"


def remove_unused_run_dir(run_dir: Path) -> bool:
    """Remove the run directory of a run that never started, if it holds no data: only the
    receiver's side files of that run go, and only then the (empty) directory. True if it
    is gone; anything else in it keeps it, untouched."""
    if not run_dir.is_dir():
        return not run_dir.exists()
    side = {f"{run_dir.name}.{name}.json" for name in SIDE_FILES}
    side |= {f".{name}.part" for name in side}  # the space a receiver sets aside for them
    entries = list(run_dir.iterdir())
    if any(
        not entry.is_file() or (entry.name not in side and not JOURNAL.fullmatch(entry.name))
        for entry in entries
    ):
        return False
    for entry in entries:
        entry.unlink()
    run_dir.rmdir()
    return True


def clear_unstarted(receivers: Sequence[ReceiverProcess]) -> str:
    """Remove the run directories the receivers of a run that never began created, unless
    they hold data; a note naming the ones kept, or ""."""
    kept = [r.run_dir for r in receivers if not remove_unused_run_dir(Path(r.run_dir))]
    return f"; kept {', '.join(kept)}: they hold data" if kept else ""

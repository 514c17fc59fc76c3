"""The run log: one JSON line per run, appended when the run ends.

JSON lines because scripts read it (one ``json.loads`` per line, nothing to
parse by column) and an interrupted write can damage at most the last line;
`format_table` gives people the readable view (``dgs-run log``). Times are
local ISO-8601 with the UTC offset, so logs from several hosts sort correctly.
`run_record` and `unstarted_record` make a run's line from the operator's record
of the run (`runctl.runstate.RunStatus`) and what its run directories hold.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runctl.losses import Loss
from runctl.rundirs import dir_usage, receiver_summary, run_dir_of
from runctl.runstate import RunStatus

RESULT_OK = "ok"
RESULT_LOST = "lost"  # ended as planned, but a crate lost data (per reason in its record)
RESULT_CANCELLED = "cancelled"  # prepared, never started
RESULT_TIMEOUT = "timeout"
RESULT_ERROR = "error"
RESULT_FORCED = "forced"  # ended with `dgs-run stop --force`: IOCs did not answer


def now_text() -> str:
    """The current local time as the log writes it."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class CrateRecord:
    """What one crate delivered in a run."""

    sender_bytes: int | None = None  # DAQC<NN>_CV_SenderBytes (KiB resolution); None: unknown
    received_bytes: int | None = None  # reply payload bytes, from the receiver's summary
    records: int | None = None  # GEB records written, from the receiver's summary
    file_bytes: int = 0  # bytes in the receiver's data files of this run
    files: int = 0
    receiver_exit: int | None = None  # None: no receiver, or it did not finish
    #: Bytes and events lost per reason (`runctl.losses`); None: the IOC did not say.
    lost_bytes: dict[str, int] | None = None
    lost_events: dict[str, int] | None = None

    @property
    def loss(self) -> Loss | None:
        if self.lost_bytes is None or self.lost_events is None:
            return None
        return Loss(self.lost_bytes, self.lost_events)


@dataclass(frozen=True)
class RunRecord:
    """One run as the log keeps it."""

    run: int
    name: str
    result: str
    prepared: str
    start: str | None
    stop: str
    data_dir: str
    crates: dict[str, CrateRecord] = field(default_factory=dict)
    message: str = ""

    @property
    def duration_s(self) -> float | None:
        """Seconds from Start to Stop; None for a run that never started."""
        if self.start is None:
            return None
        begun = datetime.fromisoformat(self.start)
        return (datetime.fromisoformat(self.stop) - begun).total_seconds()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data: dict[str, Any] = json.loads(text)
        crates = {crate: CrateRecord(**values) for crate, values in data.pop("crates").items()}
        return cls(**data, crates=crates)


class RunLog:
    """An append-only file of `RunRecord` lines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: RunRecord) -> None:
        """Add one run; flushed to disk before returning, so a crash cannot lose it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(record.to_json() + "\n")
            file.flush()
            os.fsync(file.fileno())

    def records(self) -> list[RunRecord]:
        """Every run logged, oldest first; a damaged line is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(RunRecord.from_json(line))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
        return records


def _mib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 1048576:.1f}"


def _loss_text(record: CrateRecord) -> str:
    loss = record.loss
    return "lost ?" if loss is None else f"lost {loss.describe()}"


def format_table(records: list[RunRecord]) -> str:
    """A readable table: one line per run, then one indented line per crate."""
    lines = [f"{'run':>6}  {'result':<9}  {'start':<19}  {'stop':<19}  {'seconds':>8}  crates"]
    for record in records:
        duration = record.duration_s
        lines.append(
            f"{record.run:>6}  {record.result:<9}  {(record.start or '-')[:19]:<19}  "
            f"{record.stop[:19]:<19}  {'-' if duration is None else f'{duration:.1f}':>8}  "
            f"{' '.join(record.crates)}"
        )
        for crate, values in record.crates.items():
            exit_text = "-" if values.receiver_exit is None else str(values.receiver_exit)
            records = "?" if values.records is None else str(values.records)
            lines.append(
                f"{'':>8}crate {crate}: sent {_mib(values.sender_bytes)} MiB, received "
                f"{_mib(values.received_bytes)} MiB, {records} records in {values.files} "
                f"files ({_mib(values.file_bytes)} MiB), receiver exit {exit_text}, "
                f"{_loss_text(values)}"
            )
        if record.message:
            lines.append(f"{'':>8}{record.message}")
    return "\n".join(lines)


def run_record(
    status: RunStatus,
    stop: str,
    exits: dict[str, int | None],
    sent: dict[str, int],
    losses: dict[str, Loss],
    result: str,
    message: str,
) -> RunRecord:
    """A run that ended: bytes sent, written and lost per crate, the result."""
    by_crate = {}
    for crate in status.crates:
        run_dir = run_dir_of(status, crate)
        files, nbytes = dir_usage(run_dir)
        received, records = receiver_summary(run_dir)
        loss = losses.get(crate)
        by_crate[crate] = CrateRecord(
            sender_bytes=sent.get(crate),
            received_bytes=received,
            records=records,
            file_bytes=nbytes,
            files=files,
            receiver_exit=exits.get(crate),
            lost_bytes=dict(loss.bytes) if loss is not None else None,
            lost_events=dict(loss.events) if loss is not None else None,
        )
    return RunRecord(
        run=status.run or 0,
        name=status.name or "",
        result=result,
        prepared=status.prepared or stop,
        start=status.start,
        stop=stop,
        data_dir=status.data_dir,
        crates=by_crate,
        message=message,
    )


def unstarted_record(
    status: RunStatus, result: str, exits: dict[str, int | None], message: str
) -> RunRecord:
    """A run that got its number but never started (cancelled or failed)."""
    return RunRecord(
        run=status.run or 0,
        name=status.name or "",
        result=result,
        prepared=status.prepared or now_text(),
        start=None,
        stop=now_text(),
        data_dir=status.data_dir,
        crates={c: CrateRecord(receiver_exit=exits.get(c)) for c in status.crates},
        message=message,
    )

"""The receivers of a run: one supervised ``dgs-receiver`` per crate, started by
prepare_run and waited for (or stopped) by end_run, possibly in another process.

Each runs under `runctl.supervise`, which keeps its exit code in a file; a receiver
this process did not start is recognised by the supervisor's command line before it is
signalled, so a reused pid is never hit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

from ioc.config import CrateConfig
from ioc.hardware import BoardKind
from runctl.ioclink import crate_endpoint
from runctl.losses import MIB
from runctl.rundirs import BEGIN_SNAPSHOT, dir_usage
from runctl.runstate import (
    POLL_S,
    RECEIVER_FINISHED,
    RECEIVER_STARTED,
    Progress,
    ReceiverProcess,
    RunStatus,
    Timeouts,
)
from runctl.supervise import MARKER, read_exit_file

#: Receiver logs and exit files, under the control directory.
RECEIVER_DIR = "receivers"
#: The product's receiver, from the same environment as this module.
DEFAULT_RECEIVER_COMMAND = (sys.executable, "-m", "receiver.cli")
#: How long a receiver has to exit after SIGTERM before it is killed.
TERM_GRACE_S = 5.0


class Receivers:
    """Starts, watches and stops the receivers of a system's runs."""

    def __init__(
        self,
        command: Sequence[str] | None,
        control_dir: Path,
        data_dir: Path,
        timeouts: Timeouts,
    ) -> None:
        """``command`` None: this operator starts no receivers (it can still end theirs)."""
        self.command = list(command) if command else None
        self.control_dir = control_dir
        self.data_dir = data_dir
        self.timeouts = timeouts
        self._children: dict[int, subprocess.Popen] = {}

    def start_all(
        self,
        crates: Sequence[CrateConfig],
        status: RunStatus,
        save: Callable[[RunStatus], None],
    ) -> Generator[Progress, None, str]:
        """Start one receiver per crate, ``save``-ing the status as each is added; yield
        receiver-started as each is up (its begin PV snapshot is saved, so it shows the
        set-up before Start, and it is trying to connect). Return a problem, or ""."""
        for crate in crates:
            try:
                status.receivers.append(self._start(crate, status))
            except OSError as err:
                return f"crate {crate.crate}: cannot start a receiver: {err}"
            save(status)
        by_name = {crate.crate: crate for crate in crates}
        pending = list(status.receivers)
        deadline = time.monotonic() + self.timeouts.receiver_ready_s
        while pending:
            for receiver in list(pending):
                crate = by_name[receiver.crate]
                run_dir = Path(receiver.run_dir)
                if (run_dir / f"{run_dir.name}.{BEGIN_SNAPSHOT}.json").is_file():
                    pending.remove(receiver)
                    yield Progress(
                        RECEIVER_STARTED,
                        f"crate {crate.crate} receiver (pid {receiver.pid}) waits for "
                        f"{crate.host}:{crate.data_port}, files in {receiver.run_dir}",
                        crate.crate,
                    )
                elif (code := self.exit_code(receiver)) is not None:
                    return (
                        f"crate {crate.crate} receiver exited with {code} before it was up "
                        f"(log {receiver.log})"
                    )
            if pending and time.monotonic() > deadline:
                late = ", ".join(f"crate {r.crate} (log {r.log})" for r in pending)
                return f"receivers not up within {self.timeouts.receiver_ready_s:g} s: {late}"
            time.sleep(POLL_S)
        return ""

    def _start(self, crate: CrateConfig, status: RunStatus) -> ReceiverProcess:
        assert status.run is not None and status.name is not None
        name = status.name
        if crate.data_port == 0:
            raise OSError(f"crate {crate.crate} has data_port 0: a receiver cannot find it")
        logs = self.control_dir / RECEIVER_DIR
        logs.mkdir(parents=True, exist_ok=True)
        out = self.data_dir / f"crate{crate.crate}"
        out.mkdir(parents=True, exist_ok=True)
        stem = logs / f"{name}-crate{crate.crate}"
        exit_file = stem.with_suffix(".exit")
        exit_file.unlink(missing_ok=True)
        log_path = stem.with_suffix(".log")
        assert self.command is not None
        command = [
            sys.executable,
            "-m",
            MARKER,
            "--exit-file",
            str(exit_file),
            "--",
            *self.command,
            "--out",
            str(out),
            "--run",
            str(status.run),
            "--crate",
            crate.crate,
            "--pv-pva",
            str(crate_endpoint(crate)),
            "--connect-timeout",
            f"{self.timeouts.receiver_connect_s:g}",
            "--status",
            "plain",
            *(
                option
                for board in crate.boards
                if board.kind is BoardKind.TRIGGER_MASTER
                for option in ("--trigger-board", str(board.package_data))
            ),
            f"{crate.host}:{crate.data_port}",
        ]
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `dgs-run start` and its terminal
            )
        self._children[child.pid] = child
        return ReceiverProcess(
            crate.crate, child.pid, str(exit_file), str(log_path), str(out / name)
        )

    def _alive(self, receiver: ReceiverProcess) -> bool:
        child = self._children.get(receiver.pid)
        if child is not None:
            return child.poll() is None
        try:
            command = Path(f"/proc/{receiver.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return MARKER.encode() in command and receiver.exit_file.encode() in command

    def exit_code(self, receiver: ReceiverProcess) -> int | None:
        """Its exit code once it ended; -1 when it vanished without one; None while running."""
        code = read_exit_file(Path(receiver.exit_file))
        if code is None and not self._alive(receiver):
            code = read_exit_file(Path(receiver.exit_file))
            return -1 if code is None else code
        return code

    def _signal(self, receiver: ReceiverProcess, sig: int) -> None:
        if self._alive(receiver):
            with contextlib.suppress(ProcessLookupError):
                os.kill(receiver.pid, sig)

    def cancel(
        self, receivers: Sequence[ReceiverProcess]
    ) -> Generator[Progress, None, dict[str, int | None]]:
        """Stop the receivers of a run that never began: SIGTERM to all, then as `finish`."""
        for receiver in receivers:
            self._signal(receiver, signal.SIGTERM)
        exits, _late = yield from self.finish(receivers, set())
        return exits

    def finish(
        self, receivers: Sequence[ReceiverProcess], stop_now: set[str]
    ) -> Generator[Progress, None, tuple[dict[str, int | None], set[str]]]:
        """Yield receiver-finished as each receiver exits; return (crate -> exit code,
        None if it had to be killed; crates whose receiver overran the timeout).

        Receivers of ``stop_now`` crates are stopped at once (their crate will send
        nothing more); the others get the receivers timeout, then SIGTERM, then
        SIGKILL after a grace period."""
        exits: dict[str, int | None] = {}
        stopped = set(stop_now)
        late: set[str] = set()
        for receiver in receivers:
            if receiver.crate in stopped:
                self._signal(receiver, signal.SIGTERM)
        pending = list(receivers)
        deadline = time.monotonic() + self.timeouts.receivers_s
        while pending:
            for receiver in list(pending):
                code = self.exit_code(receiver)
                if code is not None:
                    pending.remove(receiver)
                    exits[receiver.crate] = code
                    yield _finished(receiver, code, receiver.crate in stopped)
            now = time.monotonic()
            if pending and now > deadline + TERM_GRACE_S:
                break
            if pending and now > deadline and not late:
                late = {r.crate for r in pending}
                stopped |= late
                for receiver in pending:
                    self._signal(receiver, signal.SIGTERM)
            time.sleep(POLL_S)
        for receiver in pending:
            self._signal(receiver, signal.SIGKILL)
            exits[receiver.crate] = None
        return exits, late

    def close(self) -> None:
        """Collect the exit status of the receivers that have ended (no zombies)."""
        for child in self._children.values():
            child.poll()


def _finished(receiver: ReceiverProcess, code: int, stopped: bool) -> Progress:
    files, nbytes = dir_usage(Path(receiver.run_dir))
    how = " (stopped by the operator)" if stopped else ""
    log = "" if code == 0 else f"; log {receiver.log}"
    return Progress(
        RECEIVER_FINISHED,
        f"crate {receiver.crate} receiver exited with {code}{how}: {files} file(s), "
        f"{nbytes / MIB:.1f} MiB in {receiver.run_dir}{log}",
        receiver.crate,
    )

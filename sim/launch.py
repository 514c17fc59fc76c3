"""An IOC's own crate process (``sim_process = "spawn"``): started with it, ended with it,
restarted by it (`sim.attach`) when it ends on its own.

The child gets its boards as JSON on stdin and keeps reading stdin: when the IOC
ends in any way (even killed) the pipe closes and the child removes its window
and exits, so no process and no /dev/shm file outlive the IOC. It runs in its
own session, so a Ctrl-C meant for the IOC does not end it before the IOC's
final drain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from sim.board import SimBoardSpec
from sim.specs import specs_to_json
from sim.window import H_HEARTBEAT_NS, Window, shm_path

#: How long a new crate process may take to serve its window.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class CrateProcess:
    """A `dgs-sim` child serving window ``name``."""

    def __init__(
        self, specs: list[SimBoardSpec], seed: int, name: str, realtime_priority: int = 0
    ) -> None:
        self.name = name
        self._specs = specs
        self._seed = seed
        self._realtime_priority = realtime_priority
        self.started_at = time.monotonic()
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sim.process", "--spec-stdin", "--window", self.name,
             "--realtime-priority", str(self._realtime_priority)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(specs_to_json(self._specs, self._seed)).encode() + b"\n")
        proc.stdin.flush()
        return proc

    def restart(self) -> None:
        """A new crate process on the same window, after this one ended (not waited for:
        the window appears when it is ready)."""
        self.stop()
        self.started_at = time.monotonic()
        self.proc = self._spawn()

    def wait_ready(self) -> None:
        """Until the window is served (RuntimeError if the child exits or is too slow)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"the crate process exited with code {code} at start")
            try:
                window = Window.attach(self.name)
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            served = window.header[H_HEARTBEAT_NS] != 0
            window.close()
            if served:
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the crate process did not serve its window in {START_TIMEOUT_S:.0f} s")

    @property
    def exit_code(self) -> int | None:
        """None while the crate process runs."""
        return self.proc.poll()

    def stop(self) -> None:
        """End the child (SIGTERM, then SIGKILL) and make sure its window file is gone."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        shm_path(self.name).unlink(missing_ok=True)

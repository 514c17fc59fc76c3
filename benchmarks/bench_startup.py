"""P8: seconds from launching `dgs-ioc --demo` to its PVs being served (spec 06).

Each launch starts the IOC on fresh loopback ports and a fresh state
directory, then polls ``DAQC01_CV_State`` with a new PV Access client context
per attempt (so no client back-off hides the moment the server appears); the
figure is the median over the launches of launch -> first successful read.
Launch -> the "dgs-ioc: ready" line is reported too. The baseline, launched
alternately with the same probe: the bare pythonSoftIOC process
(`bare_ioc.py`) serving as many records.

    .venv/bin/python benchmarks/bench_startup.py [--json FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BareIoc, Figure, Ports, finish, median

TARGET_S = 3.0
LAUNCH_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 0.1
DGS_IOC = Path(sys.executable).parent / "dgs-ioc"


def first_read_s(ports: Ports, name: str, launched_ns: int, proc: subprocess.Popen) -> float:
    """Seconds from ``launched_ns`` until ``name`` can be read over PV Access."""
    from p4p.client.thread import Context

    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the IOC exited with {proc.returncode} during start-up")
        context = Context("pva", conf=ports.p4p_conf(), useenv=False)
        try:
            context.get(name, timeout=PROBE_TIMEOUT_S)
            return (time.monotonic_ns() - launched_ns) / 1e9
        except Exception:  # not served yet: a timeout or a disconnect
            continue
        finally:
            context.close()
    raise RuntimeError(f"{name} not served within {LAUNCH_TIMEOUT_S} s")


class LineClock:
    """Reads a process's output and notes when a given line first appears."""

    def __init__(self, proc: subprocess.Popen, wanted: str) -> None:
        self.wanted = wanted
        self.seen_ns: int | None = None
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if self.seen_ns is None and self.wanted in line:
                self.seen_ns = time.monotonic_ns()


def launch_crate_ioc(workdir: Path) -> dict:
    """One launch of the real command; returns served and ready-line times in seconds."""
    ports = Ports.allocate()
    argv = [str(DGS_IOC), "--demo", "--data-port", str(ports.data),
            "--state-dir", str(workdir / f"state-{ports.ca}")]
    launched_ns = time.monotonic_ns()
    proc = subprocess.Popen(argv, env={**os.environ, **ports.server_env()}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=workdir)
    ready = LineClock(proc, "dgs-ioc: ready")
    try:
        served = first_read_s(ports, "DAQC01_CV_State", launched_ns, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        ready.thread.join(5)
    ready_s = math.nan if ready.seen_ns is None else (ready.seen_ns - launched_ns) / 1e9
    return {"served_s": served, "ready_line_s": ready_s}


def launch_bare_ioc(workdir: Path) -> float:
    bare = BareIoc(workdir).start(wait_ready=False)
    try:
        assert bare.proc is not None
        return first_read_s(bare.ports, "BARE:VALUE0", bare.launched_ns, bare.proc)
    finally:
        bare.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="launches (median; >= 5)")
    args = parser.parse_args(argv)
    if not DGS_IOC.exists():
        raise SystemExit(f"{DGS_IOC} is missing: install the project (pip install -e .)")
    started = time.monotonic()
    repeat = max(5, args.repeat)
    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    launches, bare = [], []
    try:
        for _ in range(repeat):
            launches.append(launch_crate_ioc(workdir))
            bare.append(launch_bare_ioc(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figure = Figure(
        id="P8",
        what="start-up: launch -> PVs served (dgs-ioc --demo)",
        value=median(launch["served_s"] for launch in launches),
        unit="s",
        baseline=median(bare),
        baseline_what="bare softIOC",
        target=TARGET_S,
        higher_is_better=False,
        runs=[launch["served_s"] for launch in launches],
        note=(f"median of {repeat} launches; 'dgs-ioc: ready' printed after "
              f"{median(launch['ready_line_s'] for launch in launches):.2f} s"),
    )
    return finish(args.json, "P8", [figure], started, launches=launches, bare_launches_s=bare)


if __name__ == "__main__":
    sys.exit(main())

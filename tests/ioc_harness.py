"""Start `dgs-ioc` as a real process on isolated loopback ports and talk to it.

Every IOC gets its own CA, CA-repeater, PVA, PVA-broadcast and data ports;
clients (the real `caget`/`caput`/`pvget` tools, p4p, pyepics in a child
process) are pinned to those ports, so tests never see each other's PVs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
READY_LINE = "dgs-ioc: ready"
START_TIMEOUT_S = 30.0


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Test ports lie below the kernel's ephemeral range: a port in it, free when handed
#: out, can be taken by any process's outgoing connection before the IOC binds it (a
#: crate listens on its data port only from Start on), and then Start is refused.
PORT_LOW = 10000
PORT_HIGH = max(_ephemeral_start(), PORT_LOW + 4000) - 1
_port_lock = threading.Lock()
_next_port = PORT_LOW + (os.getpid() * 100) % (PORT_HIGH - PORT_LOW)


def free_port() -> int:
    """A port free for both TCP and UDP on loopback, never handed out twice here."""
    global _next_port
    with _port_lock:
        for _ in range(2000):
            _next_port += 1
            if _next_port > PORT_HIGH:
                _next_port = PORT_LOW
            if _port_free(_next_port):
                return _next_port
    raise RuntimeError("no free port")


@dataclass(frozen=True)
class Ports:
    ca: int
    ca_repeater: int
    pva: int
    pva_broadcast: int
    data: int

    @classmethod
    def allocate(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())

    def server_env(self) -> dict[str, str]:
        return {
            **self.client_env(),
            "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_PVAS_SERVER_PORT": str(self.pva),
            "EPICS_PVAS_BROADCAST_PORT": str(self.pva_broadcast),
            "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
            "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        }

    def client_env(self) -> dict[str, str]:
        return {
            "EPICS_CA_SERVER_PORT": str(self.ca),
            "EPICS_CA_REPEATER_PORT": str(self.ca_repeater),
            "EPICS_CA_ADDR_LIST": "127.0.0.1",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_SERVER_PORT": str(self.pva),
            "EPICS_PVA_BROADCAST_PORT": str(self.pva_broadcast),
        }

    def p4p_conf(self) -> dict[str, str]:
        return {
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_SERVER_PORT": str(self.pva),
            "EPICS_PVA_BROADCAST_PORT": str(self.pva_broadcast),
        }


def wait_until(predicate: Callable[[], object], timeout: float, what: str, period=0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(period)


_REFUSALS = ("failed", "error from put", "error:", "denied", "not permitted", "invalid")


def _refusal(tool_output: str) -> bool:
    """Whether a CA/PVA tool reported the write as refused (its exit code does not).

    The Old/New value lines are skipped: a value such as "Read error" is not a refusal.
    """
    messages = [
        line.lower()
        for line in tool_output.splitlines()
        if not line.lstrip().startswith(("Old :", "New :"))
    ]
    return any(word in line for line in messages for word in _REFUSALS)


def _fresh_log_path(workdir: Path, ca_port: int) -> Path:
    """A log file of its own, also for a second IOC started on the same ports."""
    for attempt in range(1, 100):
        path = workdir / (f"ioc-{ca_port}.log" if attempt == 1 else f"ioc-{ca_port}-{attempt}.log")
        if not path.exists():
            return path
    raise RuntimeError(f"too many IOC logs for CA port {ca_port} in {workdir}")


class IocProcess:
    """One `dgs-ioc` child process and the real EPICS tools pointed at it."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        ports: Ports | None = None,
        extra_env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = (),
    ) -> None:
        self.ports = ports or Ports.allocate()
        #: A command the IOC runs under (e.g. ``setpriv`` taking a privilege away).
        self.launcher = launcher
        self.args = args
        self.extra_env = extra_env or {}
        self.workdir = workdir
        self.log_path = _fresh_log_path(workdir, self.ports.ca)
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.ports.client_env()}

    def start(self, wait_ready: bool = True) -> IocProcess:
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        # Tests never take the shared default sample port (9002): any free one unless named.
        args = self.args if "--sample-port" in self.args else [*self.args, "--sample-port", "0"]
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "ioc.main", *args],
            env={
                **os.environ,
                **self.ports.server_env(),
                **self.extra_env,
                "PYTHONUNBUFFERED": "1",
            },
            cwd=self.workdir,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if wait_ready:
            wait_until(self._ready, START_TIMEOUT_S, f"IOC ready ({self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"IOC exited with {self.proc.returncode}:\n{self.log()}")
        return READY_LINE in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"IOC did not exit within {timeout} s:\n{self.log()}") from None
        finally:
            if self._log_file:
                self._log_file.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # The real command-line tools.

    def tool(self, *argv: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def caget(self, *names: str) -> list[str]:
        """Values as `caget -t` prints them (enum strings for enums)."""
        out = self.tool("caget", "-t", "-w", "5", *names)
        assert out.returncode == 0, f"caget {names} failed: {out.stdout}{out.stderr}"
        return out.stdout.strip().splitlines()

    def get(self, name: str) -> str:
        return self.caget(name)[0].strip()

    def getf(self, name: str) -> float:
        out = self.tool("caget", "-t", "-n", "-w", "5", name)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[0])

    def pva(self, name: str):
        """The value over PV Access (p4p), exact for arrays and large numbers."""
        from p4p.client.thread import Context

        ctx = Context("pva", conf=self.ports.p4p_conf(), useenv=False)
        try:
            return ctx.get(name, timeout=10.0)
        finally:
            ctx.close()

    def caput(self, name: str, value: str | int | float) -> subprocess.CompletedProcess:
        return self.tool("caput", "-w", "5", name, str(value))

    def put_ok(self, name: str, value: str | int | float) -> None:
        out = self.caput(name, value)
        assert out.returncode == 0 and not _refusal(out.stdout + out.stderr), (
            f"caput {name} {value} failed: {out.stdout}{out.stderr}"
        )

    def put_refused(self, name: str, value: str | int | float) -> bool:
        """True if the IOC refused the write (the CA tool reports a write failure)."""
        out = self.caput(name, value)
        return _refusal(out.stdout + out.stderr)

    def wait_value(self, name: str, expected: str, timeout: float = 15.0) -> None:
        wait_until(lambda: self.get(name) == expected, timeout, f"{name} == {expected}", 0.1)

    def wait_numeric(self, name: str, predicate, timeout: float = 15.0, what: str = "") -> float:
        def check():
            value = self.getf(name)
            return (value,) if predicate(value) else None

        return wait_until(check, timeout, what or f"{name} condition", 0.1)[0]

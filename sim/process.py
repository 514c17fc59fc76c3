"""`dgs-sim`: the simulated crate in its own process, behind a shared-memory window.

The boards are the in-process simulator's (`sim.SimCrate`), with their FIFOs
placed in the window (`sim.ringfifo`). A pump catches every board up every 2 to
10 ms (1/20 of the shortest FIFO fill time), so events are made here, on this
process's CPU, and the IOC only copies words out; between pump passes the same
thread answers the command socket (`sim.commands`).
The window and the socket disappear when the process ends (SIGTERM, Ctrl-C, or,
for a crate process an IOC spawned, the IOC closing its stdin).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any

from ioc.hardware import ReadError
from ioc.realtime import PRIORITY_RANGE, enter_realtime, freeze_heap
from sim.board import SimBoard, SimBoardSpec
from sim.clock import HorizonClock
from sim.commands import encode, error_reply
from sim.crate import SimCrate
from sim.faults import Fault
from sim.ringfifo import RingFifo
from sim.specs import board_specs, specs_from_json, window_name
from sim.window import (
    C_READ_ERROR,
    C_UNDERFLOW,
    H_BUILDING,
    H_CLOSED,
    H_HEARTBEAT_NS,
    REGISTER_SLOTS,
    BoardLayout,
    Window,
)
from sim.window import socket_address as address

#: Pump period while some board takes data, and while none does (heartbeat only).
PUMP_BUSY_S = 0.002
PUMP_IDLE_S = 0.010
#: While boards take data the pump period is this share of the shortest FIFO fill time
#: (within PUMP_BUSY_S..PUMP_IDLE_S): the depth the IOC sees lags the board by at most
#: 1/20 of the time it has to read, and a slow board is not rebuilt in tiny batches
#: (each pass has a fixed cost: at 500 Hz/ch, 30 % of a core at 1 ms, 20 % at 5 ms).
PUMP_SHARE_OF_FILL = 0.05
#: How often the live registers (timestamp, event counts) are copied into the window; every
#: register is copied after each command.
REGISTER_IMAGE_S = 0.1
#: Faults the reader side shows (status / read), signalled through the window.
READER_FAULTS = {Fault.FIFO_UNDERFLOW: C_UNDERFLOW, Fault.READ_ERROR: C_READ_ERROR}
#: Board calls the command socket passes straight to the simulated board.
BOARD_CALLS = frozenset({
    "set_package_data", "select_fifo", "reset_fifo", "set_master_logic", "reinit_pipeline",
    "latch_timestamp", "write_register", "read_register", "set_event_rate",
    "set_trace_length", "set_header_type", "reset_accounting",
})
#: Commands that change nothing the window shows.
QUERIES = frozenset({"accounting", "package_data", "registers", "read_register"})
#: A reply the IOC does not take within this is dropped with its connection.
SEND_TIMEOUT_S = 1.0

log = logging.getLogger("dgs.sim")


class CrateServer:
    """A simulated crate served through window ``name`` until `stop` is set."""

    def __init__(self, specs: list[SimBoardSpec], seed: int, name: str) -> None:
        self.name = name
        self.stop = threading.Event()
        #: Every event is built up to the time this clock shows, and no further.
        self.clock = HorizonClock()
        self.crate = SimCrate(specs, seed=seed, clock=self.clock)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(address(name))  # the live-owner check: one server per name
        except OSError as err:
            self._listener.close()
            raise RuntimeError(f"window {name} is already served by another crate process") from err
        self._listener.listen(8)
        self._next_live = 0.0
        layout = [BoardLayout(b.identity.name, b.FIFOS, b.fifo_words) for b in self.crate.boards]
        self.window = Window.create(name, layout, self.crate.clock_origin_ns())
        for index, board in enumerate(self.crate.boards):
            window = self.window
            board.use_fifos([
                RingFifo(window.ring(index, f), window.fifo_control(index, f), board.CHANNELS)
                for f in range(board.FIFOS)
            ])
        self._register_names = [board.register_names() for board in self.crate.boards]
        for board, names in zip(self.crate.boards, self._register_names):
            if len(names) > REGISTER_SLOTS:
                raise RuntimeError(f"{board.identity.name}: too many registers for the window")
        #: Per board: the image slots and names of the registers that change by themselves.
        self._live = []
        for board, names in zip(self.crate.boards, self._register_names):
            live = board.live_register_names()
            self._live.append(([names.index(name) for name in live], live))
        for index in range(len(self.crate.boards)):
            self._refresh_registers(index)
        self.window.header[H_HEARTBEAT_NS] = self.clock.advance_to_now()

    def _refresh_registers(self, index: int) -> None:
        """Copy a board's register values into the window's image."""
        names = self._register_names[index]
        self.window.registers(index)[: len(names)] = self.crate.boards[index].register_values(names)

    def _refresh_live_registers(self) -> None:
        for index, (slots, names) in enumerate(self._live):
            if slots:
                values = self.crate.boards[index].register_values(names)
                self.window.registers(index)[slots] = values

    def serve(self, stdin_ends_it: bool = False) -> None:
        """Pump and answer commands until `stop` (or the end of stdin); then remove the window.

        One thread does both, so a command never waits for the interpreter lock behind
        the pump (under load that wait, and a preempted pump holding the lock, made
        answers take tens of milliseconds): at most one pump pass, then it is answered.
        """
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, self._accept)
        if stdin_ends_it:
            selector.register(sys.stdin.fileno(), selectors.EVENT_READ, self._stdin)
        next_pass = 0.0
        try:
            while not self.stop.is_set():
                timeout = max(0.0, next_pass - time.monotonic())
                for key, _ in selector.select(timeout):
                    key.data(selector, key.fileobj)
                if time.monotonic() >= next_pass:
                    next_pass = time.monotonic() + self._pump_pass()
        finally:
            self.window.header[H_CLOSED] = 1
            self.window.unlink()
            for key in list(selector.get_map().values()):
                if isinstance(key.fileobj, socket.socket):
                    key.fileobj.close()
            selector.close()

    def _pump_pass(self) -> float:
        """Build every event that arrived, show a heartbeat; returns the time to the next.

        The heartbeat is the instant every board was built up to (`_build_every_board`).
        """
        self._build_every_board()
        now = time.monotonic()
        if now >= self._next_live:
            self._next_live = now + REGISTER_IMAGE_S
            self._refresh_live_registers()
        fill_s = min((board.fill_time_s() for board in self.crate.boards), default=PUMP_IDLE_S)
        return min(PUMP_IDLE_S, max(PUMP_BUSY_S, PUMP_SHARE_OF_FILL * fill_s))

    def _build_every_board(self) -> None:
        """Put every event that has arrived in the FIFOs, then show that instant as the
        heartbeat: a timestamp latched up to it follows every event built, and precedes
        every event built later (the boards' clock stands at it until the next build,
        so nothing else, a register refresh or a command, builds past it)."""
        header = self.window.header
        header[H_BUILDING] = 1
        built_until_ns = self.clock.advance_to_now()
        for board in self.crate.boards:
            board.catch_up()
        header[H_HEARTBEAT_NS] = built_until_ns
        header[H_BUILDING] = 0

    def _accept(self, selector: selectors.BaseSelector, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.setblocking(True)
        conn.settimeout(SEND_TIMEOUT_S)
        selector.register(conn, selectors.EVENT_READ, _Connection(self).readable)

    def _stdin(self, selector: selectors.BaseSelector, fd: int) -> None:
        """A spawned crate process ends with its IOC: the IOC's end closes our stdin."""
        if not os.read(fd, 4096):
            selector.unregister(fd)
            self.stop.set()

    def execute(self, index: int, op: str, args: list[Any]) -> Any:
        """One command: a crate-wide one (index -1) or one on board ``index``."""
        if index == -1:
            if op == "reset_accounting":
                return self.crate.reset_accounting()
            raise RuntimeError(f"unknown crate command {op}")
        result = self._board_command(index, op, args)
        if op not in QUERIES:
            # The answer comes after the window shows the command's effect: events that
            # arrived before it (master logic off) are in the FIFO, registers in the image,
            # and the heartbeat past them, so the end-of-run header latched after the
            # drain that follows is not older than the events the drain read.
            self._build_every_board()
            self._refresh_registers(index)
        return result

    def _board_command(self, index: int, op: str, args: list[Any]) -> Any:
        board = self.crate.boards[index]
        if op in BOARD_CALLS:
            method = getattr(board, op, None)
            if method is None:
                raise ValueError(f"{board.identity.name} has no {op}")
            return method(*args)
        if op == "registers":
            return self._register_names[index]
        if op == "inject":
            return self._inject(index, board, Fault(args[0]))
        if op == "accounting":
            return {
                "generated": board.generated_by_channel.tolist(),
                "dropped": board.dropped_by_channel.tolist(),
                "cleared": board.cleared_by_channel.tolist(),
            }
        if op == "package_data":
            return board.package_data
        raise RuntimeError(f"unknown board command {op}")

    def _inject(self, index: int, board: SimBoard, fault: Fault) -> None:
        board.inject(fault)
        slot = READER_FAULTS.get(fault)
        if slot is not None and board.claim_fault(fault):
            self.window.control(index)[slot] = 1


class _Connection:
    """One IOC connection: requests arrive as JSON lines, possibly split or several at once."""

    def __init__(self, server: CrateServer) -> None:
        self._server = server
        self._pending = b""

    def readable(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            selector.unregister(conn)
            conn.close()
            return
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            try:
                request = json.loads(line)
                result = self._server.execute(request["board"], request["op"], request["args"])
                reply = {"result": result}
            except (KeyError, IndexError, ValueError, ReadError, RuntimeError, TypeError) as err:
                reply = error_reply(err)
            try:
                conn.sendall(encode(reply))
            except OSError:
                selector.unregister(conn)
                conn.close()
                return


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dgs-sim", description="The simulated crate of a configuration, in its own process."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="system configuration (TOML)")
    source.add_argument("--demo", action="store_true", help="the demonstration crate")
    source.add_argument("--spec-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--crate", metavar="NN", help="which crate of the configuration")
    p.add_argument("--window", metavar="NAME", help="window name (default: the configuration's)")
    p.add_argument("--realtime-priority", type=int, metavar="N",
                   help="SCHED_FIFO priority 1..98, 0 for the normal policy "
                        "(default: the configuration's sim_realtime_priority)")
    return p.parse_args(argv)


def _crate_from_args(args: argparse.Namespace) -> tuple[list[SimBoardSpec], int, str, int]:
    """Boards, seed, window name and real-time priority of the crate to serve."""
    if args.spec_stdin:
        specs, seed = specs_from_json(json.loads(sys.stdin.readline()))
        return specs, seed, args.window, args.realtime_priority or 0
    from ioc.config import demo_config, load_config

    system = demo_config() if args.demo else load_config(args.config)
    crate = system.crate(args.crate)
    priority = crate.sim_realtime_priority
    if args.realtime_priority is not None:
        priority = args.realtime_priority
    return board_specs(crate), crate.seed, args.window or window_name(crate), priority


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        specs, seed, name, priority = _crate_from_args(args)
        if not name:
            raise ValueError("--spec-stdin needs --window")
        if not 0 <= priority <= PRIORITY_RANGE[1]:
            raise ValueError(f"--realtime-priority must be 0..{PRIORITY_RANGE[1]}, got {priority}")
        server = CrateServer(specs, seed, name)
    except Exception as err:  # configuration, window or socket: one line for the user
        print(f"dgs-sim: {err}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop.set())
    names = ", ".join(board.identity.name for board in server.crate.boards)
    print(f"dgs-sim: serving {names} through window {server.window.path}", flush=True)
    enter_realtime(priority, logging.getLogger("dgs.sim"), "crate process")
    # What start-up built lives as long as the process: out of the garbage collector's
    # reach, a full collection no longer stalls the pump (tens of ms: the FIFOs then
    # took that long's events at once, like hardware that paused).
    freeze_heap()
    print("dgs-sim: ready", flush=True)
    server.serve(stdin_ends_it=args.spec_stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())

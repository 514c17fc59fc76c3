"""R8 (spec 06): the soak. A crate at >= 100 MB/s for 10 minutes, a fault every second and a
receiver disconnect every 5 seconds; every event accounted for, per board.

The crate is the demo crate (four digitizers, 200-sample events, 456 bytes each)
with `SIM_EventRate` raised to the requested data rate. A receiver in its own
process pulls with 6 requests in flight and counts, per board, the events it
gets, the words it cannot parse (a bad-marker event arrives as 114 such words)
and breaks of per-channel timestamp order. Every ``--disconnect-period`` it
leaves, in turn: cleanly (stops asking, reads what it is owed, closes), killed
between replies (RST with nothing in flight), or killed in the middle of a
reply's payload. A reply that dies with a killed receiver is lost for good
unless the sender's write failed and it put the reply back: the receiver saw
the lost reply's header and first event, so it knows the board and the number
of events, and cancels the loss if the next connection's first reply is the
same one again.

At the end, per board:

    generated = received + bad-marker events + cleared (FIFO resets)
                + killed in flight + discarded (fatal checks and bypass, OL_DataLost)

where `OL_DataLost` has KiB resolution, so the discarded events are bounded
by it, not counted exactly. A reply still in the IOC's socket when the receiver
died is lost in flight: the receiver counts it as killed, and the IOC counts it
too (`OL_LostEventsInFlight`, part of `OL_DataLost`); it is taken out of the
discarded side once. The report also gives RSS of the IOC over time
(``/proc/<pid>/status``) and ends with one PASS/FAIL line; exit code 0/1.

    python benchmarks/soak.py [--minutes 10] [--rate 105] [--min-rate 100] [--json FILE]

The offered rate is set a little above the pass threshold on the received rate:
events that arrive while a FIFO is full are never generated (`SIM_Dropped`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from dataflow import (  # noqa: E402
    BOARDS,
    CRATE,
    DEMO_SPECS,
    EVENT_BYTES,
    EVENT_WORDS,
    KIB,
    POOL_SIZE,
    BoardSpec,
    Pva,
    Watch,
    crate_toml,
    read_exactly,
    sim_figures,
)
from ioc_harness import IocProcess, Ports  # noqa: E402

from ioc import packets  # noqa: E402
from ioc.decoder import KIND_EVENT, KIND_TYPE_F  # noqa: E402
from ioc.hardware import WORD  # noqa: E402
from receiver.client import (  # noqa: E402
    HEADER,
    INSUFF_DATA,
    SERVER_SUMMARY,
    DataConnection,
    ReplyHeader,
    decode_payload,
)
from sim.faults import Fault  # noqa: E402

CHANNELS = packets.DIGITIZER_CHANNELS
PIPELINE = 6
FAULTS = tuple(f for f in Fault if f is not Fault.NONE)
#: Disconnect modes, in turn: nine kills to one clean close (R3 asks for >= 100 kills in the
#: soak; 10 minutes with a disconnect every 5 s give about 120 disconnects).
CLEAN = "clean close"
KILL_BETWEEN = "killed between replies"
KILL_MID_PAYLOAD = "killed mid-payload"
DISCONNECTS = (CLEAN, *(KILL_BETWEEN, KILL_MID_PAYLOAD) * 4, KILL_BETWEEN)
RSS_PERIOD_S = 10.0
PROGRESS_PERIOD_S = 30.0
RSS_TOLERANCE = 0.05
#: inLoop's log lines of FIFO resets: "inLoop: card N: <cause>...".
RESET_CAUSES = ("FIFO full", "FIFO underflow", "read error")
_RESET_LINE = re.compile(r"inLoop: card (\d+): (FIFO full|FIFO underflow|read error)")
_HELD_BACK = re.compile(r"\(\+(\d+) more")
#: A mid-payload kill reads this much of the reply: header words of its first event.
KILL_READ_BYTES = 4 * packets.TYPE_F_WORDS


# ------------------------------------------------------------------ receiver


@dataclass
class BoardCount:
    """What the receiver saw of one board."""

    events: int = 0
    garbage_words: int = 0
    end_of_run: int = 0
    order_breaks: int = 0
    killed_events: int = 0


@dataclass
class ReceiverReport:
    boards: dict[int, BoardCount] = field(default_factory=dict)
    payload_bytes: int = 0
    replies: int = 0
    connections: int = 0
    disconnects: Counter = field(default_factory=Counter)
    kills_requeued: int = 0
    error: str = ""


def _first_event_key(words: np.ndarray) -> tuple[int, int, int]:
    """(board, channel, timestamp) of a reply's first packet, from its raw words (word 0,
    the marker, may be the one a bad-marker fault corrupted)."""
    w1, w2, w3 = (int(w) for w in words[1:4])
    return int(packets.board_id(w1)), int(packets.channel_id(w1)), int(packets.timestamp(w2, w3))


class CountingReceiver:
    """Pulls replies, counts per board, disconnects on schedule; ends after every 0xD."""

    def __init__(self, port: int, disconnect_period: float, received_bytes) -> None:
        self.port = port
        self.disconnect_period = disconnect_period
        self.received_bytes = received_bytes  # shared with the controller for progress lines
        self.report = ReceiverReport()
        self.last_stamp = {bid: np.full(16, -1, dtype=np.int64) for bid in BOARDS.values()}
        self.pending_kill: tuple[tuple[int, int, int], int] | None = None
        self.turn = 0

    def board(self, bid: int) -> BoardCount:
        return self.report.boards.setdefault(bid, BoardCount())

    @property
    def done(self) -> bool:
        return all(self.board(bid).end_of_run for bid in BOARDS.values())

    def run(self) -> ReceiverReport:
        while not self.done:
            conn = DataConnection.connect("127.0.0.1", self.port, timeout=30, read_timeout=30)
            self.report.connections += 1
            try:
                self.serve(conn)
            finally:
                conn.close()
        return self.report

    def serve(self, conn: DataConnection) -> None:
        conn.request(PIPELINE)
        leave_at = time.monotonic() + self.disconnect_period
        first = True
        while True:
            header, payload = conn.read_reply()
            if header.type == SERVER_SUMMARY and first:
                self.settle_kill(payload)
                first = False
            self.count(header, payload)
            if self.done or time.monotonic() >= leave_at:
                break
            conn.request(1)
        while conn.outstanding:  # stop asking: read what we are owed
            self.count(*conn.read_reply())
        if self.done:
            return
        mode = DISCONNECTS[self.turn % len(DISCONNECTS)]
        self.turn += 1
        self.report.disconnects[mode] += 1
        if mode == KILL_MID_PAYLOAD:
            self.kill_mid_payload(conn)
        elif mode == KILL_BETWEEN:
            _abort(conn.sock)

    def kill_mid_payload(self, conn: DataConnection) -> None:
        """Ask once more and die after the first event header of a data reply."""
        for _ in range(1000):
            conn.request(1)
            header = ReplyHeader(*HEADER.unpack(read_exactly(conn.sock, HEADER.size)))
            if header.type == SERVER_SUMMARY and header.length > 2 * KILL_READ_BYTES:
                head = np.frombuffer(read_exactly(conn.sock, KILL_READ_BYTES), dtype=WORD)
                self.pending_kill = (_first_event_key(head), header.length // EVENT_BYTES)
                _abort(conn.sock)
                return
            payload = read_exactly(conn.sock, header.length)
            conn.outstanding -= 1
            self.count(header, memoryview(payload))
            if self.done:
                return
        _abort(conn.sock)

    def settle_kill(self, payload: memoryview) -> None:
        """The reply a killed receiver died in is lost, unless the sender failed to write it
        and put it back: then it is the next connection's first reply."""
        if self.pending_kill is None:
            return
        key, events = self.pending_kill
        self.pending_kill = None
        if _first_event_key(np.frombuffer(payload[:16], dtype=WORD)) == key:
            self.report.kills_requeued += 1
        else:
            self.board(key[0]).killed_events += events

    def count(self, header: ReplyHeader, payload: memoryview) -> None:
        self.report.replies += 1
        if header.type == INSUFF_DATA:
            return
        self.report.payload_bytes += len(payload)
        with self.received_bytes.get_lock():
            self.received_bytes.value += len(payload)
        decoded = decode_payload(payload)
        words = np.frombuffer(payload, dtype=WORD)
        for offset, nwords in decoded.unknown:
            bid = int(packets.board_id(int(words[offset + 1]))) if offset + 1 < words.size else -1
            self.board(bid).garbage_words += nwords
        events = decoded.events
        if events.size == 0:
            return
        kinds = events["kind"]
        headers = events[kinds == KIND_TYPE_F]
        for bid in headers["board"][headers["channel"] == packets.CH_END_OF_RUN]:
            self.board(int(bid)).end_of_run += 1
        data = events[kinds == KIND_EVENT]
        if data.size:
            self.check_order(int(data["board"][0]), data)

    def check_order(self, bid: int, data: np.ndarray) -> None:
        """Per channel, every timestamp above the one before (a duplicate would break it)."""
        count = self.board(bid)
        count.events += data.size
        last = self.last_stamp.setdefault(bid, np.full(16, -1, dtype=np.int64))
        channels = data["channel"]
        stamps = data["timestamp"].astype(np.int64)
        for channel in np.unique(channels):
            ts = stamps[channels == channel]
            count.order_breaks += int(ts[0] <= last[channel]) + int(np.count_nonzero(
                np.diff(ts) <= 0))
            last[channel] = ts[-1]


def _abort(sock: socket.socket) -> None:
    """Leave like a killed process: RST, no orderly close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def receiver_process(port: int, disconnect_period: float, received_bytes, results) -> None:
    receiver = CountingReceiver(port, disconnect_period, received_bytes)
    try:
        receiver.run()
    except Exception as err:  # reported by the controller
        receiver.report.error = f"{type(err).__name__}: {err}"
    results.put(receiver.report)


# ---------------------------------------------------------------- controller


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BoardAccount:
    """One board's figures at the end and whether they balance."""

    name: str
    generated: int
    dropped: int
    received: int
    bad_marker: int
    cleared: int
    killed: int
    #: Of ``killed``, what the IOC counted too: replies still in its socket when the
    #: receiver died (`DAQC01_OL_LostEventsInFlight`, also part of `OL_DataLost`).
    killed_seen_by_ioc: int
    discarded_kib: int
    unexplained: int
    order_breaks: int
    regressions_injected: int
    end_of_run: int
    balanced: bool


def account(pva: Pva, report: ReceiverReport, injected: dict[str, Counter],
            bypassed: bool, type_f_built: int) -> list[BoardAccount]:
    accounts = []
    in_flight = pva.get(f"DAQC{CRATE}_OL_LostEventsInFlight")
    for card, (name, bid) in enumerate(BOARDS.items()):
        figures = sim_figures(pva, name)
        seen = report.boards.get(bid, BoardCount())
        bad_marker, odd_words = divmod(seen.garbage_words, EVENT_WORDS)
        discarded_kib = round(pva.number(f"DAQC{CRATE}_OL_DataLost{card}") * KIB)
        unexplained = (figures.generated - seen.events - bad_marker - figures.cleared
                       - seen.killed_events)
        # OL_DataLost: floor(bytes / KiB) of whole discarded buffers (fatal discards hold
        # data events only; the bypass may also recycle 16-byte type-F headers) and of the
        # replies lost in flight, which the receiver counted already as killed.
        seen_by_ioc = int(in_flight[card])
        counted_twice = seen_by_ioc * EVENT_BYTES
        low = discarded_kib * KIB - counted_twice - (16 * type_f_built if bypassed else 0)
        high = discarded_kib * KIB - counted_twice + KIB - 1
        balanced = (odd_words == 0 and seen_by_ioc <= seen.killed_events
                    and low <= unexplained * EVENT_BYTES <= high)
        regressions = injected[name][Fault.TIMESTAMP_REGRESSION]
        accounts.append(BoardAccount(
            name, figures.generated, figures.dropped, seen.events, bad_marker, figures.cleared,
            seen.killed_events, seen_by_ioc, discarded_kib, unexplained, seen.order_breaks,
            regressions, seen.end_of_run, balanced,
        ))
    return accounts


def logged_resets(log: str) -> dict[str, Counter]:
    """FIFO resets per card by cause, from inLoop's log (its throttled lines say how many
    more happened since the previous line of the same kind)."""
    found: dict[str, Counter] = {cause: Counter() for cause in RESET_CAUSES}
    for line in log.splitlines():
        match = _RESET_LINE.search(line)
        if match and match.group(2) in found:
            more = _HELD_BACK.search(line)
            found[match.group(2)][int(match.group(1))] += 1 + (int(more.group(1)) if more else 0)
    return found


def soak_config(workdir: Path, rate_mb_s: float) -> Path:
    rate_hz = rate_mb_s * 1e6 / (len(DEMO_SPECS) * CHANNELS * EVENT_BYTES)
    specs = tuple(BoardSpec(b.name, b.card, b.slot, b.package_data, rate_hz=round(rate_hz, 1))
                  for b in DEMO_SPECS)
    path = workdir / "soak.toml"
    path.write_text(crate_toml(specs))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=105.0, help="offered MB/s (default 105)")
    parser.add_argument("--min-rate", type=float, default=100.0,
                        help="received MB/s needed to pass (default 100)")
    parser.add_argument("--fault-period", type=float, default=1.0, help="seconds")
    parser.add_argument("--disconnect-period", type=float, default=5.0, help="seconds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    duration = args.minutes * 60

    workdir = Path(tempfile.mkdtemp(prefix="dgs-soak-"))
    ports = Ports.allocate()
    config = soak_config(workdir, args.rate)
    ioc = IocProcess(["--config", str(config), "--data-port", str(ports.data),
                      "--state-dir", str(workdir / "state")], workdir, ports).start()
    spawn = multiprocessing.get_context("spawn")
    received = spawn.Value("q", 0)
    results = spawn.Queue()
    rx = spawn.Process(target=receiver_process,
                       args=(ports.data, args.disconnect_period, received, results))
    rx.start()
    pva = Pva(ioc)
    watch = Watch(pva, f"DAQC{CRATE}_CV_BuffersOK")
    injected = {name: Counter() for name in BOARDS}
    rss: list[tuple[float, float]] = []
    print(f"soak: {args.minutes:g} min at {args.rate:g} MB/s offered, a fault every "
          f"{args.fault_period:g} s, a receiver disconnect every {args.disconnect_period:g} s; "
          f"IOC pid {ioc.proc.pid}, log {ioc.log_path}", flush=True)
    try:
        ioc.put_ok("Online_CS_SaveData", "Save")
        ioc.put_ok("Online_CS_StartStop", "Start")
        ioc.wait_value(f"DAQC{CRATE}_CV_State", "Running")
        start = time.monotonic()
        cpu_start = proc_cpu_s(ioc.proc.pid)
        next_fault = start + args.fault_period
        next_rss = start
        next_progress = start + PROGRESS_PERIOD_S
        last_bytes, last_at = 0, start
        faults = 0
        while (now := time.monotonic()) < start + duration:
            if ioc.proc.poll() is not None:
                raise RuntimeError(f"the IOC exited with {ioc.proc.returncode}")
            if not rx.is_alive():
                raise RuntimeError("the receiver process ended early")
            if now >= next_fault:
                name = list(BOARDS)[(faults // len(FAULTS)) % len(BOARDS)]
                fault = FAULTS[faults % len(FAULTS)]
                pva.put(f"VME{CRATE}:{name}:SIM_Fault", int(fault))
                injected[name][fault] += 1
                faults += 1
                next_fault += args.fault_period
            if now >= next_rss:
                rss.append((now - start, proc_rss_mib(ioc.proc.pid)))
                next_rss += RSS_PERIOD_S
            if now >= next_progress:
                got = received.value
                lost, free = pva.numbers(f"DAQC{CRATE}_OL_TotalBufsLost",
                                         f"DAQC{CRATE}_CV_BuffersAvail")
                rate = (got - last_bytes) / 1e6 / (now - last_at)
                print(f"  t={now - start:5.0f} s  received {rate:6.1f} "
                      f"MB/s  RSS {rss[-1][1]:6.1f} MiB  free buffers {free:3.0f}  "
                      f"bypassed buffers {lost:.0f}  faults {faults}", flush=True)
                last_bytes, last_at = got, now
                next_progress += PROGRESS_PERIOD_S
            time.sleep(max(0.0, min(next_fault, next_rss, next_progress) - time.monotonic()))
        elapsed = time.monotonic() - start
        cpu = proc_cpu_s(ioc.proc.pid) - cpu_start
        ioc.put_ok("Online_CS_StartStop", "Stop")
        ioc.wait_value(f"DAQC{CRATE}_CV_State", "Stopped", timeout=60)
        report: ReceiverReport = results.get(timeout=120)
        rx.join(30)
        ioc.wait_value(f"DAQC{CRATE}_CV_BuffersAvail", str(POOL_SIZE), timeout=30)
        time.sleep(1.0)  # one more 2 Hz publication of the final counters
        bypassed_buffers = int(pva.number(f"DAQC{CRATE}_OL_TotalBufsLost"))
        type_f_built = int(pva.number(f"DAQC{CRATE}_CV_InLoop2"))
        accounts = account(pva, report, injected, bypassed_buffers > 0, type_f_built)
        pool = pva.numbers(f"DAQC{CRATE}_CV_BuffersAvail", f"DAQC{CRATE}_CV_BuffersHeld",
                           f"DAQC{CRATE}_OL_NumWrittenBuffers", f"DAQC{CRATE}_OL_NumSendBuffers")
        buffers_ok = [str(v) for v in watch.seen()]
        requeued = int(pva.number(f"DAQC{CRATE}_CV_SenderRequeued"))
    finally:
        watch.close()
        pva.close()
        if rx.is_alive():
            rx.kill()
    signalled = time.monotonic()
    exit_code = ioc.stop(signal.SIGTERM, timeout=15)
    exit_s = time.monotonic() - signalled

    generated_bytes = sum(a.generated for a in accounts) * EVENT_BYTES
    offered = generated_bytes / 1e6 / elapsed
    delivered = report.payload_bytes / 1e6 / elapsed
    warm = [mib for t, mib in rss if t >= min(60.0, elapsed / 5)]
    baseline = float(np.median(warm[: max(1, len(warm) // 10)])) if warm else 0.0
    rss_flat = bool(warm) and all(abs(m - baseline) <= RSS_TOLERANCE * baseline for m in warm)
    conserved = "Leak" not in buffers_ok and pool == [POOL_SIZE, 0, 0, 0]
    balanced = all(a.balanced for a in accounts)
    ordered = all(a.order_breaks <= a.regressions_injected for a in accounts)
    ends = all(a.end_of_run == 1 for a in accounts)
    rate_ok = delivered >= args.min_rate
    kills = report.disconnects[KILL_BETWEEN] + report.disconnects[KILL_MID_PAYLOAD]

    print(f"\nsoak: {elapsed / 60:.1f} min, offered {offered:.1f} MB/s (generated), received "
          f"{delivered:.1f} MB/s ({report.payload_bytes / 1e9:.2f} GB in {report.replies} "
          f"replies), IOC CPU {100 * cpu / elapsed:.0f} % of a core")
    by_kind = ", ".join(f"{f.name} {sum(c[f] for c in injected.values())}" for f in FAULTS)
    print(f"faults injected: {faults} ({by_kind})")
    print(f"receiver: {report.connections} connections; disconnects "
          f"{dict(report.disconnects)}; {kills} kills; mid-payload kills whose reply was "
          f"put back and re-sent: {report.kills_requeued} (SenderRequeued {requeued})")
    print(f"conservation (R1): BuffersOK values seen {sorted(set(buffers_ok))}; at the end "
          f"free/held/written/sender = {'/'.join(f'{v:.0f}' for v in pool)}; bypassed buffers "
          f"{bypassed_buffers}")
    print("\nper board: generated = received + bad marker + cleared + killed in flight + "
          "discarded (OL_DataLost less what it counts of the killed, KiB resolution)")
    header = ("board", "generated", "received", "bad mark", "cleared", "killed", "discarded",
              "balance", "dropped*", "order", "0xD")
    print("  " + " ".join(f"{h:>11}" for h in header))
    for a in accounts:
        discarded = f"{a.unexplained} ({a.discarded_kib} KiB)"
        killed = f"{a.killed} ({a.killed_seen_by_ioc})"
        row = (a.name, a.generated, a.received, a.bad_marker, a.cleared, killed, discarded,
               "ok" if a.balanced else "OFF", a.dropped,
               f"{a.order_breaks}/{a.regressions_injected}", a.end_of_run)
        print("  " + " ".join(f"{v!s:>11}" for v in row))
    print("  (killed: in brackets, those the IOC counted lost in flight too; *dropped: arrived "
          "while the FIFO was full, never generated; order: timestamp order breaks / "
          "regressions injected)")
    resets = logged_resets(ioc.log())
    injected_kind = {Fault.FIFO_OVERFLOW: "FIFO full", Fault.FIFO_UNDERFLOW: "FIFO underflow",
                     Fault.READ_ERROR: "read error"}
    print("FIFO resets behind 'cleared', as the IOC logged them (injected in brackets):")
    for card, name in enumerate(BOARDS):
        parts = [f"{cause} {resets[cause][card]} ({injected[name][fault]})"
                 for fault, cause in injected_kind.items()]
        print(f"  {name}: " + ", ".join(parts))
    print("\nIOC RSS over time (MiB): " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss[::3]))
    print(f"RSS after warm-up: baseline {baseline:.1f} MiB, range {min(warm, default=0):.1f}.."
          f"{max(warm, default=0):.1f} MiB (flat within ±{RSS_TOLERANCE:.0%}: {rss_flat})")
    print(f"IOC exit on SIGTERM: code {exit_code} after {exit_s:.1f} s")
    checks = {
        "conservation": conserved, "balance per board": balanced, "order": ordered,
        "one 0xD per board": ends, "RSS flat": rss_flat, f"received >= {args.min_rate:g} MB/s":
        rate_ok, "receiver error-free": not report.error, "exit 0": exit_code == 0,
        "kills >= 100": kills >= 100 or duration < 600,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if report.error:
        print(f"receiver error: {report.error}")
    if args.json:
        args.json.write_text(json.dumps({
            "minutes": elapsed / 60, "offered_mb_s": offered, "received_mb_s": delivered,
            "faults": faults, "disconnects": dict(report.disconnects),
            "boards": [asdict(a) for a in accounts], "rss_mib": rss, "checks": checks,
        }, indent=2))
    verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    print(f"\nR8 soak: {verdict}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

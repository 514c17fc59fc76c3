"""P3: `dgs-receiver` writing GEB files from the demo crate, 200-sample events (spec 06).

The figure: the payload rate the receiver sustains from a real crate IOC (the
demo crate's four simulated digitizers, 200-sample LED events) while decoding
every reply, building its GEB records and writing them to per-board,
per-channel files on tmpfs (``/dev/shm``). The simulated rate is raised with
``caput`` to just above the P3 target (default 17 kHz per channel = 310 MB/s
offered; ``--rate`` pushes harder). The simulated FIFOs are made larger than a
real board's (16 Mi words instead of 256 Ki) so that short stalls of a shared
machine do not overflow them; spec 06 allows this and asks to say so.

The baseline, measured in the same run against the same IOC and stream: a bare
receiver (same protocol, 6 requests in flight, every payload read into a
preallocated buffer, nothing decoded or written). Repetitions alternate the
two; each measures a window after a warm-up, from the clients' own counters.
After each receiver repetition the run is stopped and the files are checked:
events in the files = ``SIM_Generated``, no buffer dropped by the IOC's bypass
(``OL_TotalBufsLost``) and no FIFO overflow (``SIM_Dropped``). Pass: median
rate >= 300 MB/s and every repetition complete. A run's files stay until the
next receiver run, which frees them as it writes (`common.fill_tmpfs` says
why).

A second figure isolates the receiver from the IOC it shares the machine with:
about 250 MB of replies recorded from the same crate are fed through the
receiver's own processing (decode, GEB records, files on tmpfs) as fast as it
takes them; its baseline is a numpy copy of the same bytes.

Run: ``.venv/bin/python benchmarks/bench_receiver.py [--json FILE] [--repeat N]
[--seconds S] [--rate HZ]``
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from common import fill_tmpfs, releasing_tmpfs  # noqa: E402
from ioc_harness import IocProcess, Ports, wait_until  # noqa: E402

from receiver import geb  # noqa: E402
from receiver.client import DataConnection  # noqa: E402

TARGET_MB_S = 300.0
BOARDS = ("MDIG1", "MDIG2", "MDIG3", "MDIG4")
TIME_BUDGET_S = 85.0
FIFO_WORDS = 16 * 1024 * 1024
#: Replies replayed for the capacity figure (about 250 MB of 280 kB replies).
REPLAY_REPLIES = 900
STATUS = re.compile(r"\s([\d.]+) s\s+([\d.]+) MB\s")

CONFIG = """
[system]
globals = "local"

[[crate]]
crate = "01"
data_bind = "127.0.0.1"
{boards}
"""
BOARD = """
[[crate.board]]
name = "{name}"
kind = "digitizer_master"
card = {card}
slot = {slot}
package_data = {package}
enabled = true
[crate.board.sim]
trace_samples = 200
fifo_words = {fifo}
"""


def write_config(directory: Path) -> Path:
    boards = "".join(
        BOARD.format(name=name, card=i, slot=i + 3, package=101 + i, fifo=FIFO_WORDS)
        for i, name in enumerate(BOARDS)
    )
    path = directory / "bench-crate.toml"
    path.write_text(CONFIG.format(boards=boards))
    return path


class Crate:
    """The benchmark's crate IOC and its run control."""

    def __init__(self, workdir: Path, rate_hz: float) -> None:
        self.ioc = IocProcess(
            ["--config", str(write_config(workdir)), "--state-dir", str(workdir / "state")],
            workdir,
        )
        self.ioc.args += ["--data-port", str(self.ioc.ports.data)]
        self.ioc.start()
        for name in BOARDS:
            self.ioc.put_ok(f"VME01:{name}:SIM_EventRate", rate_hz)

    @property
    def ports(self) -> Ports:
        return self.ioc.ports

    def start(self) -> None:
        self.ioc.put_ok("Online_CS_SaveData", "Save")
        self.ioc.put_ok("Online_CS_StartStop", "Start")
        self.ioc.wait_value("DAQC01_CV_State", "Running")

    def stop(self) -> None:
        self.ioc.put_ok("Online_CS_StartStop", "Stop")
        self.ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=60)

    def counters(self) -> dict[str, float]:
        names = [f"VME01:{b}:SIM_{what}" for b in BOARDS for what in ("Generated", "Dropped")]
        names += ["DAQC01_OL_TotalBufsLost"]
        values = self.ioc.caget(*names)
        return {name: float(value) for name, value in zip(names, values, strict=True)}

    def close(self) -> None:
        self.ioc.stop()


def bare_receive(crate: Crate, warmup: float, seconds: float, keep: list | None = None) -> dict:
    """The baseline: pull and discard the stream for ``seconds`` after ``warmup``.

    After the window the run is stopped and the stream drained to every board's
    0xD header (16-byte type-F replies), so the next run starts clean. With
    ``keep`` (outside the measured repetitions) copies of the replies go there.
    """
    got = {"bytes": 0, "ends": 0}

    def pull() -> None:  # connects once the run opens the listener
        conn = DataConnection.connect("127.0.0.1", crate.ports.data, timeout=20.0)
        conn.request(6)
        while conn.outstanding:
            header, payload = conn.read_reply()
            got["bytes"] += header.length
            if keep is not None and header.length and len(keep) < REPLAY_REPLIES:
                keep.append((header, bytes(payload)))
            if header.length == 16 and payload[7] & 0xF == 0xD:
                got["ends"] += 1
            if got["ends"] < len(BOARDS):
                conn.request(1)
        conn.close()

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    crate.start()
    time.sleep(warmup)
    first, t0 = got["bytes"], time.perf_counter()
    time.sleep(seconds)
    last, t1 = got["bytes"], time.perf_counter()
    crate.stop()
    thread.join(60)
    if thread.is_alive():
        raise RuntimeError("the bare receiver did not see every board's end of run")
    return {"mb_s": (last - first) / (t1 - t0) / 1e6}


def receiver_run(crate: Crate, out_dir: Path, name: str, warmup: float, seconds: float,
                 offered_mb_s: float) -> dict:
    """The figure: `dgs-receiver` writing classic-layout files to ``out_dir``."""
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "receiver.cli", "--out", str(out_dir), "--run-name", name,
            "--status", "plain", "--status-interval", "0.25", "--connect-timeout", "20",
            f"127.0.0.1:{crate.ports.data}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    samples: list[tuple[float, float, float]] = []  # (wall clock, receiver t, MB)
    lines: list[str] = []

    def read_status() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            match = STATUS.search(line)
            if match:
                samples.append((time.perf_counter(), float(match[1]), float(match[2])))

    reader = threading.Thread(target=read_status, daemon=True)
    reader.start()
    wait_until(lambda: samples, 20, "receiver status")
    with releasing_tmpfs(out_dir, (out_dir / name,), offered_mb_s):
        crate.start()
        time.sleep(warmup)
        t0 = time.perf_counter()
        time.sleep(seconds)
        t1 = time.perf_counter()
        crate.stop()
        code = proc.wait(60)
    reader.join(10)
    after = crate.counters()
    window = [s for s in samples if t0 <= s[0] <= t1]
    if len(window) < 2:
        raise RuntimeError("too few status samples in the window:\n" + "".join(lines))
    rate = (window[-1][2] - window[0][2]) / (window[-1][1] - window[0][1])
    run_dir = out_dir / name
    records = sum(
        geb.read_records(path.read_bytes()).size
        for path in run_dir.iterdir()
        if re.search(r"_01\d\d_\d$", path.name)
    )
    generated = sum(after[f"VME01:{b}:SIM_Generated"] for b in BOARDS)
    result = {
        "mb_s": rate,
        "exit_code": code,
        "records": records,
        "generated": int(generated),
        "fifo_dropped": int(sum(after[f"VME01:{b}:SIM_Dropped"] for b in BOARDS)),
        "buffers_lost": int(after["DAQC01_OL_TotalBufsLost"]),
        "file_bytes": sum(p.stat().st_size for p in run_dir.iterdir()),
    }
    return result


def replay(replies: list, out_dir: Path) -> dict:
    """The receiver's own capacity: recorded replies through its processing, no IOC.

    Each reply goes through `Recorder.process_reply` (decode, GEB records, files
    on tmpfs) as fast as it can take them. Baseline: a
    numpy copy of the same payloads into one preallocated buffer.
    """
    from receiver import cli
    from receiver.files import Layout, RunDirectory

    total = sum(len(payload) for _, payload in replies)
    args = cli.build_parser().parse_args(["--run-name", "replay", "127.0.0.1:1"])
    run = RunDirectory.create(out_dir, "replay", layout=Layout.CLASSIC)
    puller = cli.Puller(0, ("127.0.0.1", 1), None, run, args,
                        cli.TriggerIdentity(set(), set()), threading.Event())
    record_reply = puller.recorder.process_reply
    start = time.perf_counter()
    for header, payload in replies:
        record_reply(header, memoryview(payload))
    run.close()
    elapsed = time.perf_counter() - start
    shutil.rmtree(run.path, ignore_errors=True)
    target = np.empty(max(len(payload) for _, payload in replies), dtype=np.uint8)
    start = time.perf_counter()
    for _, payload in replies:
        target[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    copy_elapsed = time.perf_counter() - start
    return {"mb_s": total / elapsed / 1e6, "copy_mb_s": total / copy_elapsed / 1e6,
            "mb": total / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each (default 5)")
    parser.add_argument("--seconds", type=float, default=2.5, help="measured window (default 2.5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--rate", type=float, default=17_000,
                        help="simulated events/s per channel (default 17000: 310 MB/s offered)")
    parser.add_argument("--out", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir()
                        else Path(tempfile.gettempdir()), help="where run files go (tmpfs)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    offered = 4 * 10 * args.rate * 4 * (14 + 100) / 1e6
    print(f"P3 receiver: demo crate, 200-sample events, {args.rate:g} Hz/channel "
          f"(offered {offered:.0f} MB/s), sim FIFOs {FIFO_WORDS} words, files in {args.out}",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-receiver-", dir=args.out))
    crate = Crate(workdir, args.rate)
    figures, baselines, runs = [], [], []
    try:
        recorded: list = []
        bare_receive(crate, 0.5, 1.0, keep=recorded)
        capacity = replay(recorded, out_dir)
        del recorded
        print(f"  receiver capacity on {capacity['mb']:.0f} MB of recorded replies (no IOC): "
              f"{capacity['mb_s']:.0f} MB/s; numpy copy {capacity['copy_mb_s']:.0f} MB/s",
              flush=True)
        fresh_mb_s = fill_tmpfs(out_dir, offered * 1e6 * (args.warmup + args.seconds))
        print(f"  tmpfs: fresh memory took {fresh_mb_s:.0f} MB/s (each receiver run writes into "
              "memory freed as it runs; see common.fill_tmpfs)", flush=True)
        for i in range(args.repeat):
            if time.monotonic() - started > TIME_BUDGET_S - 4 * (args.seconds + args.warmup):
                print("time budget reached; stopping early", flush=True)
                break
            base = bare_receive(crate, args.warmup, args.seconds)
            run = receiver_run(crate, out_dir, f"bench{i}", args.warmup, args.seconds, offered)
            baselines.append(base["mb_s"])
            figures.append(run["mb_s"])
            runs.append(run)
            print(
                f"  rep {i}: receiver {run['mb_s']:7.1f} MB/s  bare {base['mb_s']:7.1f} MB/s  "
                f"exit {run['exit_code']}  records {run['records']}/{run['generated']}  "
                f"lost buffers {run['buffers_lost']}  FIFO dropped {run['fifo_dropped']}",
                flush=True,
            )
    finally:
        crate.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if not figures:
        print("no repetition completed", file=sys.stderr)
        return 1
    figure, baseline = statistics.median(figures), statistics.median(baselines)
    complete = all(
        r["exit_code"] == 0 and r["records"] == r["generated"] and r["buffers_lost"] == 0
        and r["fifo_dropped"] == 0
        for r in runs
    )
    passed = figure >= TARGET_MB_S and complete
    print(
        f"receiver (decode + GEB files): {figure:.1f} MB/s   bare receive: {baseline:.1f} MB/s   "
        f"ratio {figure / baseline:.2f}   target >= {TARGET_MB_S:.0f} MB/s with nothing lost: "
        f"{'PASS' if passed else 'FAIL'}  ({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    print(f"receiver capacity (recorded replies, no IOC): {capacity['mb_s']:.0f} MB/s   "
          f"numpy copy: {capacity['copy_mb_s']:.0f} MB/s   "
          f"ratio {capacity['mb_s'] / capacity['copy_mb_s']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "receiver_mb_s": figure, "bare_mb_s": baseline, "ratio": figure / baseline,
            "repetitions": runs, "bare": baselines, "rate_hz": args.rate,
            "offered_mb_s": offered, "fifo_words": FIFO_WORDS, "pass": passed,
            "capacity_mb_s": capacity["mb_s"], "capacity_copy_mb_s": capacity["copy_mb_s"],
        }, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

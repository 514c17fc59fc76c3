"""P11: online building keeps up — `dgs-receiver --layout merged --events` (issue 16).

P11a: the three-crate demo system (examples/three-crates.toml: six digitizers,
one at 1 kHz per channel with 100-sample traces, the others at the simulator's
default rate) offers its data for a few seconds; ONE receiver process pulls
all three crates, writes the merged GEB file and an HDF5 event file to tmpfs.
It keeps up when every generated event is in the merged file, nothing was
late (no record released by ``--merge-wait`` before its time) and the receiver
is done soon after the crates have stopped: the figure is that lag, from the
last crate reporting Stopped (its data drained) to the receiver's exit. Each
crate runs as its own `dgs-ioc` with its global records local (the globals IOC
only coordinates; the data path is the same). A simulated crate's clock counts
from its IOC's start (real crates share one clock), so the IOCs start together
and the note gives how far apart their clocks are: more than ``--merge-wait``
would make late records however fast the receiver.

P11b: the single-crate P3 load (bench_end_to_end.py: 4 digitizers,
200-sample events, a little above 300 MB/s, 16 MiB simulated FIFOs) with the
receiver writing the merged file and the event file instead of the per-board
files: the figure is P3's (payload over the time from the first event to the
last end-of-run header written), conditions: no event lost (in the files =
``SIM_Generated``, no FIFO overflow, no buffer lost) and nothing late. Its
baseline is plain P3 (per-board files) measured in the same run.

    .venv/bin/python benchmarks/bench_online_build.py [--json FILE] [--seconds S] [--repeat N]
        [--offered MB/S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_end_to_end import (
    DGS_RECEIVER,
    FIFO_WORDS,
    P3_OFFERED_MB_S,
    P3_SAMPLES,
    P3_TARGET_MB_S,
    TMPFS,
    one_run,
    rate_for,
)
from common import (
    REPO,
    BenchIoc,
    Figure,
    crate_config,
    fill_tmpfs,
    finish,
    median,
    proc_cpu_seconds,
    wait_until,
)
from ioc_harness import READY_LINE

EXAMPLE = REPO / "examples" / "three-crates.toml"
#: The receiver must be done this soon after the last crate stopped.
LAG_TARGET_S = 2.0
RECEIVER_TIMEOUT_S = 120.0


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def crate_toml(crate: dict, path: Path) -> Path:
    """One crate of the example as a stand-alone configuration (global records local)."""
    lines = ["[system]", 'globals = "local"', "", "[[crate]]", f'crate = "{crate["crate"]}"',
             'data_bind = "127.0.0.1"', f"seed = {crate['seed']}", ""]
    for board in crate["board"]:
        lines.append("[[crate.board]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in board.items() if key != "sim"]
        if "sim" in board:
            lines.append("[crate.board.sim]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in board["sim"].items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def three_crates(workdir: Path, out_dir: Path, seconds: float) -> dict:
    """P11a: one run of the three-crate system into one merged receiver."""
    crates = tomllib.loads(EXAMPLE.read_text())["crate"]
    iocs = [BenchIoc(["--config", str(crate_toml(c, workdir / f"crate{c['crate']}.toml")),
                      "--crate", c["crate"]], workdir) for c in crates]
    for ioc in iocs:  # together: a simulated crate's clock counts from its IOC's start
        ioc.start(wait_ready=False)
    try:
        for ioc in iocs:
            wait_until(lambda ioc=ioc: READY_LINE in ioc.log() or ioc.proc.poll() is not None,
                       60, "crate IOC ready")
            if ioc.proc.poll() is not None:
                raise RuntimeError(f"a crate IOC exited at start: {ioc.log()[-2000:]}")
        return _three_crate_run(iocs, crates, out_dir, seconds)
    finally:
        for ioc in iocs:
            ioc.__exit__(None, None, None)


def _three_crate_run(iocs: list[BenchIoc], crates: list[dict], out_dir: Path,
                     seconds: float) -> dict:
    log_path = out_dir / "p11a.log"
    command = [
        str(DGS_RECEIVER), "--out", str(out_dir), "--run-name", "p11a", "--layout", "merged",
        "--events", str(out_dir / "p11a" / "p11a.h5"), "--status", "plain",
        "--status-interval", "3600", "--connect-timeout", "30",
        "--max-seconds", str(RECEIVER_TIMEOUT_S),
        *(x for c in crates for x in ("--crate", c["crate"])),
        *(x for ioc in iocs for x in ("--pv-pva", f"127.0.0.1:{ioc.ports.pva}")),
        *(f"127.0.0.1:{ioc.ports.data}" for ioc in iocs),
    ]
    with open(log_path, "w") as log:
        receiver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        for ioc, crate in zip(iocs, crates, strict=True):
            ioc.put_ok("Online_CS_SaveData", "Save")
            ioc.put_ok("Online_CS_StartStop", "Start")
            ioc.wait_value(f"DAQC{crate['crate']}_CV_State", "Running")
        started = time.monotonic()
        time.sleep(seconds)  # the measured run itself
        cpu_before_stop = proc_cpu_seconds(receiver.pid)
        for ioc in iocs:
            ioc.put_ok("Online_CS_StartStop", "Stop")
        for ioc, crate in zip(iocs, crates, strict=True):
            ioc.wait_value(f"DAQC{crate['crate']}_CV_State", "Stopped", timeout=30)
        stopped = time.monotonic()
        code = receiver.wait(RECEIVER_TIMEOUT_S)
        exited = time.monotonic()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    summary = json.loads((out_dir / "p11a" / "p11a.summary.json").read_text())
    generated = {}
    for ioc, crate in zip(iocs, crates, strict=True):
        names = [b["name"] for b in crate["board"]]
        values = ioc.values(*(f"VME{crate['crate']}:{name}:SIM_Generated" for name in names))
        for board, value in zip(crate["board"], values, strict=True):
            generated[board["package_data"]] = int(value)
    received: dict[int, int] = {}
    for ioc_summary in summary["iocs"]:
        for row in ioc_summary["channels"]:
            if row["channel"] in {f"{c:X}" for c in range(10)}:
                received[row["board"]] = received.get(row["board"], 0) + row["events"]
    payload = sum(i["payload_bytes"] for i in summary["iocs"])
    origins = [ioc.clock_origin_ns() for ioc in iocs]
    return {
        "clock_spread_s": (max(origins) - min(origins)) / 1e9,
        "exit_code": code,
        "lag_s": exited - stopped,
        "run_s": stopped - started,
        "payload_mb_s": payload / (stopped - started) / 1e6,
        "records_per_s": summary["online"]["records"] / (stopped - started),
        "receiver_cores_running": cpu_before_stop / seconds,
        "generated": generated,
        "received": received,
        "online": summary["online"],
        "lossless": code == 0 and received == generated,
    }


def single_crate(workdir: Path, out_dir: Path, seconds: float, repeat: int,
                 offered_mb_s: float) -> dict:
    """P11b: the P3 load, per-board files (baseline) and merged + events, alternately."""
    config = crate_config(workdir / "p3.toml", fifo_words=FIFO_WORDS,
                          event_rate_hz=rate_for(offered_mb_s, P3_SAMPLES),
                          trace_samples=P3_SAMPLES)

    plain, online = [], []
    with BenchIoc(["--config", str(config)], workdir) as ioc:

        def merged(run_dir: Path) -> list[str]:
            """As run control starts it: with the crate's PV snapshot (its enabled boards)."""
            return ["--layout", "merged", "--events", str(run_dir / "events.h5"),
                    "--crate", "01", "--pv-pva", f"127.0.0.1:{ioc.ports.pva}"]

        for _ in range(repeat):
            plain.append(one_run(ioc, P3_SAMPLES, offered_mb_s, seconds, out_dir))
            online.append(one_run(ioc, P3_SAMPLES, offered_mb_s, seconds, out_dir, merged))
    return {"plain": [vars(run) | {"lossless": run.lossless} for run in plain],
            "online": [vars(run) | {"lossless": run.lossless} for run in online]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--seconds", type=float, default=3.0, help="generation time of a run")
    parser.add_argument("--repeat", type=int, default=3, help="P11b runs of each kind")
    parser.add_argument("--offered", type=float, default=P3_OFFERED_MB_S, metavar="MB/S",
                        help="P11b: the crate's offered load (default P3's; the target stays "
                             "P3's, so a lower load only shows what the host sustains)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-p11-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-p11-", dir=TMPFS if TMPFS.is_dir() else None))
    try:
        fill_tmpfs(out_dir, args.offered * 1e6 * args.seconds)
        system = three_crates(workdir, out_dir, args.seconds)
        crate = single_crate(workdir, out_dir, args.seconds, args.repeat, args.offered)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    late_a = system["online"]["late"]
    online_runs, plain_runs = crate["online"], crate["plain"]
    late_b = sum(run["online"]["late"] for run in online_runs if run["online"])
    lossless_b = all(run["lossless"] for run in online_runs)
    events_b = median(run["online"]["events"]["events"] for run in online_runs if run["online"])
    figures = [
        Figure(
            id="P11a", what="3-crate demo system -> one receiver, merged file + HDF5 events",
            value=system["lag_s"], unit="s", baseline=None, baseline_what="",
            target=LAG_TARGET_S, higher_is_better=False,
            conditions_met=system["lossless"] and late_a == 0,
            note=(f"lag from the last crate stopped to the receiver's exit; offered "
                  f"{system['payload_mb_s']:.1f} MB/s, {system['records_per_s']:.0f} records/s "
                  f"for {system['run_s']:.1f} s; {late_a} late (the crates' clocks start "
                  f"{system['clock_spread_s']:.2f} s apart, --merge-wait 2 s); receiver "
                  f"{system['receiver_cores_running']:.2f} cores while running; "
                  f"{system['online']['events']['events']} events; "
                  + ("every generated event in the merged file" if system["lossless"]
                     else f"LOSS: generated {system['generated']}, merged {system['received']}")),
        ),
        Figure(
            id="P11b", what=f"P3 load (4 digitizers, {P3_SAMPLES} samples) -> merged + events",
            value=median(run["received_mb_s"] for run in online_runs), unit="MB/s",
            baseline=median(run["received_mb_s"] for run in plain_runs),
            baseline_what="P3, per-board files", target=P3_TARGET_MB_S,
            runs=[run["received_mb_s"] for run in online_runs],
            conditions_met=lossless_b and late_b == 0,
            note=(f"offered {args.offered:g} MB/s for {args.seconds:g} s per run, "
                  f"{len(online_runs)} runs each; {late_b} late; median {events_b:.0f} events "
                  f"per run; receiver cores: merged "
                  f"{median(run['receiver_cores'] for run in online_runs):.2f}, per-board "
                  f"{median(run['receiver_cores'] for run in plain_runs):.2f}; "
                  + ("no loss" if lossless_b else "; ".join(
                      f"run {n}: {run['received_events']} of {run['generated_events']} events, "
                      f"{run['dropped_events']} dropped, {run['buffers_lost']:g} buffers lost"
                      for n, run in enumerate(online_runs, 1) if not run["lossless"]))),
        ),
    ]
    return finish(args.json, "P11", figures, started, three_crates=system, single_crate=crate)


if __name__ == "__main__":
    sys.exit(main())

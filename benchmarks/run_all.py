"""`make bench`: run the benchmarks P1-P13, print one table, write JSON and the plot.

Each benchmark runs as its own process with a time limit (and the whole run
with a budget, 25 minutes by default), writes its JSON, and is read back
into `Figure` rows: figure, baseline measured in the same run, ratio, target,
PASS/FAIL. A benchmark that fails to finish shows up as a FAIL row saying
why. Results go to ``bench-results/results.json`` (with the machine, every
benchmark's own JSON and its output log) and ``bench-results/table.md``; the
P3 sweep is drawn to ``bench-results/throughput.png`` (the README's picture,
``benchmarks/throughput.png``, is replaced by hand when a run is worth showing).
A run of some benchmarks only (``--only``) writes ``results-partial.json`` /
``table-partial.md`` and leaves the full results and the plot alone.

    .venv/bin/python benchmarks/run_all.py [--only P3,P5] [--budget SECONDS] [--strict]

Exit code 1 when a benchmark did not report (crashed, timed out, skipped);
with ``--strict`` also when a figure misses its target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Figure, markdown_table, print_table
from plot import DEFAULT_PNG, plot_sweep

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = REPO / "bench-results"
DEFAULT_BUDGET_S = 1500.0
#: Time kept back for the other benchmarks when one is given its limit.
MIN_LIMIT_S = 30.0


# ------------------------------------------- reading the older JSON formats


def _p1_figures(document: dict) -> list[Figure]:
    return [
        Figure(
            id="P1" + "ab"[index] if len(document["results"]) > 1 else "P1",
            what=f"sender serving 1 MiB buffers, {row['pipeline']} request(s) in flight",
            value=row["figure_mb_s"], unit="MB/s", baseline=row["baseline_mb_s"],
            baseline_what="bare server", target=row["target_ratio"], target_on="ratio",
            runs=row.get("sender_runs_mb_s", []),
        )
        for index, row in enumerate(document["results"])
    ]


def _p2_figures(document: dict) -> list[Figure]:
    figures = [
        Figure(
            id="P2" + "ab"[index], what=f"outLoop check, every event: {row['case']}",
            value=row["check_GBps"], unit="GB/s", baseline=row["baseline_scan_GBps"],
            baseline_what="numpy marker scan", target=row["target_GBps"],
        )
        for index, row in enumerate(document["results"])
    ]
    figures += [
        Figure(
            id="P12s", what="live spectra: their cost in the P2b check",
            value=row["spectra_cost_percent"], unit="%", baseline=None, baseline_what="",
            target=row["spectra_target_percent"], higher_is_better=False,
            note=(f"P2b {row['check_paired_GBps']:.2f} GB/s without them,"
                  f" {row['check_with_spectra_GBps']:.2f} GB/s with (bench_checker.py)"),
        )
        for row in document["results"]
        if row.get("spectra_target_percent") is not None
    ]
    return figures


def _p4_figures(document: dict) -> list[Figure]:
    names = {"P4a": "simulator: 200-sample traces", "P4b": "simulator: header-only events"}
    figures = []
    for row in document["figures"]:
        figure_id = row["name"].split()[0]
        figures.append(Figure(
            id=figure_id, what=names.get(figure_id, row["name"]), value=row["value"],
            unit=row["unit"], baseline=row["baseline"], baseline_what="numpy copy",
            target=row["target"],
        ))
    return figures


def _receiver_figures(document: dict) -> list[Figure]:
    complete = all(
        run["exit_code"] == 0 and run["records"] == run["generated"]
        and run["buffers_lost"] == 0 and run["fifo_dropped"] == 0
        for run in document["repetitions"]
    )
    return [Figure(
        id="P3r", what="dgs-receiver alone: decode + GEB files vs bare receive",
        value=document["receiver_mb_s"], unit="MB/s", baseline=document["bare_mb_s"],
        baseline_what="bare receive", target=300.0, conditions_met=complete,
        note=(f"IOC offered {document['offered_mb_s']:.0f} MB/s (bench_receiver.py); "
              + ("nothing lost" if complete else "with losses")),
    )]


def _own_figures(document: dict) -> list[Figure]:
    return [Figure.from_dict(row) for row in document["figures"]]


@dataclass(frozen=True)
class Benchmark:
    key: str
    script: str
    limit_s: float
    figures: Callable[[dict], list[Figure]]
    args: tuple[str, ...] = ()


BENCHMARKS = (
    Benchmark("P1", "bench_sender.py", 120, _p1_figures),
    Benchmark("P2", "bench_checker.py", 90, _p2_figures),
    Benchmark("P3", "bench_end_to_end.py", 200, _own_figures),
    Benchmark("P3r", "bench_receiver.py", 120, _receiver_figures),
    Benchmark("P4", "bench_sim.py", 90, _p4_figures),
    Benchmark("P5", "bench_latency.py", 120, _own_figures),
    Benchmark("P6", "bench_idle.py", 90, _own_figures),
    Benchmark("P7", "bench_memory.py", 150, _own_figures),
    Benchmark("P8", "bench_startup.py", 90, _own_figures),
    Benchmark("P9", "bench_retention.py", 200, _own_figures),
    Benchmark("P10", "bench_merge.py", 150, _own_figures),
    Benchmark("P11", "bench_online_build.py", 150, _own_figures),
    Benchmark("P12", "bench_sampling.py", 150, _own_figures),
    Benchmark("P13", "bench_realtime.py", 240, _own_figures),
)


# ------------------------------------------------------------------ running


def machine() -> dict:
    """What the figures were measured on."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count() or 0
    python = platform.python_version()
    return {
        "cpu": model,
        "cores": cores,
        "python": python,
        "system": f"{platform.system()} {platform.release()}",
        "user_is_root": os.geteuid() == 0,
        "summary": f"{cores} x {model}, Python {python}",
    }


def failed_figure(bench: Benchmark, why: str) -> Figure:
    return Figure(id=bench.key, what=f"{bench.script} did not report", value=math.nan, unit="",
                  baseline=None, baseline_what="", target=math.nan, conditions_met=False,
                  note=why)


def run_one(bench: Benchmark, limit_s: float) -> tuple[list[Figure], dict]:
    """Run one benchmark script; its figures (or one FAIL row) and what to keep of it."""
    json_path = RESULTS_DIR / f"{bench.key}.json"
    log_path = RESULTS_DIR / f"{bench.key}.log"
    json_path.unlink(missing_ok=True)
    started = time.monotonic()
    command = [sys.executable, str(BENCHMARKS_DIR / bench.script), "--json", str(json_path),
               *bench.args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(limit_s)
            why = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(10)
            why = f"stopped at its {limit_s:.0f} s limit"
    elapsed = time.monotonic() - started
    record = {"script": bench.script, "exit_code": code, "elapsed_s": round(elapsed, 1),
              "log": str(log_path.relative_to(REPO))}
    if json_path.exists():
        document = json.loads(json_path.read_text())
        record["document"] = document
        try:
            return bench.figures(document), record
        except (KeyError, TypeError, ValueError) as error:
            why = f"unreadable JSON ({error!r})"
    why = why or f"exit code {code}, no JSON; see {record['log']}"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return [failed_figure(bench, why + (": " + " | ".join(tail) if tail else ""))], record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated ids to run (e.g. P3,P5)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for everything (default 810)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a target is missed, not only when a benchmark breaks")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS
              if not args.only or b.key in {key.strip() for key in args.only.split(",")}]
    RESULTS_DIR.mkdir(exist_ok=True)
    started = time.monotonic()
    about = machine()
    load_before = os.getloadavg()
    print(f"bench: {len(chosen)} benchmarks on {about['summary']}; load average "
          f"{load_before[0]:.2f}; budget {args.budget:.0f} s", flush=True)
    figures: list[Figure] = []
    records: dict[str, dict] = {}
    for bench in chosen:
        remaining = args.budget - (time.monotonic() - started)
        if remaining < MIN_LIMIT_S:
            figures.append(failed_figure(bench, "skipped: the time budget was used up"))
            continue
        if not (BENCHMARKS_DIR / bench.script).exists():
            figures.append(failed_figure(bench, f"benchmarks/{bench.script} does not exist"))
            continue
        limit = min(bench.limit_s, remaining)
        print(f"bench: {bench.key} ({bench.script}, limit {limit:.0f} s) ...", end=" ", flush=True)
        got, records[bench.key] = run_one(bench, limit)
        figures += got
        verdicts = " ".join(f"{f.id} {'PASS' if f.passed else 'FAIL'}" for f in got)
        print(f"{records[bench.key]['elapsed_s']:.0f} s: {verdicts}", flush=True)
    elapsed = time.monotonic() - started
    print()
    print_table(figures)
    passed = sum(f.passed for f in figures)
    print(f"\n{passed} of {len(figures)} figures meet their targets; total {elapsed:.0f} s; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    document = {
        "machine": about,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "elapsed_s": round(elapsed, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "figures": [f.as_dict() for f in figures],
        "benchmarks": records,
    }
    suffix = "" if not args.only else "-partial"  # a partial run never replaces the full one
    results_path = RESULTS_DIR / f"results{suffix}.json"
    results_path.write_text(json.dumps(document, indent=2, default=float))
    (RESULTS_DIR / f"table{suffix}.md").write_text(markdown_table(figures) + "\n")
    sweep = records.get("P3", {}).get("document", {}).get("sweep")
    if sweep and not args.only:
        print(f"plot: {plot_sweep(sweep, RESULTS_DIR / DEFAULT_PNG.name, about['summary'])}")
    print(f"results: {results_path}")
    broken = any(not math.isfinite(f.value) for f in figures)
    return 1 if broken or (args.strict and passed < len(figures)) else 0


if __name__ == "__main__":
    sys.exit(main())

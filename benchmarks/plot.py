"""The README plot: end-to-end throughput versus event size, from the P3 sweep.

Reads the sweep of `bench_end_to_end.py` (in ``bench-results/results.json``
or the benchmark's own JSON) and writes a small PNG: for header-only to
992-sample events, the payload MB/s and events/s delivered into GEB files at
the highest offered load that lost nothing, and the lowest that did.

    .venv/bin/python benchmarks/plot.py [RESULTS_JSON] [--out benchmarks/throughput.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "bench-results" / "results.json"
DEFAULT_PNG = Path(__file__).resolve().parent / "throughput.png"


def sweep_of(document: dict) -> list[dict]:
    """The sweep points of a run_all results file or of bench_end_to_end's JSON."""
    if "sweep" in document:
        return document["sweep"]
    return document.get("benchmarks", {}).get("P3", {}).get("document", {}).get("sweep", [])


def plot_sweep(sweep: list[dict], out: Path, subtitle: str = "",
               target_mb_s: float = 300.0) -> Path:
    """Write the PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = sorted(sweep, key=lambda point: point["event_bytes"])
    sizes = [point["event_bytes"] for point in points]
    mb_s = [point["received_mb_s"] for point in points]
    mevents = [point["received_mb_s"] * 1e6 / point["event_bytes"] / 1e6 for point in points]
    figure, left = pyplot.subplots(figsize=(6.4, 4.4), dpi=100)
    left.plot(sizes, mb_s, "o-", color="tab:blue", label="delivered without loss (MB/s)")
    lossy = [(point["event_bytes"], point["lowest_lossy_offered_mb_s"]) for point in points
             if point.get("lowest_lossy_offered_mb_s")]
    if lossy:
        left.plot(*zip(*lossy), "v", color="tab:red", markerfacecolor="none",
                  label="lowest offered load that lost data")
    left.axhline(target_mb_s, color="tab:blue", linestyle=":", linewidth=1,
                 label=f"P3 target {target_mb_s:g} MB/s (200 samples)")
    left.set_xscale("log")
    left.set_xticks(sizes)
    left.set_xticklabels([f"{point['samples']}\n{point['event_bytes']} B" for point in points],
                         fontsize=8)
    left.set_xlabel("trace samples per event / event size")
    left.set_ylabel("MB/s", color="tab:blue")
    left.set_ylim(bottom=0, top=max([*mb_s, *(y for _, y in lossy), target_mb_s]) * 1.3)
    right = left.twinx()
    right.plot(sizes, mevents, "s--", color="tab:orange", label="events/s (millions)")
    right.set_ylabel("million events/s", color="tab:orange")
    right.set_ylim(bottom=0, top=max([*mevents, 0.1]) * 1.3)
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    figure.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower center", ncol=2,
                  frameon=False)
    title = "End to end: sim crate (4 digitizers) -> IOC -> dgs-receiver"
    left.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    pyplot.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_PNG)
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    sweep = sweep_of(document)
    if not sweep:
        print(f"no sweep in {args.results}", file=sys.stderr)
        return 1
    machine = document.get("machine", {})
    subtitle = machine.get("summary", "")
    print(plot_sweep(sweep, args.out, subtitle))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""P9: retention with no receiver: MiB of event data kept before the first discard.

The demo crate (four digitizers, 200-sample events) runs with Save and nobody
taking data, at the demo rate (500 events/s per channel, 9 MB/s, the physical
1 MiB FIFOs) and at the P3 rate (330 MB/s, 16 MiB FIFOs as P3 has them). The
figure is the undelivered data the crate holds (`DAQC01_CV_Retained`) once it
has begun to discard (`OL_LostMemory` > 0), median of the repetitions; a run
counts only if no FIFO overflowed before that (`SIM_Dropped`, `SIM_Cleared`).
The baseline, read from the same IOC: the whole pool (`CV_BuffersTotal` x 1 MiB).
Each repetition ends the run; the next Start drops what was kept.

    .venv/bin/python benchmarks/bench_retention.py [--json FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchIoc, Figure, crate_config, demo_boards, finish, median, wait_until

TARGET_MIB = 180.0
SAMPLES = 200
EVENT_BYTES = 4 * (14 + SAMPLES // 2)
#: (label, per-channel rate, FIFO words per board)
CASES = (
    ("demo rate", 500.0, 1 << 18),
    ("P3 rate", 330e6 / (4 * 10 * EVENT_BYTES), 1 << 22),
)
POLL_S = 0.1


def one_repetition(ioc: BenchIoc, limit_s: float) -> tuple[float, int, float]:
    """Start, wait for the first discard; returns (MiB kept, overflows before, seconds)."""
    boards = list(demo_boards())
    overflow_names = [f"VME01:{n}:SIM_{k}" for n in boards for k in ("Dropped", "Cleared")]
    ioc.pva_put("Online_CS_SaveData", 1)
    ioc.pva_put("Online_CS_StartStop", 1)
    started = time.monotonic()
    wait_until(lambda: ioc.values("DAQC01_CV_State")[0] == 1, 15, "Running", period=0.02)
    # The counters are published twice a second, all at once: until this run's first
    # publication they still show the last run's discards and the overflows of its Stop.
    # Every repetition ends after a discard, so a count of 0 is this run's.
    wait_until(lambda: ioc.values("DAQC01_OL_TotalBufsLost")[0] == 0, 10,
               "this run's first publication", period=0.02)

    def first_discard() -> tuple[float, float] | None:
        retained, *lost = ioc.values("DAQC01_CV_Retained", "DAQC01_OL_TotalBufsLost")
        overflow = sum(ioc.values(*overflow_names))
        return (retained, overflow) if lost[0] > 0 else None

    kept, overflows = wait_until(first_discard, limit_s, "the first discard", period=POLL_S)
    seconds = time.monotonic() - started
    ioc.pva_put("Online_CS_StartStop", 0)
    wait_until(lambda: ioc.values("DAQC01_CV_State")[0] == 0, 30, "Stopped", period=0.05)
    return kept, int(overflows), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median; >= 5)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    repeat = max(5, args.repeat)
    workdir = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    figures, details = [], {}
    try:
        for index, (label, rate_hz, fifo_words) in enumerate(CASES):
            config = crate_config(workdir / f"p9-{index}.toml", fifo_words=fifo_words,
                                  event_rate_hz=rate_hz, trace_samples=SAMPLES)
            offered_mb_s = rate_hz * 4 * 10 * EVENT_BYTES / 1e6
            limit_s = 1.5 * 200 * (1 << 20) / (offered_mb_s * 1e6) + 10
            with BenchIoc(["--config", str(config)], workdir) as ioc:
                runs = [one_repetition(ioc, limit_s) for _ in range(repeat)]
                pool_mib = ioc.values("DAQC01_CV_BuffersTotal")[0]
            kept = [run[0] for run in runs]
            overflows = sum(run[1] for run in runs)
            details[label] = {"kept_mib": kept, "overflows": [r[1] for r in runs],
                              "seconds": [r[2] for r in runs], "offered_mb_s": offered_mb_s}
            figures.append(Figure(
                id="P9" + "ab"[index], what=f"retention, no receiver, {label}",
                value=median(kept), unit="MiB", baseline=pool_mib,
                baseline_what="the whole pool", target=TARGET_MIB, runs=kept,
                conditions_met=overflows == 0,
                note=(f"{offered_mb_s:.0f} MB/s offered, first discard after "
                      f"{median([r[2] for r in runs]):.1f} s; FIFO overflows before it: "
                      f"{overflows}"),
            ))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return finish(args.json, "P9", figures, started, cases=details)


if __name__ == "__main__":
    sys.exit(main())

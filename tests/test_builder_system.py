"""The three-crate system (`dgs-system`, one receiver per crate) merged by `dgs-merge`.

A short run of three crates whose clocks started at different moments; the
three run directories merge into one file holding every record once, ordered
across crates, and events whose hits carry their crate.
"""

from __future__ import annotations

import json
import subprocess
import time

import h5py
import numpy as np
from geb_files import reference_merge
from ioc_harness import BIN, wait_until
from test_system import CRATES, Group

from builder.cli import data_files
from receiver.geb import read_records

RUN_SECONDS = 4.0


def test_three_crates_merge_across_crates(tmp_path):
    group = Group(tmp_path, CRATES)
    try:
        group.wait_ready()
        before = int(group.caget("Online_CS_RunNumber"))
        start = group.dgs_run("start")
        assert start.returncode == 0, start.stdout + start.stderr
        started = time.monotonic()
        for crate in CRATES:
            wait_until(lambda crate=crate: group.caget(f"DAQC{crate}_CV_SenderBytes") > 0,
                       20, f"crate {crate} sending", 0.5)
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))  # the run's length
        stop = group.dgs_run("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        assert group.terminate() == 0, group.printed()
    name = f"run{before + 1:05d}"
    run_dirs = [group.run_dir / f"crate{crate}" / name for crate in CRATES]
    merged, events = tmp_path / "merged.gtd", tmp_path / "events.h5"
    done = subprocess.run([str(BIN / "dgs-merge"), *map(str, run_dirs), "-o", str(merged),
                           "--events", str(events)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "count check passed" in done.stdout

    content = merged.read_bytes()
    assert content == reference_merge([p for d in run_dirs for p in data_files(d)])
    stamps = read_records(content)["timestamp"]
    assert (stamps[1:] >= stamps[:-1]).all()
    with h5py.File(events) as h5:
        crate = h5["hits"]["crate"]
        metadata = json.loads(h5.attrs["metadata"])
    assert set(crate.tolist()) == {int(c) for c in CRATES}
    switches = int(np.count_nonzero(crate[1:] != crate[:-1]))
    assert switches > 100, f"the crates' hits interleave in time ({switches} switches)"
    assert [c["crate"] for c in metadata["pvs_begin"]["crates"]] == list(CRATES)

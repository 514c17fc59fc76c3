"""Online building with real IOCs: one `dgs-receiver` pulling a three-crate system writes
the merged file and the coincidence events (issue 16, items 2 and 3).

`dgs-system` runs the globals IOC and three crate IOCs (test_system's Group);
`dgs-run --no-receivers` starts and stops the run, and a single receiver
process pulls all three crates with ``--layout merged --events``. It also keeps
every reply as received (``--save-raw``), from which spec 04's per-board
records are rebuilt in plain Python (test_receiver_files): the merged file must
hold exactly those records, each once, in timestamp order, interleaving the
crates; the events file must equal the offline grouping of the merged file
(the builder API) and carry both PV snapshots. With the demo crate and a tiny
``--merge-wait``, late records are written after and counted exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from collections import Counter

import h5py
import numpy as np
from ioc_harness import wait_until
from test_receiver_files import (
    ReceiverThread,
    reference_records,
    run_files,
    saved_replies,
    start_run,
    stop_run,
)
from test_system import CRATES, Group

from builder.events import DEFAULT_WINDOW_TICKS, EventBuilder
from builder.hits import hits_from_records
from receiver import geb

RUN_SECONDS = 3.0


def record_bytes(data: bytes, records: np.ndarray) -> list[bytes]:
    return [
        data[int(r["offset"]) : int(r["offset"]) + geb.GEB_HEADER_BYTES + int(r["length"])]
        for r in records
    ]


def test_one_receiver_merges_three_crates_in_order_and_builds_the_same_events_as_offline(
    tmp_path,
):
    group = Group(tmp_path, CRATES)
    config = tomllib.loads(group.toml.read_text())
    ports = {c["crate"]: (c["data_port"], c["pva_port"]) for c in config["crate"]}
    out = tmp_path / "online"
    events_path = out / "online.h5"
    receiver = None
    try:
        group.wait_ready()
        start = group.dgs_run("--no-receivers", "start")
        assert start.returncode == 0, start.stdout + start.stderr
        receiver = subprocess.Popen(
            [
                sys.executable, "-m", "receiver.cli", "--out", str(out), "--run-name", "online",
                "--layout", "merged", "--save-raw", "--events", str(events_path),
                # Each simulated crate's clock counts from its IOC's start, which a loaded
                # host spreads over seconds; records then wait for the latest-starting
                # crate. Late records are the tiny-merge-wait test's subject, not this one's.
                "--merge-wait", "30",
                "--status", "plain", "--connect-timeout", "30",
                *(x for crate in CRATES for x in ("--crate", crate)),
                *(x for crate in CRATES for x in ("--pv-pva", f"127.0.0.1:{ports[crate][1]}")),
                *(f"127.0.0.1:{ports[crate][0]}" for crate in CRATES),
            ],
            env=group.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        started = time.monotonic()
        for crate in CRATES:
            wait_until(lambda crate=crate: group.caget(f"DAQC{crate}_CV_SenderBytes") > 0,
                       20, f"crate {crate} sending", 0.5)
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))  # the run's length
        stop = group.dgs_run("--no-receivers", "stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        printed, _ = receiver.communicate(timeout=60)
        assert receiver.returncode == 0, printed
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.kill()
            receiver.wait()
        group.terminate()

    run_dir = out / "online"
    summary = json.loads((run_dir / "online.summary.json").read_text())
    files = run_files(run_dir, "online")
    assert list(files) == [""], files  # one merged stream
    data = b"".join(path.read_bytes() for path in files[""])
    records = geb.read_records(data)
    stamps = records["timestamp"].astype(np.int64)
    # In order, none late: every board's headers are stamped no older than the data
    # read before them, and an empty (0xE) one only when nothing older can follow it
    # (a latch in the middle of the crate process's build used to make one late).
    newest_before = np.maximum.accumulate(np.concatenate(([-1], stamps[:-1])))
    written_after_a_newer = int(np.count_nonzero(stamps < newest_before))
    assert summary["online"]["late"] == written_after_a_newer == 0, printed

    expected: Counter = Counter()
    for index in range(len(CRATES)):
        replies = saved_replies(run_dir / f"online.replies_{index}")
        for family in reference_records(replies).values():
            expected.update(family)
    merged = Counter(record_bytes(data, records))
    assert merged == expected  # every per-board record, each exactly once
    assert summary["online"]["records"] == len(records)

    hits, _ = hits_from_records(data, records, crate_of_board={
        board: int(crate) for crate in CRATES for board in (int(crate) * 100 + 1,
                                                            int(crate) * 100 + 2)
    })
    crate_changes = int(np.count_nonzero(np.diff(hits["crate"].astype(np.int64))))
    assert crate_changes > 10, "the crates' records are not interleaved"
    for board in (101, 102, 201, 202, 301, 302):
        assert (hits["board"] == board).any(), board

    builder = EventBuilder(DEFAULT_WINDOW_TICKS)
    first, rest = builder.feed(hits), builder.flush()
    offline_hits = np.concatenate([first.hits, rest.hits])
    offline_mult = np.concatenate([first.multiplicity, rest.multiplicity])
    with h5py.File(events_path) as h5:
        online_hits = h5["hits"][:]
        online_events = h5["events"][:]
        metadata = json.loads(h5.attrs["metadata"])
    assert online_events["mult"].tolist() == offline_mult.tolist()
    for field in offline_hits.dtype.names:
        assert online_hits[field].tolist() == offline_hits[field].tolist(), field
    assert len(online_events) == summary["online"]["events"]["events"] > 0
    assert [s["crate"] for s in metadata["pvs_begin"]] == list(CRATES)
    assert [s["crate"] for s in metadata["pvs_end"]] == list(CRATES)
    assert metadata["run"] == "online"


def test_a_tiny_merge_wait_on_a_real_crate_writes_late_records_after_and_counts_each(
    demo_ioc, tmp_path,
):
    """The demo crate's four boards come in turn, one reply each: with 1 ms of patience
    records are released before other boards' older ones arrive. Every record is still
    written once (the merged stream rotated every 5,000 records), and the count of late
    records is exactly the number written after a newer one."""
    ioc = demo_ioc
    ioc.put_ok("Online_CS_RunNumber", 7)
    receiver = ReceiverThread([
        "--out", str(tmp_path), "--run", "7", "--layout", "merged", "--merge-wait", "0.001",
        "--chunk-events", "5000", "--save-raw", "--status", "plain",
        "--pv-pva", f"127.0.0.1:{ioc.ports.pva}", "--crate", "01",
        f"127.0.0.1:{ioc.ports.data}",
    ])  # fmt: skip
    start_run(ioc)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 40, timeout=30)
    stop_run(ioc)
    assert receiver.join() == 0, receiver.out.getvalue()
    run_dir = tmp_path / "run00007"
    chunks = run_files(run_dir, "run00007")[""]
    assert len(chunks) > 1
    data = b"".join(path.read_bytes() for path in chunks)
    records = geb.read_records(data)
    assert all(geb.read_records(p.read_bytes()).size <= 5000 for p in chunks)
    expected: Counter = Counter()
    for family in reference_records(saved_replies(run_dir / "run00007.replies_0")).values():
        expected.update(family)
    assert Counter(record_bytes(data, records)) == expected

    stamps = records["timestamp"].astype(np.int64)
    newest_before = np.maximum.accumulate(np.concatenate(([-1], stamps[:-1])))
    written_after_a_newer = int(np.count_nonzero(stamps < newest_before))
    summary = json.loads((run_dir / "run00007.summary.json").read_text())["online"]
    assert summary["late"] == written_after_a_newer > 0
    assert summary["released_by_wait"] > 0
    assert f"{summary['late']} late (--merge-wait 0.001 s" in receiver.out.getvalue()

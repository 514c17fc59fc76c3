"""A real run to a spectrum: demo crate IOC, `dgs-receiver`, `dgs-merge --events`, the example plot;
and the files of a replay of the run's recorded replies (classic protocol) merge alike.

The receiver runs as its own process, `dgs-merge` and the example too, as a
physicist would type them; the merged file is checked against an independent
stable sort of the run's files, the events against the ⁶⁰Co lines the
simulator models (sim/spectrum.py: 4 ADC counts per keV).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from geb_files import brute_force_multiplicity, records_of_files, reference_merge
from ioc_harness import BIN, wait_until
from test_receiver_files import ReceiverThread, ScriptedServer, saved_replies

from builder.cli import data_files
from builder.events import DEFAULT_WINDOW_TICKS
from builder.hits import hits_from_records
from receiver.geb import read_records

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "examples" / "co60-calibration.csv"
CO60_KEV = (1173.228, 1332.492)


def record_run(ioc, out: Path, run: int, layout: str, *extra: str) -> Path:
    """One run of the demo crate written by dgs-receiver in ``layout``; its directory."""
    ioc.put_ok("Online_CS_RunNumber", run)
    command = [str(BIN / "dgs-receiver"), "--out", str(out), "--run", str(run), "--layout",
               layout, "--status", "plain", "--pv-pva", f"127.0.0.1:{ioc.ports.pva}",
               "--crate", "01", *extra, f"127.0.0.1:{ioc.ports.data}"]
    log = open(out / f"receiver-{run}.log", "w")  # noqa: SIM115 - closed below
    receiver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        run_dir = out / f"run{run:05d}"
        wait_until(lambda: (run_dir / f"run{run:05d}.pvs_begin.json").exists(), 30,
                   "the begin snapshot")
        ioc.put_ok("Online_CS_SaveData", "Save")
        ioc.put_ok("Online_CS_StartStop", "Start")
        ioc.wait_value("DAQC01_CV_State", "Running")
        ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 40, timeout=30)
        ioc.put_ok("Online_CS_StartStop", "Stop")
        ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=20)
        assert receiver.wait(60) == 0, (out / f"receiver-{run}.log").read_text()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
        log.close()
    return run_dir


def dgs_merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dgs-merge"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("layout", ["classic", "single"])
def test_a_run_becomes_one_ordered_file_and_a_co60_spectrum(demo_ioc, tmp_path, layout):
    run_dir = record_run(demo_ioc, tmp_path, 16, layout)
    merged, events = tmp_path / "run00016.gtd", tmp_path / "run00016.h5"
    done = dgs_merge(run_dir, "-o", merged, "--events", events, "--calibration", CALIBRATION)
    assert done.returncode == 0, done.stdout + done.stderr
    inputs = data_files(run_dir)
    expected = reference_merge(inputs)
    assert merged.read_bytes() == expected
    assert "count check passed" in done.stdout
    if layout == "single":
        assert "(1 out of time order" in done.stdout, "arrival order is out of time order"

    summary = json.loads((run_dir / "run00016.summary.json").read_text())
    digitizer_events = sum(row["events"] for row in summary["iocs"][0]["channels"]
                           if row["channel"] not in "DEF")
    with h5py.File(events) as h5:
        hits = h5["hits"][:]
        metadata = json.loads(h5.attrs["metadata"])
        multiplicity = h5["events"]["mult"]
    assert hits.size == digitizer_events > 1000
    assert set(hits["board"].tolist()) == {101, 102, 103, 104}
    assert (hits["crate"] == 1).all(), "the crate comes from the begin snapshot"
    merged_hits, _ = hits_from_records(expected, read_records(expected))
    stamps = merged_hits["timestamp"].tolist()
    assert multiplicity.tolist() == brute_force_multiplicity(stamps, DEFAULT_WINDOW_TICKS)
    assert hits["timestamp"].tolist() == stamps
    assert metadata["pvs_begin"]["crates"][0]["pvs"]["VME01:MDIG1:user_package_data"] == 101
    assert metadata["pvs_end"]["when"] == "end"
    counts, edges = np.histogram(hits["energy_kev"], bins=np.arange(1000, 1500, 2.0))
    peaks = sorted(edges[np.argsort(counts)[-2:]] + 1.0)
    assert np.allclose(peaks, CO60_KEV, atol=3.0), f"the two strongest bins at {peaks}"

    picture = tmp_path / "spectrum.png"
    shown = subprocess.run([sys.executable, str(REPO / "examples" / "spectrum.py"), str(events),
                            "-o", str(picture)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_of_a_replay_of_recorded_classic_replies_merge_like_the_original(demo_ioc,
                                                                                tmp_path):
    run_dir = record_run(demo_ioc, tmp_path, 17, "classic", "--save-raw")
    server = ScriptedServer(saved_replies(run_dir / "run00017.replies_0"))
    try:
        replay = ReceiverThread(["--protocol", "classic", "--out", str(tmp_path / "replay"),
                                 "--run-name", "run00017", "--layout", "board", "--status",
                                 "plain", f"127.0.0.1:{server.port}"])
        assert replay.join(60) == 0, replay.out.getvalue()
    finally:
        server.close()
    replay_dir = tmp_path / "replay" / "run00017"
    for directory, output in ((run_dir, "original.gtd"), (replay_dir, "replay.gtd")):
        done = dgs_merge(directory, "-o", tmp_path / output)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / output).read_bytes() == reference_merge(data_files(directory))
    original = records_of_files([tmp_path / "original.gtd"])
    replayed = records_of_files([tmp_path / "replay.gtd"])
    assert [ts for ts, _ in replayed] == [ts for ts, _ in original]
    assert sorted(replayed) == sorted(original), "the same records, whichever receiver wrote them"

"""`dgs-merge` on hand-made run directories: every record once, in order, in bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import uproot
from geb_files import (
    Hit,
    brute_force_multiplicity,
    event_record,
    many_records,
    random_hits,
    records_of_files,
    reference_merge,
    status_record,
    trigger_record,
    write_file,
)

from builder import merge
from builder.cli import data_files, main
from builder.gebscan import RecordReader, file_timestamps
from builder.hits import RECORD_STATUS, hits_from_records, record_kinds
from receiver.geb import read_records


def crate_run(directory: Path, run: str, hits: list[Hit], boards: tuple[int, ...],
              layout: str, rng: np.random.Generator, trigger: int | None = None) -> Path:
    """A run directory like dgs-receiver writes: per-board files, or one file in arrival order."""
    records = [(h.timestamp, h.board, event_record(h)) for h in hits]
    for board in boards:
        end = hits[-1].timestamp + 10
        records.append((end, board, status_record(board, 0xD, end)))
        records.append((hits[0].timestamp, board, status_record(board, 0xE, hits[0].timestamp)))
    if trigger is not None:
        records += [(h.timestamp, trigger, trigger_record(trigger, h.timestamp)) for h in hits[::7]]
    records.sort(key=lambda r: r[0])
    run_dir = directory / run
    if layout == "board":
        for board in {b for _, b, _ in records}:
            kind = "trig_" if board == trigger else ""
            write_file(run_dir / f"{run}.gtd_000_{kind}{board:04d}",
                       [r for _, b, r in records if b == board])
    else:  # arrival order: out of order by up to 2 ms, like replies of several boards
        late = np.array([ts for ts, _, _ in records]) + rng.integers(0, 200_000, len(records))
        write_file(run_dir / f"{run}.gtd_000", [records[i][2] for i in np.argsort(late)])
    (run_dir / f"{run}.summary.json").write_text("{}")
    return run_dir


@pytest.fixture
def three_crates(tmp_path):
    """Three crates' runs: two per-board layouts (one with a trigger board), one arrival order."""
    rng = np.random.default_rng(16)
    runs = []
    for number, (boards, layout, trigger) in enumerate(
            [((101, 102), "board", 99), ((201, 202, 203), "single", None),
             ((301,), "board", None)]):
        hits = random_hits(rng, 6000, boards, 50_000_000, samples=int(rng.integers(0, 3)) * 2)
        runs.append(crate_run(tmp_path, f"run0000{number}", hits, boards, layout, rng, trigger))
    return runs


def run_merge(*argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out, err=out)
    return code, out.getvalue()


def test_three_crates_merge_into_every_record_once_in_time_order(three_crates, tmp_path):
    output = tmp_path / "merged.gtd"
    code, printed = run_merge(*three_crates, "-o", output, "--memory", "1")
    assert code == 0, printed
    inputs = [p for run in three_crates for p in data_files(run)]
    merged = output.read_bytes()
    assert merged == reference_merge(inputs)
    stamps = read_records(merged)["timestamp"]
    assert (stamps[1:] >= stamps[:-1]).all()
    total = len(records_of_files(inputs))
    assert f"{total} records in {len(inputs)} files (1 out of time order" in printed
    assert f"{total} records written" in printed and "count check passed" in printed
    assert not list(tmp_path.glob("dgs-merge-*")), "temporary runs are removed"


def test_status_records_can_be_dropped(three_crates, tmp_path):
    output = tmp_path / "merged.gtd"
    code, printed = run_merge(*three_crates, "-o", output, "--status", "drop")
    assert code == 0, printed
    inputs = [p for run in three_crates for p in data_files(run)]
    merged = output.read_bytes()
    assert merged == reference_merge(inputs, drop_status=True)
    assert (record_kinds(merged, read_records(merged)) != RECORD_STATUS).all()
    assert "12 status records dropped" in printed


def test_any_disorder_and_more_runs_than_the_fan_in(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    hits = random_hits(rng, 20000, (7, 8), 1_000_000, samples=0)
    shuffled = [event_record(hits[i]) for i in rng.permutation(len(hits))]
    reversed_file = write_file(tmp_path / "r" / "r.gtd_000", shuffled[::-1])
    shuffled_file = write_file(tmp_path / "s" / "s.gtd_000", shuffled)
    monkeypatch.setattr(merge, "MAX_FAN_IN", 3)
    chunks: list[bytes] = []
    stats = merge.merge_files([reversed_file, shuffled_file],
                              lambda data, bounds, stamps: chunks.append(data.tobytes()),
                              memory_bytes=256 * 1024)
    assert stats.runs > 3 and stats.unsorted_files == 2
    assert b"".join(chunks) == reference_merge([reversed_file, shuffled_file])
    assert stats.records_out == stats.records_in == 40000


def test_memory_stays_bounded_for_an_input_many_times_the_memory_setting(tmp_path):
    rng = np.random.default_rng(9)
    files = []
    for board in range(4):
        stamps = np.sort(rng.integers(0, 10**9, 25000))
        late = np.argsort(stamps + rng.integers(0, 10**7, stamps.size), kind="stable")
        path = tmp_path / f"b{board}" / "x.gtd_000"
        path.parent.mkdir()
        path.write_bytes(many_records(stamps[late], board, samples=40))
        files.append(path)
    size = sum(p.stat().st_size for p in files)
    budget = 1 << 20
    assert size > 10 * budget
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        stats = merge.merge_files(files, lambda data, bounds, stamps: digest.update(data),
                                  memory_bytes=budget, temp_dir=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.bytes_out == size and stats.records_out == 100000
    assert digest.digest() == hashlib.sha256(reference_merge(files)).digest()
    assert peak < 6 * budget, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.0f} MiB of input"


def snapshot(run_dir: Path, when: str, boards: dict[str, list[int]]) -> None:
    crates = [{"crate": crate, "pvs": {f"VME{crate}:MDIG{i}:user_package_data": board
                                       for i, board in enumerate(ids)}}
              for crate, ids in boards.items()]
    document = {"run": run_dir.name, "when": when, "crates": crates}
    (run_dir / f"{run_dir.name}.pvs_{when}.json").write_text(json.dumps(document))


@pytest.mark.parametrize("suffix", [".root", ".h5"])
def test_events_equal_a_brute_force_grouping_of_the_merged_hits(three_crates, tmp_path, suffix):
    for number, run_dir in enumerate(three_crates):
        boards = {f"{number + 1:02d}": [[101, 102], [201, 202, 203], [301]][number]}
        snapshot(run_dir, "begin", boards)
        snapshot(run_dir, "end", boards)
    output, events = tmp_path / "m.gtd", tmp_path / f"ev{suffix}"
    code, printed = run_merge(*three_crates, "-o", output, "--events", events, "--window", "500",
                              "--memory", "1", "--traces")
    assert code == 0, printed
    merged = output.read_bytes()
    hits, traces = hits_from_records(merged, read_records(merged), with_traces=True)
    expected = brute_force_multiplicity(hits["timestamp"].tolist(), 500)
    if suffix == ".root":
        with uproot.open(events) as root:
            arrays = root["events"].arrays(["mult", "board", "timestamp", "e", "crate"],
                                           library="np")
            metadata = json.loads(str(root["metadata"]))
            samples = root["events"].arrays(["trace", "trace_samples"], library="np")
        width = int(samples["trace_samples"][0])
        got = np.concatenate(samples["trace"]).reshape(-1, width)
        mult, board = arrays["mult"].tolist(), np.concatenate(arrays["board"])
        crate = np.concatenate(arrays["crate"])
        stamps, energy = np.concatenate(arrays["timestamp"]), np.concatenate(arrays["e"])
    else:
        with h5py.File(events) as h5:
            mult = h5["events"]["mult"].tolist()
            rows = h5["hits"][:]
            metadata = json.loads(h5.attrs["metadata"])
            got = h5["traces"][:]
        board, crate = rows["board"], rows["crate"]
        stamps, energy = rows["timestamp"], rows["energy"]
    assert mult == expected
    assert (got[:, : traces.shape[1]] == traces).all() and (got[:, traces.shape[1] :] == -1).all()
    assert stamps.tolist() == hits["timestamp"].tolist()
    assert energy.tolist() == hits["energy"].tolist()
    assert (crate == board // 100).all(), "crates from the begin snapshots"
    assert [c["crate"] for c in metadata["pvs_begin"]["crates"]] == ["01", "02", "03"]
    assert metadata["pvs_end"]["when"] == "end" and metadata["window_ticks"] == 500
    assert f"{len(expected)} events" in printed


def test_a_truncated_file_fails_and_leaves_no_output(tmp_path):
    path = write_file(tmp_path / "t" / "t.gtd_000", [event_record(Hit(1, 0, 5, 9))])
    path.write_bytes(path.read_bytes()[:-3])
    code, printed = run_merge(tmp_path / "t", "-o", tmp_path / "m.gtd", "--events",
                              tmp_path / "e.root")
    assert code == 1 and "partial record" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"], "no output, no leftovers"


def test_an_existing_output_or_no_input_is_refused(tmp_path):
    write_file(tmp_path / "t" / "t.gtd_000", [event_record(Hit(1, 0, 5, 9))])
    (tmp_path / "m.gtd").write_text("keep")
    code, printed = run_merge(tmp_path / "t", "-o", tmp_path / "m.gtd")
    assert code == 2 and "exists" in printed
    assert (tmp_path / "m.gtd").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    code, printed = run_merge(tmp_path / "empty", "-o", tmp_path / "n.gtd")
    assert code == 2 and "no GEB data files" in printed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_line_is_drawn_on_a_terminal_only(tmp_path, terminal):
    write_file(tmp_path / "t" / "t.gtd_000", [event_record(Hit(1, 0, 5, 9))])
    err = Terminal() if terminal else io.StringIO()
    assert main([str(tmp_path / "t"), "-o", str(tmp_path / "m.gtd")], out=io.StringIO(),
                 err=err) == 0
    assert ("\rdgs-merge: scan" in err.getvalue()) is terminal


def test_records_longer_than_a_block_are_read_whole(tmp_path):
    sizes = [10_000, 12, 40, 70_000, 12, 5_000]
    records = [struct.pack("<iiQ", 14, size, stamp) + bytes([stamp]) * size
               for stamp, size in enumerate(sizes)]
    path = write_file(tmp_path / "big" / "b.gtd_000", records)
    stamps = [int(s) for chunk, _ in file_timestamps(path, 4096) for s in chunk]
    assert stamps == list(range(len(sizes)))
    reader, seen = RecordReader(path, 4096), []
    while not reader.done or reader.remaining:
        reader.refill()
        for index in range(reader.next, reader.timestamps.size):
            start, end = int(reader.bounds[index]), int(reader.bounds[index + 1])
            seen.append(reader.buffer[start:end].tobytes())
        reader.next = reader.timestamps.size
    assert seen == records

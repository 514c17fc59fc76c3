"""Hits, coincidence events and event files (builder/): against hand-made records."""

from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import uproot
from geb_files import Hit, event_record, random_hits, status_record, trigger_record
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.calibration import Calibration
from builder.eventfile import open_event_writer
from builder.events import DEFAULT_WINDOW_TICKS, EventBuilder, Events
from builder.hits import HIT_DTYPE, hits_from_records, records_from_bounds
from receiver.geb import read_records


def decode(records: list[bytes], **kwargs):
    data = b"".join(records)
    return hits_from_records(data, read_records(data), **kwargs)


def brute_force_events(stamps: list[int], window: int) -> list[list[int]]:
    """Indices per event, by the documented rule, one hit at a time."""
    events: list[list[int]] = []
    for index, stamp in enumerate(stamps):
        if events and stamp <= stamps[events[-1][0]] + window:
            events[-1].append(index)
        else:
            events.append([index])
    return events


def as_lists(events: Events) -> list[list[int]]:
    return [events.hits["timestamp"][a:b].tolist()
            for a, b in itertools.pairwise(events.offsets)]


def test_hits_carry_every_field_of_the_digitizer_records_only():
    hits_in = [Hit(101, 3, 0x1_2345_6789, 1173 * 4, 7, 1 << 15, (5, 6, 7, 8)),
               Hit(4094, 9, 0xFFFF_FFFF_FFFF, 0, 8, 1 << 11 | 1 << 6)]
    records = [event_record(hits_in[0]), status_record(101, 0xE, 5), trigger_record(99, 6),
               event_record(hits_in[1])]
    hits, traces = decode(records, crate_of_board={4094: 2}, with_traces=True)
    assert hits.dtype == HIT_DTYPE
    assert hits["board"].tolist() == [101, 4094]
    assert hits["channel"].tolist() == [3, 9]
    assert hits["timestamp"].tolist() == [0x1_2345_6789, 0xFFFF_FFFF_FFFF]
    assert hits["energy"].tolist() == [1173 * 4, 0]
    assert hits["header_type"].tolist() == [7, 8]
    assert hits["flags"].tolist() == [1 << 15, 1 << 11 | 1 << 6]
    assert hits["crate"].tolist() == [0, 2]
    assert traces.tolist() == [[5, 6, 7, 8], [-1, -1, -1, -1]]


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_records_at_any_byte_offset_give_the_same_hits(shift):
    """Whole-word records are read a word at a time; others (a file cut at an odd
    byte, a buffer with a prefix) must give the same hits, read byte by byte."""
    hits_in = [Hit(101, 3, 0x1_2345_6789, 1173 * 4, 7, 1 << 15, (5, 6, 7, 8)),
               Hit(4094, 9, 0xFFFF_FFFF_FFFF, 333, 8, 1 << 11 | 1 << 6)]
    records = [event_record(hits_in[0]), status_record(101, 0xE, 5), event_record(hits_in[1])]
    data = b"".join(records)
    index = read_records(data)
    aligned = hits_from_records(data, index, with_traces=True)
    moved = index.copy()
    moved["offset"] += shift
    shifted = hits_from_records(b"\xff" * shift + data, moved, with_traces=True)
    assert shifted[0].tolist() == aligned[0].tolist()
    assert shifted[1].tolist() == aligned[1].tolist()
    assert aligned[0]["energy"].tolist() == [1173 * 4, 333]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=80), st.integers(0, 60),
       st.lists(st.integers(0, 80), max_size=4))
def test_events_equal_a_brute_force_grouping_however_the_hits_are_fed(stamps, window, cuts):
    stamps = sorted(stamps)
    hits = np.zeros(len(stamps), dtype=HIT_DTYPE)
    hits["timestamp"] = stamps
    builder = EventBuilder(window)
    got: list[list[int]] = []
    edges = [0, *sorted(min(c, len(stamps)) for c in cuts), len(stamps)]
    for first, stop in itertools.pairwise(edges):
        got += as_lists(builder.feed(hits[first:stop]))
    got += as_lists(builder.flush())
    assert got == [[stamps[i] for i in event] for event in brute_force_events(stamps, window)]


def test_out_of_order_hits_are_refused():
    builder = EventBuilder()
    hits = np.zeros(2, dtype=HIT_DTYPE)
    hits["timestamp"] = [10, 5]
    with pytest.raises(ValueError, match="non-decreasing"):
        builder.feed(hits)


def build(hits: np.ndarray, traces=None, window: int = DEFAULT_WINDOW_TICKS) -> Events:
    builder = EventBuilder(window)
    first = builder.feed(hits, traces)
    rest = builder.flush()
    joined_traces = None
    if traces is not None:
        joined_traces = np.concatenate([first.traces, rest.traces])
    return Events(np.concatenate([first.hits, rest.hits]),
                  np.concatenate([first.offsets, rest.offsets[1:] + first.offsets[-1]]),
                  joined_traces)


@pytest.fixture
def sample_events():
    rng = np.random.default_rng(7)
    records = [event_record(h) for h in random_hits(rng, 3000, (101, 102, 203), 400_000, 8)]
    hits, traces = decode(records, with_traces=True)
    return build(hits, traces)


def test_root_file_entries_equal_the_events_and_carry_the_metadata(tmp_path, sample_events):
    calibration = tmp_path / "cal.csv"
    calibration.write_text("board,channel,gain,offset\n*,*,0.25,0\n101,3,0.5,1\n")
    writer = open_event_writer(tmp_path / "run.root", {"run": 7, "pvs_begin": {"a": 1}},
                               calibration=calibration, with_traces=True)
    half = len(sample_events) // 2
    for part in (slice(0, half), slice(half, len(sample_events))):
        lo, hi = sample_events.offsets[part.start], sample_events.offsets[part.stop]
        writer.write(Events(sample_events.hits[lo:hi],
                            sample_events.offsets[part.start : part.stop + 1] - lo,
                            sample_events.traces[lo:hi]))
    writer.set_end_metadata({"pvs_end": {"b": 2}})
    assert writer.close() == [tmp_path / "run.root"]
    with uproot.open(tmp_path / "run.root") as root:
        tree = root["events"]
        arrays = tree.arrays(library="np")
        assert tree.num_entries == len(sample_events)
        assert arrays["mult"].tolist() == sample_events.multiplicity.tolist()
        flat = {name: np.concatenate(arrays[name]) for name in
                ("board", "channel", "timestamp", "e", "header_type", "flags", "crate", "ekev")}
        hits = sample_events.hits
        for name, field in (("board", "board"), ("channel", "channel"),
                            ("timestamp", "timestamp"), ("e", "energy"),
                            ("header_type", "header_type"), ("flags", "flags")):
            assert flat[name].tolist() == hits[field].tolist()
        special = (hits["board"] == 101) & (hits["channel"] == 3)
        assert np.allclose(flat["ekev"], np.where(special, 0.5 * hits["energy"] + 1,
                                                  0.25 * hits["energy"]))
        traces = np.concatenate(arrays["trace"]).reshape(-1, 8)
        assert (traces == sample_events.traces).all()
        metadata = json.loads(str(root["metadata"]))
    assert metadata["pvs_begin"] == {"a": 1} and metadata["pvs_end"] == {"b": 2}
    assert metadata["events"] == len(sample_events)


def test_hdf5_file_rows_equal_the_events_in_rotated_chunks(tmp_path, sample_events):
    writer = open_event_writer(tmp_path / "run.h5", {"run": 7}, chunk_events=400)
    writer.write(sample_events)
    writer.set_end_metadata({"pvs_end": {"b": 2}})
    files = writer.close()
    expected = -(-len(sample_events) // 400)
    assert [f.name for f in files] == [f"run_{i:03d}.h5" for i in range(expected)]
    hits, events = [], []
    for path in files:
        with h5py.File(path) as h5:
            assert h5.attrs["run"] == 7
            assert json.loads(h5.attrs["metadata"])["chunk"] == files.index(path)
            table = h5["events"][:]
            rows = h5["hits"][:]
            assert (np.repeat(np.arange(table.size), table["mult"]) == rows["event"]).all()
            assert (rows["timestamp"][table["first"]] == table["timestamp"]).all()
            hits.append(rows)
            events.append(table["mult"])
            last_attrs = dict(h5.attrs)
    assert json.loads(last_attrs["pvs_end"]) == {"b": 2}
    hits_all = np.concatenate(hits)
    for field in HIT_DTYPE.names:
        assert hits_all[field].tolist() == sample_events.hits[field].tolist()
    assert np.concatenate(events).tolist() == sample_events.multiplicity.tolist()


def test_pandas_reads_the_hits_and_events_tables_with_read_hdf(tmp_path, sample_events):
    calibration = tmp_path / "cal.csv"
    calibration.write_text("board,channel,gain,offset\n*,*,0.25,0\n")
    writer = open_event_writer(tmp_path / "run.h5", {"run": 7}, calibration=calibration,
                               with_traces=True)
    writer.write(sample_events)
    writer.close()
    hits = pd.read_hdf(tmp_path / "run.h5", "hits")
    events = pd.read_hdf(tmp_path / "run.h5", "events")
    assert list(hits.columns) == [*HIT_DTYPE.names, "event", "energy_kev"]
    for field in HIT_DTYPE.names:
        assert hits[field].tolist() == sample_events.hits[field].tolist()
    assert np.allclose(hits["energy_kev"], 0.25 * sample_events.hits["energy"])
    assert events["mult"].tolist() == sample_events.multiplicity.tolist()
    assert hits.groupby("event").size().tolist() == events["mult"].tolist()


def test_chunk_seconds_cut_in_data_time(tmp_path):
    hits = np.zeros(6, dtype=HIT_DTYPE)
    hits["timestamp"] = [0, 50_000_000, 99_999_000, 100_000_000, 250_000_000, 260_000_000]
    writer = open_event_writer(tmp_path / "e.h5", {}, chunk_seconds=1.0)
    writer.write(build(hits, window=10))
    files = writer.close()
    counts = [h5py.File(f)["events"].shape[0] for f in files]
    assert counts == [3, 1, 2]


def test_an_existing_event_file_is_never_replaced(tmp_path):
    (tmp_path / "e.root").write_text("keep")
    with pytest.raises(FileExistsError):
        open_event_writer(tmp_path / "e.root", {})
    assert (tmp_path / "e.root").read_text() == "keep"


def test_calibration_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "cal.csv"
    bad.write_text("board,channel,gain,offset\n101,x,1,0\n")
    with pytest.raises(ValueError, match="line 2"):
        Calibration.from_csv(bad)


def test_hits_of_a_receiver_batch_through_its_bounds():
    records = [event_record(Hit(7, 1, 100, 50)), status_record(7, 0xE, 120),
               event_record(Hit(7, 2, 130, 60, samples=(1, 2)))]
    data = np.frombuffer(b"".join(records), dtype=np.uint8)
    bounds = np.cumsum([0, *(len(r) for r in records)])
    hits, _ = hits_from_records(data, records_from_bounds(bounds, np.array([100, 120, 130])))
    assert hits["timestamp"].tolist() == [100, 130]
    assert hits["energy"].tolist() == [50, 60]


@pytest.mark.parametrize("suffix", [".root", ".h5"])
def test_a_run_without_events_still_gets_a_readable_file_with_every_column(tmp_path, suffix):
    writer = open_event_writer(tmp_path / f"e{suffix}", {"run": 1}, with_traces=True)
    writer.write(Events.empty())
    assert writer.close() == [tmp_path / f"e{suffix}"]
    if suffix == ".root":
        with uproot.open(tmp_path / "e.root") as root:
            assert root["events"].num_entries == 0
            assert {"mult", "e", "board", "timestamp", "trace"} <= set(root["events"].keys())
    else:
        with h5py.File(tmp_path / "e.h5") as h5:
            assert h5["hits"].shape == (0,) and h5["events"].shape == (0,)
            assert h5.attrs["events"] == 0

"""Filtered event sampling, run conditions and dgs-monitor (issue 17).

Real `dgs-ioc` processes on loopback, the real `dgs-receiver` as the primary
receiver, consumers attached over PV Access with p4p (`receiver.sampler`) and a
classic receiver on the sample port.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from dataflow import DEMO_SPECS, TRIGGER_SPEC, crate_toml
from ioc_harness import BIN, IocProcess, wait_until

from ioc.pvs import PV_TABLE
from receiver import geb
from receiver.sampler import Sampler, context_for

CRATE = "01"
DEMO_BOARDS = {"MDIG1": 101, "MDIG2": 102, "MDIG3": 103, "MDIG4": 104}
RUN = 7


def sampling_address(ioc: IocProcess) -> str:
    return f"127.0.0.1:{int(ioc.get('DAQC01_SMP_PvaPort'))}"


def start_run(ioc: IocProcess) -> None:
    ioc.put_ok("Online_CS_SaveData", "Save")
    ioc.put_ok("Online_CS_StartStop", "Start")
    ioc.wait_value("DAQC01_CV_State", "Running")


def stop_run(ioc: IocProcess) -> None:
    ioc.put_ok("Online_CS_StartStop", "Stop")
    ioc.wait_value("DAQC01_CV_State", "Stopped", timeout=30)


def generated(ioc: IocProcess) -> dict[int, int]:
    return {bid: int(ioc.getf(f"VME01:{name}:SIM_Generated")) for name, bid in DEMO_BOARDS.items()}


class Drain:
    """Reads a consumer continuously on a thread, as an online analysis would."""

    def __init__(self, sampler: Sampler, keep: bool = False) -> None:
        self.sampler = sampler
        self.events = 0
        self.lost = 0
        #: With ``keep``, each batch's event fields.
        self.batches: list[dict[str, np.ndarray]] | None = [] if keep else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self.sampler.next(20_000, wait=0.3)
            self.events += len(batch)
            self.lost = batch.lost
            if self.batches is not None and len(batch):
                self.batches.append(batch.events)
            if self._stop.is_set() and batch.queued == 0 and len(batch) == 0:
                return

    def finish(self) -> int:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        return self.events


def records_in(run_dir: Path, board: int, channel: int | None = None) -> int:
    """GEB records dgs-receiver wrote for a board (or one of its channels), all chunks."""
    family = f"_{board:04d}_" + ("" if channel is None else f"{channel:X}")
    total = 0
    for path in run_dir.iterdir():
        name = path.name
        if ".gtd_" not in name or family not in name or name.endswith(("_D", "_E", "_F")):
            continue
        total += geb.read_records(path.read_bytes()).size
    return total


def consumer_rows(address: str) -> dict[str, dict]:
    ctx = context_for(address)
    try:
        table = ctx.get(f"DAQC{CRATE}_SMP_ConsumerTable", timeout=5)
    finally:
        ctx.close()
    value = table.value
    return {
        str(name): {"delivered": int(d), "lost": int(lost), "queued": int(q)}
        for name, d, lost, q in zip(value.name, value.delivered, value.lost, value.queued,
                                    strict=True)
    }


def test_consumers_take_their_share_and_never_the_primary_streams(start_ioc, tmp_path):
    ioc = start_ioc("--demo")
    ioc.put_ok("Online_CS_RunNumber", RUN)
    ioc.put_ok("Online_CS_SaveData", "Save")  # set before the receiver's snapshot
    address = sampling_address(ioc)
    every = Sampler(address, CRATE, "board=101 ch=0", name="every")
    prescaled = Sampler(address, CRATE, "board=101 ch=0-3 prescale=10", name="prescaled")
    stalled = Sampler(address, CRATE, "", name="stalled")  # attached, never read
    receiver = subprocess.Popen(
        [str(BIN / "dgs-receiver"), "--out", str(tmp_path), "--run", str(RUN),
         "--status", "plain", "--pv-pva", f"127.0.0.1:{ioc.ports.pva}", "--crate", CRATE,
         f"127.0.0.1:{ioc.ports.data}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    drains = [Drain(every), Drain(prescaled)]
    # The receiver takes its begin-of-run snapshot before it pulls.
    wait_until(lambda: list(tmp_path.glob("run*/*.pvs_begin.json")), 30, "the begin snapshot")
    start_run(ioc)
    for round_ in range(6):  # consumers come and go mid-run
        board = 101 + round_ % 4
        with Sampler(address, CRATE, f"board={board} recent", name=f"passing {round_}") as s:
            batch = s.next(10, wait=2.0)
            assert len(batch) == 1 and int(batch.events["board"][0]) == board
    with Sampler(address, CRATE, "board=103 ch=5 traces", name="traces") as s:
        batch = s.next(3, wait=2.0)
        samples = int(ioc.getf("VME01:MDIG3:SIM_TraceLength"))
        assert len(batch) >= 1 and samples > 0
        assert [batch.trace(row).size for row in range(len(batch))] == [samples] * len(batch)
    ioc.wait_numeric("DAQC01_SMP_Lost", lambda v: v > 0, timeout=30, what="the stalled one to lose")
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > 60, timeout=30)
    stop_run(ioc)
    out, _ = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, out
    got_every, got_prescaled = (drain.finish() for drain in drains)

    run_dir = tmp_path / f"run{RUN:05d}"
    counts = generated(ioc)
    assert {board: records_in(run_dir, board) for board in counts} == counts  # nothing lost
    matching_every = records_in(run_dir, 101, 0)
    matching_prescaled = sum(records_in(run_dir, 101, ch) for ch in range(4))
    assert got_every == matching_every > 0 and drains[0].lost == 0
    expected = matching_prescaled / 10
    sigma = math.sqrt(expected * (1 - 1 / 10))
    assert abs(got_prescaled - expected) <= 3 * sigma, (got_prescaled, expected)

    rows = consumer_rows(address)
    assert rows["stalled"]["delivered"] == 0 and rows["stalled"]["lost"] > 0
    assert rows["stalled"]["lost"] + rows["stalled"]["queued"] == sum(counts.values())
    assert [name for name in rows if name.startswith(("passing", "traces"))] == []
    assert int(ioc.get("DAQC01_SMP_Consumers")) == 3

    begin = json.loads(next(run_dir.glob("*.pvs_begin.json")).read_text())["crates"][0]["pvs"]
    ctx = context_for(address)
    try:
        conditions = json.loads(ctx.get(f"DAQC{CRATE}_SMP_RunConditions", timeout=5).raw.value)
    finally:
        ctx.close()
    settings = [name for name in begin if _is_setting(name) and name != "Online_CS_StartStop"]
    assert len(settings) > 20
    assert {n: conditions["pvs"][n] for n in settings} == {n: begin[n] for n in settings}
    assert conditions["pvs"]["Online_CS_RunNumber"] == RUN
    for sampler in (every, prescaled, stalled):
        sampler.close()
    assert "ERROR" not in ioc.log() and "Traceback" not in ioc.log()


def _is_setting(name: str) -> bool:
    """Whether a snapshot name is one of the PV table's writable records (a set-up value)."""
    suffixes = [pv.template.split("}")[-1] for pv in PV_TABLE if pv.writable]
    return any(name.endswith(suffix) for suffix in suffixes if suffix)


def test_a_classic_receiver_samples_a_live_run_on_the_sample_port_and_exits(start_ioc):
    ioc = start_ioc("--demo")
    port = int(ioc.get("DAQC01_SMP_Port"))
    assert port not in (0, ioc.ports.data)
    client = subprocess.Popen(
        [sys.executable, "-m", "receiver.client", f"127.0.0.1:{port}", "--interval", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: int(ioc.get("DAQC01_SMP_Consumers")) == 1, 15, "the client attached")
    start_run(ioc)  # SaveData = Save: the primary stream waits for a receiver meanwhile
    ioc.wait_numeric("DAQC01_SMP_Delivered", lambda v: v > 5000, timeout=30)
    stop_run(ioc)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
    total = out.strip().splitlines()[-1]
    assert "done=[101, 102, 103, 104]" in total, out
    events = int(total.split("events=")[1].split()[0])
    assert 5000 < events <= sum(generated(ioc).values()) + 4  # + the four 0xD headers
    wait_until(lambda: int(ioc.get("DAQC01_SMP_Consumers")) == 0, 15, "the client detached")
    assert "ERROR" not in ioc.log() and "Traceback" not in ioc.log()


def test_dgs_monitor_shows_rates_samples_and_a_spectrum(start_ioc, tmp_path):
    ioc = start_ioc("--demo")
    address = f"127.0.0.1:{ioc.ports.pva}"

    def monitor(*args: str) -> str:
        out = subprocess.run([str(BIN / "dgs-monitor"), address, *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    idle = monitor("--sample", "board=102", "--seconds", "1.5").splitlines()
    assert idle.count("crate 01 is Stopped: waiting for a run (Ctrl-C ends)") == 1, idle
    assert idle[-1] == "events 0 delivered 0 lost 0", idle
    start_run(ioc)

    # Rate<n> is published once a second: wait for every board's first one of this run.
    for board in ("MDIG1", "MDIG2", "MDIG3", "MDIG4"):
        ioc.wait_numeric(f"VME01:{board}:Rate0", lambda v: v > 0, timeout=20)
    table = monitor("--count", "1")
    assert "crate 01" in table
    # Per channel (Rate PVs) or per card (an IOC without them): the four boards' rows.
    rows = [line.split() for line in table.splitlines()]
    rates = [float(row[1]) for row in rows if row and row[0] in ("MDIG1", "MDIG2", "MDIG3",
                                                                "MDIG4", "0", "1", "2", "3")]
    assert len(rates) == 4 and all(rate > 0 for rate in rates), table

    sampled = monitor("--sample", "board=102 ch=0-3 prescale=10", "--count", "25")
    rows = [line.split() for line in sampled.splitlines()[2:-1]]
    assert len(rows) == 25
    assert {row[0] for row in rows} == {"102"} and {int(row[1]) for row in rows} <= {0, 1, 2, 3}

    drawn = monitor("--spectrum", "MDIG1:3", "--seconds", "2")
    assert "#" in drawn and "MDIG1 channel 3" in drawn
    png = tmp_path / "spectrum.png"
    monitor("--spectrum", "101:3", "--seconds", "1", "--png", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    energies = np.array([int(row[3]) for row in rows])
    assert (energies > 0).all()
    stop_run(ioc)


def test_master_trigger_packets_are_sampled_over_pva_and_on_the_sample_port(start_ioc, tmp_path):
    text = crate_toml((*DEMO_SPECS, TRIGGER_SPEC))
    text = text.replace("seed = 1\n", 'seed = 1\nsample_filter = "board=101,110 source=any"\n')
    config = tmp_path / "crate.toml"
    config.write_text(text)
    ioc = start_ioc("--config", str(config))
    address = sampling_address(ioc)
    triggers = Sampler(address, CRATE, "trigger", name="triggers")
    pattern = Sampler(address, CRATE, "trigger_type=2", name="type 2")
    drains = [Drain(triggers, keep=True), Drain(pattern)]
    port = int(ioc.get("DAQC01_SMP_Port"))
    client = subprocess.Popen(
        [sys.executable, "-m", "receiver.client", f"127.0.0.1:{port}", "--interval", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: int(ioc.get("DAQC01_SMP_Consumers")) == 3, 15, "the client attached")
    # The sampling server answers UDP searches like the IOC's own: a plain pvget finds it.
    table = ioc.tool("pvget", "DAQC01_SMP_ConsumerTable").stdout
    assert "source=trigger" in table and "trigger_type=2" in table and "classic" in table, table
    start_run(ioc)
    shown = subprocess.run(
        [str(BIN / "dgs-monitor"), f"127.0.0.1:{ioc.ports.pva}", "--sample", "trigger_all=0x1",
         "--count", "5"], capture_output=True, text=True, timeout=60,
    )
    rows = [line.split() for line in shown.stdout.splitlines()[2:-1]]
    assert len(rows) == 5 and {tuple(row[:2]) for row in rows} == {("110", "trig")}, shown
    assert all(row[5].startswith("0x") and int(row[5], 16) & 1 for row in rows), shown
    ioc.wait_numeric(f"VME01:{TRIGGER_SPEC.name}:SIM_Generated", lambda v: v > 2000, timeout=30)
    stop_run(ioc)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
    total = out.strip().splitlines()[-1]
    assert "done=[101, 102, 103, 104, 110]" in total, out
    made = int(ioc.getf(f"VME01:{TRIGGER_SPEC.name}:SIM_Generated"))
    events = int(total.split("events=")[1].split()[0])
    assert events == made + int(ioc.getf("VME01:MDIG1:SIM_Generated")) + 5  # + the five 0xD

    every, type_2 = (drain.finish() for drain in drains)
    assert every == made and drains[0].lost == 0
    fields = {name: np.concatenate([b[name] for b in drains[0].batches]) for name in
              ("board", "channel", "trigger_type", "timestamp", "multiplicity", "energy")}
    assert set(fields["board"].tolist()) == {TRIGGER_SPEC.package_data}
    assert set(fields["channel"].tolist()) == {16} and not fields["energy"].any()
    assert set(fields["trigger_type"].tolist()) == {1, 2, 4}
    assert (np.diff(fields["timestamp"].astype(np.int64)) > 0).all()
    assert fields["multiplicity"].min() >= 1
    assert type_2 == int((fields["trigger_type"] == 2).sum()) > 0
    for sampler in (triggers, pattern):
        sampler.close()
    assert "ERROR" not in ioc.log() and "Traceback" not in ioc.log()

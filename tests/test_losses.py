"""What `dgs-run stop`, `dgs-run status` and the run log say about data lost, by reason.

Pure formatting from the IOC's per-card loss waveforms (``DAQC<NN>_OL_Lost<R>`` in
MiB, ``DAQC<NN>_OL_LostEvents<R>``); the end-to-end run that loses data lives in
tests/test_dgs_run.py.
"""

from __future__ import annotations

import json

from runctl.cli import EXIT_LOST, exit_code, format_status
from runctl.losses import LOSS_PVS, MIB, REASONS, Loss, events_suffix, mib_suffix, size_text
from runctl.operator import (
    CRATE_PVS,
    LOST,
    CrateStatus,
    Endpoint,
    Progress,
    RunState,
    RunStatus,
    SystemStatus,
)
from runctl.runlog import CrateRecord, RunRecord, format_table

NOTHING = {suffix: (0.0,) * 7 for suffix in LOSS_PVS}


def stalled() -> dict[str, tuple[float, ...]]:
    """Card 1 lost 33 MiB to a full memory and card 0 one 0.25 MiB buffer to the checker."""
    values = dict(NOTHING)
    values[mib_suffix("Memory")] = (0.0, 33.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values[events_suffix("Memory")] = (0.0, 72000.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values[mib_suffix("Check")] = (0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values[events_suffix("Check")] = (575.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return values


def test_losses_are_summed_over_cards_and_named_by_reason():
    loss = Loss.from_values(stalled())
    assert loss is not None and loss
    assert loss.bytes["Memory"] == 33 * MIB and loss.events["Memory"] == 72000
    assert loss.bytes["Check"] == MIB // 4 and loss.events["Check"] == 575
    assert (loss.total_bytes, loss.total_events) == (33 * MIB + MIB // 4, 72575)
    assert loss.describe() == (
        "33.2 MiB, 72575 events (Memory 33.0 MiB / 72000 events; Check 256.0 KiB / 575 events)"
    )


def test_the_previous_runs_data_dropped_at_start_are_shown_but_are_not_this_runs_loss():
    values = dict(NOTHING)
    values[mib_suffix("Superseded")] = (2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values[events_suffix("Superseded")] = (4000.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    loss = Loss.from_values(values)
    assert loss is not None and not loss and loss.superseded
    assert (loss.total_bytes, loss.total_events) == (0, 0)
    assert loss.describe() == (
        "nothing; dropped at Start, the run before's: Superseded 2.0 MiB / 4000 events"
    )


def test_nothing_lost_and_an_ioc_without_loss_counters_read_differently():
    nothing = Loss.from_values(NOTHING)
    assert nothing is not None and not nothing and nothing.describe() == "nothing"
    assert Loss.from_values({mib_suffix(r): (0.0,) * 7 for r in REASONS}) is None
    assert [size_text(n) for n in (0, 1023, 1024, 5 * MIB // 2)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "2.5 MiB",
    ]


def test_the_run_log_keeps_losses_and_reads_lines_written_before_it_did():
    loss = Loss.from_values(stalled())
    assert loss is not None
    record = RunRecord(
        run=7,
        name="run00007",
        result="lost",
        prepared="2025-01-01T10:00:00.000+00:00",
        start="2025-01-01T10:00:01.000+00:00",
        stop="2025-01-01T10:00:13.000+00:00",
        data_dir="data",
        crates={"01": CrateRecord(0, lost_bytes=dict(loss.bytes), lost_events=dict(loss.events))},
    )
    again = RunRecord.from_json(record.to_json())
    assert again.crates["01"].loss == loss
    table = format_table([again])
    assert "lost 33.2 MiB, 72575 events (Memory 33.0 MiB / 72000 events;" in table
    data = json.loads(record.to_json())
    for crate in data["crates"].values():
        del crate["lost_bytes"], crate["lost_events"]
    old = RunRecord.from_json(json.dumps(data))  # a line from before losses were logged
    assert old.crates["01"].loss is None and "lost ?" in format_table([old])


def status(operator: RunStatus, start_stop: int, crate_values: dict) -> SystemStatus:
    return SystemStatus(
        operator=operator,
        globals_endpoint=Endpoint("127.0.0.1", 5075),
        globals={
            "Online_CS_StartStop": start_stop,
            "Online_CS_SaveData": 1,
            "Online_CS_RunNumber": 7,
        },
        crates=[CrateStatus("01", Endpoint("127.0.0.1", 5075), crate_values)],
    )


def crate_values(losses: dict) -> dict:
    values = {name: 0 for name in CRATE_PVS}
    values.update(CV_State=1, CV_BuffersAvail=150, CV_BuffersTotal=200, CV_BuffersOK=1)
    values["CV_SenderClient"] = "127.0.0.1:40000"
    return values | losses


def test_status_shows_lost_bytes_and_events_and_the_run_the_iocs_are_in():
    text = format_status(status(RunStatus(), 1, crate_values(stalled())))
    lines = text.splitlines()
    assert lines[0].startswith("run control: RUN run 7 (run00007) as the IOCs show it")
    assert "lost MiB" in lines[2] and "lost ev" in lines[2] and "lost %" not in lines[2]
    assert lines[3].split()[7:9] == ["33.2", "72575"], lines[3]
    assert lines[4].strip() == (
        "crate 01 lost 33.2 MiB, 72575 events (Memory 33.0 MiB / 72000 events; "
        "Check 256.0 KiB / 575 events)"
    )

    here = RunStatus(state=RunState.RUN, run=7, name="run00007", start="10:00")
    text = format_status(status(here, 0, crate_values({})))
    assert "stopped elsewhere" in text.splitlines()[0]
    assert text.splitlines()[3].split()[7:9] == ["?", "?"]
    assert format_status(status(RunStatus(), 0, crate_values(NOTHING))).startswith(
        "run control: STOP\n"
    )


def test_a_stop_that_lost_data_exits_4():
    assert exit_code(Progress(LOST, "STOP: run 7 ended ...; DATA LOST: ...")) == EXIT_LOST == 4

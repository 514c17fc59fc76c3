"""How `dgs-run stop` judges and tells the end of a run (`runctl.ending`): the result the
run log keeps, its message and the operator's last line, for every outcome, including
those the end-to-end tests of `test_dgs_run.py` cannot easily bring about (a crate not
drained in time, receivers stopped at their timeout, a receiver that failed)."""

from __future__ import annotations

import dataclasses

import pytest

from runctl.ending import ELSEWHERE_NOTE, RunEnd
from runctl.losses import MIB, REASONS, Loss
from runctl.runstate import DONE, ERROR, LOST, TIMEOUT

NOTHING_LOST = Loss(bytes=dict.fromkeys(REASONS, 0), events=dict.fromkeys(REASONS, 0))
MEMORY_LOST = Loss(bytes={**NOTHING_LOST.bytes, "Memory": 2 * MIB},
                   events={**NOTHING_LOST.events, "Memory": 4000})

CLEAN = RunEnd(
    run=7, crates=2, drain_s=10.0, receivers_s=60.0, not_drained={}, late=(),
    exits={"01": 0, "02": 0}, sent={"01": 2 * MIB, "02": MIB},
    losses={"01": NOTHING_LOST, "02": NOTHING_LOST}, gone={}, never_ran=(), adopted=False,
)


def ended(**changes) -> RunEnd:
    return dataclasses.replace(CLEAN, **changes)


def test_a_clean_run_is_ok_and_says_what_it_sent():
    closing = CLEAN.closing(1.5)
    assert (CLEAN.result, CLEAN.message) == ("ok", "")
    assert (closing.kind, closing.message) == (DONE, "STOP: run 7 ended after 1.5 s, 2 crate(s), "
                                                  "3.0 MiB sent")
    assert CLEAN.closing(None).message == "STOP: run 7 ended, 2 crate(s), 3.0 MiB sent"


def test_data_lost_is_named_per_crate():
    end = ended(losses={"01": MEMORY_LOST, "02": NOTHING_LOST})
    closing = end.closing(2.0)
    assert end.result == "lost"
    assert closing.kind == LOST
    assert closing.message.endswith("; DATA LOST: crate 01: 2.0 MiB, 4000 events "
                                 "(Memory 2.0 MiB / 4000 events)")


def test_a_failed_receiver_is_an_error_naming_its_exit_code():
    end = ended(exits={"01": 0, "02": 3})
    assert end.result == "error"
    closing = end.closing(2.0)
    assert (closing.kind, closing.message) == (
        ERROR, "receivers failed: crate 02 (3); run 7 logged, STOP")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"not_drained": {"02": "state Running (needs Stopped)"}},
         "not drained within 10 s: crate 02: state Running (needs Stopped)"),
        ({"late": {"02", "01"}},
         "receivers still running after 60 s were stopped: crate 01, crate 02"),
    ],
)
def test_what_did_not_happen_in_time_is_a_timeout_in_the_log_and_the_last_line(changes, problem):
    end = ended(**changes)
    closing = end.closing(2.0)
    assert (end.result, end.message) == ("timeout", problem)
    assert (closing.kind, closing.message) == (TIMEOUT, f"{problem}; run 7 logged, STOP")


def test_a_forced_end_outranks_everything_else_and_says_who_did_not_answer():
    end = ended(gone={"crate 02": "its IOC does not answer"},
                not_drained={"01": "state Running (needs Stopped)"},
                exits={"01": 1, "02": 0}, losses={"01": MEMORY_LOST})
    closing = end.closing(3.0)
    assert end.result == "forced"
    assert end.message.startswith("did not answer: crate 02: its IOC does not answer; "
                                  "not drained within 10 s")
    assert closing.kind == DONE
    assert closing.message == ("STOP: run 7 ended after 3.0 s by force (did not answer: crate 02: "
                            "its IOC does not answer); receivers stopped, logged as forced")


def test_a_timeout_outranks_a_failed_receiver_which_outranks_lost_data():
    assert ended(late={"01"}, exits={"01": 2}, losses={"01": MEMORY_LOST}).result == "timeout"
    assert ended(exits={"01": 2}, losses={"01": MEMORY_LOST}).result == "error"


def test_crates_that_never_ran_and_a_run_started_elsewhere_go_into_the_message():
    end = ended(never_ran={"03", "02"}, adopted=True)
    assert end.result == "ok"
    assert end.message == f"never ran: crate 02, crate 03; {ELSEWHERE_NOTE}"

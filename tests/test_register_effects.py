"""Register records shape the data, end to end: CA put -> register -> simulated board
-> FIFO -> inLoop -> outLoop -> sender -> a receiver.

Written through the original's user-level records, as the operator GUI and the
set-up scripts write them: a leading-edge threshold above every simulated pulse
height silences its channel while the others keep their rate, and the raw-data
length sets the trace samples of the events a receiver gets.
"""

from __future__ import annotations

import numpy as np
from dataflow import Background, receiver, start_run, stop_run

from ioc.decoder import KIND_EVENT, decode, trace_of
from ioc.hardware import WORD

MDIG1 = 101
#: ADC counts: the simulated pulse heights reach about 6050 (sim/registers.py).
ABOVE_EVERY_PULSE = 10000


def received_events(ioc, run_seconds_buffers: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """One run with a receiver: (words, events) of every data reply."""
    rx = Background(receiver(ioc, pipeline=6, keep_payloads=True), max_seconds=90)
    start_run(ioc)
    ioc.wait_numeric("DAQC01_OL_TotalBufsWritten", lambda v: v > run_seconds_buffers, 30)
    stop_run(ioc)
    tally = rx.join()
    assert tally.all_done
    replies = []
    for payload in tally.payloads:
        words = np.frombuffer(payload, dtype=WORD)
        events = decode(words).events
        replies.append((words, events[events["kind"] == KIND_EVENT]))
    return replies


def test_a_threshold_above_every_pulse_silences_its_channel(demo_ioc):
    ioc = demo_ioc
    ioc.put_ok("VME01:MDIG1:led_threshold0", ABOVE_EVERY_PULSE)
    assert int(ioc.getf("VME01:MDIG1:led_threshold0")) == ABOVE_EVERY_PULSE
    events = np.concatenate([ev for _, ev in received_events(ioc)])
    mdig1 = events[events["board"] == MDIG1]
    per_channel = np.bincount(mdig1["channel"], minlength=10)
    assert per_channel[0] == 0, per_channel
    assert (per_channel[1:] > 20).all(), per_channel
    other = events[events["board"] == MDIG1 + 1]
    assert np.bincount(other["channel"], minlength=10)[0] > 20


def test_the_raw_data_length_sets_the_trace_length_of_received_events(demo_ioc):
    ioc = demo_ioc
    ioc.put_ok("VME01:MDIG1:raw_data_length0", 1.2)  # microseconds: 120 samples of 10 ns
    lengths: dict[int, set[int]] = {}
    for words, events in received_events(ioc):
        for event in events[np.isin(events["board"], (MDIG1, MDIG1 + 1))]:
            lengths.setdefault(int(event["board"]), set()).add(trace_of(words, event).size)
    assert lengths[MDIG1] == {120}, lengths
    assert lengths[MDIG1 + 1] == {200}, lengths

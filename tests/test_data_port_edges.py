"""Hostile and stuck clients on the real data port of a running crate.

- a client that sends 3 bytes and goes silent gives way to a real receiver,
  which gets the whole run;
- a second receiver while one is served is told so, and the quick client says
  why it waits and keeps to its deadline;
- only addresses in ``allowed_receivers`` are served;
- the quick client started after Stop ends once every board's end-of-run came;
- replies a stalled classic receiver never took, when the crate closes it, are
  counted as lost in flight, per board and exactly.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

from dataflow import (
    BOARDS,
    CRATE,
    DEMO_SPECS,
    Background,
    Pva,
    begin_over_pva,
    data_keys,
    end_over_pva,
    generated,
    ioc_process,
    receiver,
    write_config,
)
from ioc_harness import wait_until

from receiver.client import REQUEST


def every_event(tally, ioc) -> None:
    expected = generated(ioc)
    assert {b: data_keys(tally.boards[b].events).size for b in expected} == expected
    assert tally.all_done


def test_a_silent_client_gives_way_and_the_real_receiver_gets_the_whole_run(tmp_path):
    with ioc_process(tmp_path, "--demo") as ioc, Pva(ioc) as pva:
        begin_over_pva(pva)
        squatter = socket.create_connection(("127.0.0.1", ioc.ports.data), timeout=10)
        squatter.sendall(REQUEST[:3])
        wait_until(lambda: pva.get(f"DAQC{CRATE}_CV_SenderClient") != "", 10, "the squatter")
        started = time.monotonic()
        rx = Background(receiver(ioc, pipeline=6), max_seconds=60)
        wait_until(lambda: pva.number(f"DAQC{CRATE}_CV_SenderReplies") > 0, 10, "data flowing")
        assert time.monotonic() - started < 5, "the silent client held the port"
        end_over_pva(pva)
        every_event(rx.join(60), ioc)
        squatter.close()
        assert "gave way" in ioc.log()


def test_a_second_receiver_is_told_why_it_waits_and_keeps_its_deadline(tmp_path):
    with ioc_process(tmp_path, "--demo") as ioc, Pva(ioc) as pva:
        begin_over_pva(pva)
        first = Background(receiver(ioc, pipeline=6), max_seconds=60)
        wait_until(lambda: pva.get(f"DAQC{CRATE}_CV_SenderClient") != "", 10, "the first")
        started = time.monotonic()
        quick = subprocess.run(
            [sys.executable, "-m", "receiver.client", f"127.0.0.1:{ioc.ports.data}",
             "--seconds", "3"], capture_output=True, text=True, timeout=30,
        )
        waited = time.monotonic() - started
        assert "waiting" in quick.stdout and "another receiver" in quick.stdout, quick.stdout
        assert waited < 8, f"--seconds 3 took {waited:.1f} s"
        end_over_pva(pva)
        every_event(first.join(60), ioc)
        assert "told to retry later" in ioc.log()


def test_only_allowed_addresses_are_served(tmp_path):
    config = write_config(tmp_path, DEMO_SPECS)
    text = config.read_text().replace('data_bind = "127.0.0.1"',
                                      'data_bind = "127.0.0.1"\nallowed_receivers = ["10.0.0.0/8"]')
    config.write_text(text)
    with ioc_process(tmp_path, "--config", str(config)) as ioc, Pva(ioc) as pva:
        begin_over_pva(pva)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", ioc.ports.data), timeout=10) as sock:
                sock.sendall(REQUEST)
                sock.settimeout(10)
                with contextlib.suppress(ConnectionResetError):  # closed unread: a reset
                    assert sock.recv(16) == b"", "an address outside allowed_receivers was served"
        pva.wait(f"DAQC{CRATE}_CV_SenderRejected", lambda v: v == 3, 10, "three refusals")
        end_over_pva(pva)
    assert ioc.log().count("not in allowed_receivers") == 1, "refusals must not flood the log"


def test_the_quick_client_after_stop_ends_with_every_boards_end_of_run(tmp_path):
    with ioc_process(tmp_path, "--demo") as ioc, Pva(ioc) as pva:
        begin_over_pva(pva)
        time.sleep(1.0)
        end_over_pva(pva)
        quick = subprocess.run(
            [sys.executable, "-m", "receiver.client", f"127.0.0.1:{ioc.ports.data}"],
            capture_output=True, text=True, timeout=60,
        )
        assert quick.returncode == 0, quick.stderr
        assert f"done={sorted(BOARDS.values())}" in quick.stdout, quick.stdout


def test_replies_a_stalled_receiver_never_took_are_counted_lost_in_flight(tmp_path):
    """A receiver asks for replies and then reads nothing: after the idle timeout the crate
    closes it and counts what was still in its socket. The next receiver gets the rest, so
    per board: generated = received + lost in flight, to the event."""
    config = write_config(tmp_path, DEMO_SPECS, sender={"idle_timeout_s": 1.0})
    with ioc_process(tmp_path, "--config", str(config)) as ioc, Pva(ioc) as pva:
        begin_over_pva(pva)
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", ioc.ports.data))
        stalled.sendall(REQUEST * 6)
        wait_until(lambda: "took nothing" in ioc.log() or "no request for" in ioc.log(), 20,
                   "the stalled receiver closed")
        rx = Background(receiver(ioc, pipeline=6), max_seconds=60)
        time.sleep(1.0)
        end_over_pva(pva)
        tally = rx.join(60)
        stalled.close()
        wait_until(lambda: sum(pva.get(f"DAQC{CRATE}_OL_LostEventsInFlight")) > 0, 10,
                   "in-flight losses published")
        in_flight = pva.get(f"DAQC{CRATE}_OL_LostEventsInFlight")
        expected = generated(ioc)
        for card, board in enumerate(BOARDS.values()):
            got = data_keys(tally.boards[board].events).size
            assert got + in_flight[card] == expected[board], (board, got, in_flight[card])
        assert sum(in_flight) > 0

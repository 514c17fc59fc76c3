"""The replay backend's reader and boards: recordings written by hand from spec 04.

Each board must get back exactly its recorded packets, as the FIFO held them,
in recorded order, from every file layout and from saved replies; files that
are not recordings must stop with a message naming the file and the byte.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from ioc_harness import wait_until
from replay_files import (
    crate_packets,
    digitizer,
    trigger,
    type_f,
    write_board_layout,
    write_geb,
    write_raw,
)

from ioc import backends
from ioc.config import BoardConfig, CrateConfig, ReplayConfig
from ioc.hardware import WORD, BoardKind
from replay import RecordingError, ReplayCrate
from replay.recording import BoardStream, FamilyCursor, Strangers, Wanted, families

DIGITIZERS = (101, 102)
TRIGGER_ID = 110


def stream_of(sources: list[Path], board: int, trigger_board: bool = False,
              strangers: Strangers | None = None) -> bytes:
    """Everything a board's stream gives, as bytes."""
    wanted = Wanted(board, trigger_board)
    cursors = [FamilyCursor(f, wanted, strangers) for f in families(sources)
               if f.may_hold(board, trigger_board)]
    stream, parts = BoardStream(cursors), []
    for _ in range(100_000):
        found = stream.next()
        if found is None:
            return b"".join(parts)
        assert (np.diff(found.keys) >= 0).all()
        parts.append(found.words.tobytes())
    raise AssertionError("the stream did not end")


def recorded(packets, board: int, is_trigger: bool = False) -> bytes:
    return b"".join(p.data for p in packets if p.board == board and p.trigger == is_trigger)


def crate_config(source: Path, **replay) -> CrateConfig:
    boards = (
        *(
            BoardConfig(f"MDIG{n}", BoardKind.DIGITIZER_MASTER, n, n + 2, board_id, enabled=True)
            for n, board_id in enumerate(DIGITIZERS)
        ),
        BoardConfig("MTRG", BoardKind.TRIGGER_MASTER, 4, 2, TRIGGER_ID, enabled=True),
    )
    return CrateConfig(crate="01", backend="replay", boards=boards,
                       replay=ReplayConfig(source=(str(source),), **replay))


# ------------------------------------------------------------------ reading


def test_per_board_files_give_each_board_its_packets_and_skip_status_headers(tmp_path):
    packets = crate_packets(DIGITIZERS, TRIGGER_ID, seconds=0.5, rate_hz=2000)
    write_board_layout(tmp_path, packets)
    write_geb(tmp_path / "run00001.gtd_001_0101", [type_f(101, 0xD, 9_000_000)])
    for board in DIGITIZERS:
        assert stream_of([tmp_path], board) == recorded(packets, board)
    assert stream_of([tmp_path], TRIGGER_ID, True) == recorded(packets, TRIGGER_ID, True)


def test_classic_channel_files_and_chunks_merge_back_into_recorded_order(tmp_path):
    packets = [p for p in crate_packets((101,), None, seconds=0.3, rate_hz=3000)]
    by_channel: dict[int, list] = {}
    for packet in packets:
        by_channel.setdefault(packet.channel, []).append(packet)
    for channel, rows in by_channel.items():
        half = len(rows) // 2  # two chunks: chunk 001 follows chunk 000
        write_geb(tmp_path / f"run9.gtd_000_0101_{channel:X}", rows[:half])
        write_geb(tmp_path / f"run9.gtd_001_0101_{channel:X}", rows[half:])
    write_geb(tmp_path / "run9.gtd_000_0101_D", [type_f(101, 0xD, 1)])
    assert stream_of([tmp_path], 101) == recorded(packets, 101)


def test_a_single_file_is_split_by_board_and_unknown_boards_are_counted(tmp_path):
    packets = crate_packets((101, 102, 105), TRIGGER_ID, seconds=0.2, rate_hz=1000)
    write_geb(tmp_path / "all.gtd_000", packets)
    strangers = Strangers(frozenset(DIGITIZERS), has_trigger=True)
    assert stream_of([tmp_path], 101, strangers=strangers) == recorded(packets, 101)
    assert strangers.counts == {"board 105": 200}
    assert stream_of([tmp_path], TRIGGER_ID, True) == recorded(packets, TRIGGER_ID, True)


def test_the_classic_receivers_trigger_board_ids_belong_to_the_configured_trigger(tmp_path):
    packets = [trigger(15, 1000 + 10 * i) for i in range(5)]
    write_geb(tmp_path / "old.gtd_000_trig_0015_0", packets)
    assert stream_of([tmp_path], TRIGGER_ID, True) == b"".join(p.data for p in packets)


def test_saved_replies_give_the_packets_as_the_ioc_read_them(tmp_path):
    packets = crate_packets(DIGITIZERS, TRIGGER_ID, seconds=0.2, rate_hz=2000)
    replies = [[p for p in packets[i : i + 30] if p.board == board and not p.trigger]
               for i in range(0, len(packets), 30) for board in DIGITIZERS]
    replies += [[p for p in packets if p.trigger], [type_f(101, 0xE, 5)]]
    replies += [[digitizer(105, 1, 90), digitizer(105, 2, 95)]]
    path = write_raw(tmp_path / "run00001.replies_0", [r for r in replies if r])
    strangers = Strangers(frozenset(DIGITIZERS), has_trigger=True)
    assert stream_of([path], 101, strangers=strangers) == recorded(packets, 101)
    assert strangers.counts == {"board 105": 2}
    for board in DIGITIZERS:
        assert stream_of([path], board) == recorded(packets, board)
    assert stream_of([path], TRIGGER_ID, True) == recorded(packets, TRIGGER_ID, True)


def test_words_of_a_saved_reply_that_are_not_packets_are_skipped_and_said(tmp_path, caplog):
    good = digitizer(101, 4, 70)
    broken = dataclasses.replace(good, data=good.data + b"\x12\x34\x56\x78" * 3)
    path = write_raw(tmp_path / "r.replies_0", [[broken], [digitizer(101, 5, 80)]])
    strangers = Strangers(frozenset(DIGITIZERS), has_trigger=True)
    assert stream_of([path], 101, strangers=strangers) == good.data + digitizer(101, 5, 80).data
    assert f"{path}: 3 words of the reply at byte 0 are not packets: skipped" in caplog.text


def test_a_directory_with_files_and_replies_is_replayed_from_its_files(tmp_path):
    write_geb(tmp_path / "r.gtd_000_0101", [digitizer(101, 1, 50)])
    write_raw(tmp_path / "r.replies_0", [[digitizer(101, 2, 60)]])
    assert stream_of([tmp_path], 101) == digitizer(101, 1, 50).data


# ------------------------------------------------------------------ bad files


def error_of(source: Path, board: int = 101) -> str:
    with pytest.raises(RecordingError) as caught:
        stream_of([source], board)
    return str(caught.value)


def test_bad_and_truncated_files_are_refused_naming_the_file_and_byte(tmp_path):
    good = write_geb(tmp_path / "a.gtd_000_0101", [digitizer(101, 0, 10), digitizer(101, 1, 20)])
    cut = tmp_path / "cut" / "a.gtd_000_0101"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:-6])
    assert error_of(cut) == (
        f"{cut}: truncated: the file ends inside the record at byte 84 (78 bytes of it)"
    )
    text = tmp_path / "notes.gtd_000"
    text.write_bytes(b"these are not records, just some text of a user" * 3)
    assert f"{text}: the record at byte 0 is not a DGS packet" in error_of(text)
    raw = write_raw(tmp_path / "r.replies_0", [[digitizer(101, 0, 10)]])
    cut_raw = tmp_path / "cut" / "r.replies_0"
    cut_raw.write_bytes(raw.read_bytes()[:-4])
    assert error_of(cut_raw) == (
        f"{cut_raw}: truncated: the reply at byte 0 has 68 of its 72 bytes"
    )
    bad_raw = tmp_path / "x.replies_1"
    bad_raw.write_bytes(good.read_bytes())
    assert f"{bad_raw}: not a saved data reply at byte 0" in error_of(bad_raw)
    assert error_of(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such file or directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_of(empty).startswith(f"{empty}: no GEB run files")


def test_files_of_boards_not_configured_are_never_opened_but_named(tmp_path, caplog):
    packets = crate_packets((*DIGITIZERS, 105), None, seconds=0.01, rate_hz=1000)
    write_board_layout(tmp_path, packets)
    (tmp_path / "run00001.gtd_001_0105").write_bytes(b"garbage, an error if it were read")
    crate = backends.build(crate_config(tmp_path))
    try:
        assert crate.strangers.counts == {"board 105 (2 files)": 0}
        assert "replay: board 105 (2 files) is not in the configuration" in caplog.text
    finally:
        crate.close()


def test_a_recording_without_the_configured_boards_cannot_be_built(tmp_path):
    write_geb(tmp_path / "r.gtd_000_0201", [digitizer(201, 0, 10)])
    with pytest.raises(backends.BackendError, match="no packets of the configured boards"):
        backends.build(crate_config(tmp_path))


# ------------------------------------------------------------------ pacing


def replay_crate(tmp_path: Path, seconds: float, rate_hz: float, **replay) -> ReplayCrate:
    packets = crate_packets(DIGITIZERS, TRIGGER_ID, seconds=seconds, rate_hz=rate_hz)
    write_board_layout(tmp_path / "run", packets)
    crate = backends.build(crate_config(tmp_path / "run", **replay))
    assert isinstance(crate, ReplayCrate)
    return crate


def drain(board) -> np.ndarray:
    depth = board.status().depth_words
    out = np.zeros(depth, WORD)
    assert board.read(out, depth) == depth
    return out


def test_packets_enter_at_the_recorded_pace(tmp_path):
    crate = replay_crate(tmp_path, seconds=1.0, rate_hz=1000)
    board = crate.boards[0]
    try:
        board.set_master_logic(True)
        began = time.monotonic()
        wait_until(lambda: board.status().depth_words > 0, 2, "the first packets")
        time.sleep(0.3)
        status, elapsed = board.status(), time.monotonic() - began
        packets = status.depth_words // 18
        assert 0.3 * 1000 * 0.8 <= packets <= elapsed * 1000 * 1.2 + 5
        wait_until(lambda: board.status().depth_words == 1000 * 18, 3, "the whole recording")
        assert board.dropped == 0
    finally:
        crate.close()


def test_a_full_fifo_loses_what_does_not_fit_and_says_so(tmp_path):
    crate = replay_crate(tmp_path, seconds=0.5, rate_hz=4000, speed=10.0, fifo_words=1024)
    board = crate.boards[0]
    try:
        board.set_master_logic(True)
        wait_until(lambda: board.status().full, 3, "a full FIFO")
        assert board.dropped > 0 and board.status().depth_words <= 1024
        board.reset_fifo()
        assert not board.status().full
    finally:
        crate.close()


def test_at_speed_max_nothing_is_lost_and_each_run_replays_from_the_start(tmp_path):
    crate = replay_crate(tmp_path, seconds=2.0, rate_hz=2000, speed=0.0, fifo_words=2048)
    board = crate.boards[1]
    first_word1 = 3 << 27 | 17 << 16 | 102 << 4
    try:
        for _ in range(2):
            before = board.replayed
            board.reset_fifo()
            board.set_master_logic(True)
            words = []
            began = time.monotonic()
            while board.replayed - before < 4000 and time.monotonic() - began < 10:
                status = board.status()
                assert not status.almost_full and not status.full
                words.append(drain(board))
            board.set_master_logic(False)
            words.append(drain(board))
            assert time.monotonic() - began < 2.0, "a 2 s recording at speed max"
            replayed = np.concatenate(words)
            assert replayed[:2].tolist() == [0xAAAAAAAA, first_word1]
            assert replayed.size == 4000 * 18 and board.dropped == 0
    finally:
        crate.close()


def test_loop_starts_the_recording_again(tmp_path):
    crate = replay_crate(tmp_path, seconds=0.05, rate_hz=2000, speed=0.0, loop=True)
    board = crate.boards[0]

    def three_passes() -> bool:
        drain(board)
        return board.replayed > 300

    try:
        board.set_master_logic(True)
        wait_until(three_passes, 5, "three passes of a 100-packet recording")
    finally:
        crate.close()


def test_registers_keep_what_was_written_and_package_data_is_the_configured_one(tmp_path):
    crate = replay_crate(tmp_path, seconds=0.01, rate_hz=1000)
    try:
        digitizer_board, trigger_board = crate.boards[0], crate.boards[2]
        assert [b.package_data for b in crate.boards] == [*DIGITIZERS, TRIGGER_ID]
        digitizer_board.write_register("reg_raw_data_length3", 0x123)
        assert digitizer_board.read_register("reg_raw_data_length3") == 0x123
        trigger_board.write_register("reg_TRIG_MASK", 7)
        assert trigger_board.read_register("reg_TRIG_MASK") == 7
        with pytest.raises(ValueError, match="read-only"):
            digitizer_board.write_register("regin_board_id", 1)
    finally:
        crate.close()

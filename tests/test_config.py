"""Configuration: the demo system, example files, every validation rule, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ioc.config import (
    BoardConfig,
    ConfigError,
    CrateConfig,
    InLoopConfig,
    SenderConfig,
    SimBoardConfig,
    SystemConfig,
    demo_config,
    dump_config,
    load_config,
    parse_config,
    with_overrides,
)
from ioc.hardware import BoardKind

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOURCE = "t.toml"

# The starting schema printed in spec 01, verbatim in content: it must keep loading.
SPEC_SCHEMA = """
[system]
globals = "local"
globals_ca = "127.0.0.1:5064"

[[crate]]
crate = "01"
host = "127.0.0.1"
ca_port = 5064
pva_port = 5075
data_port = 9001
data_bind = "0.0.0.0"
backend = "sim"
seed = 1

[crate.sender]
max_reply_bytes = 280000
idle_wait_s = 0.020
accept_delay_s = 0.0
max_segment = 32764
idle_timeout_s = 10.0
delivery_timeout_s = 30.0

[[crate.board]]
name = "MDIG1"
kind = "digitizer_master"
card = 0
slot = 3
package_data = 101
enabled = true
[crate.board.sim]
event_rate_hz = 500
trace_samples = 200
header_type = "LED"
fifo_words = 262144
"""


def board(sim: str = "", **keys: str | None) -> str:
    """A [[crate.board]] block; keyword values are raw TOML, None drops the key."""
    fields = {"name": '"MDIG1"', "kind": '"digitizer_master"', "card": "0", "slot": "3"}
    fields["package_data"] = "101"
    fields.update(keys)
    lines = ["[[crate.board]]", *(f"{k} = {v}" for k, v in fields.items() if v is not None)]
    if sim:
        lines += ["[crate.board.sim]", sim]
    return "\n".join(lines) + "\n"


def crate(*boards: str, crate_id: str = '"01"', keys: str = "", tables: str = "") -> str:
    """A [[crate]] block with raw extra keys, then sub-tables, then its boards."""
    body = f"[[crate]]\ncrate = {crate_id}\n{keys}\n{tables}\n"
    return body + "".join(boards or (board(),))


def system(*crates: str, keys: str = "", top: str = "") -> str:
    return f"{top}\n[system]\n{keys}\n" + "".join(crates or (crate(),))


def problem(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: ")
    return message


def test_demo_is_the_spec_demonstration_system():
    demo = demo_config()
    assert demo.source == "demo"
    assert demo.globals == "local"
    assert demo.run_protect is False  # as in the original: set-up writable at any time
    (only,) = demo.crates
    assert demo.crate(None) is only
    assert (only.crate, only.backend, only.seed) == ("01", "sim", 1)
    assert (only.data_port, only.data_bind) == (9001, "127.0.0.1")
    assert [(b.name, b.kind, b.card, b.slot, b.package_data, b.enabled) for b in only.boards] == [
        (f"MDIG{n}", BoardKind.DIGITIZER_MASTER, n - 1, n + 2, 100 + n, True) for n in range(1, 5)
    ]
    for b in only.boards:
        assert b.sim == SimBoardConfig(
            event_rate_hz=500.0, trace_samples=200, header_type=7, fifo_words=262144
        )
    assert only.sender == SenderConfig()
    assert only.inloop == InLoopConfig()
    assert (only.sender.max_reply_bytes, only.sender.max_segment) == (280000, 32764)
    assert (only.inloop.read_threshold_bytes, only.inloop.max_latency_s) == (65536, 0.020)
    assert (only.inloop.drain_timeout_s, only.inloop.min_free_buffers) == (5.0, 4)


def test_demo_file_is_the_demo_system():
    loaded = load_config(EXAMPLES / "demo.toml")
    assert loaded == demo_config()
    assert loaded.source.endswith("demo.toml")


def test_three_crates_example():
    loaded = load_config(EXAMPLES / "three-crates.toml")
    assert [c.crate for c in loaded.crates] == ["01", "02", "03"]
    assert loaded.globals == "remote"
    assert loaded.globals_endpoint == ("127.0.0.1", 5070)
    ports = [p for c in loaded.crates for p in (c.ca_port, c.pva_port, c.data_port)]
    assert len(set(ports)) == len(ports) and 5070 not in ports
    assert all(c.host == c.data_bind == "127.0.0.1" for c in loaded.crates)
    assert all(len(c.boards) == 2 and all(b.enabled for b in c.boards) for c in loaded.crates)
    package_data = [b.package_data for c in loaded.crates for b in c.boards]
    assert len(set(package_data)) == 6
    assert loaded.crate("02").board_by_card(1).kind is BoardKind.DIGITIZER_SLAVE
    assert loaded.crate("03").boards[0].sim.header_type == 8


@pytest.mark.parametrize("name", ["demo.toml", "three-crates.toml", "replay.toml"])
def test_examples_round_trip_through_dump(name):
    loaded = load_config(EXAMPLES / name)
    assert parse_config(dump_config(loaded), "dumped") == loaded


def test_spec_schema_and_minimal_files_load_with_defaults():
    spec = parse_config(SPEC_SCHEMA, "spec.toml")
    assert spec.crate("01").board_by_card(0).sim.event_rate_hz == 500.0
    minimal = parse_config(f"[[crate]]\ncrate = 7\n{board()}", "old.toml")
    assert minimal.state_dir is None
    (only,) = minimal.crates
    assert only == CrateConfig(
        crate="07",
        boards=(BoardConfig("MDIG1", BoardKind.DIGITIZER_MASTER, 0, 3, 101),),
    )
    assert only.boards[0].enabled is False and only.boards[0].fifo_num == 6


def test_a_single_crate_table_counts_as_one_crate():
    single = parse_config(f'[crate]\ncrate = "05"\n{board()}', SOURCE)
    assert [c.crate for c in single.crates] == ["05"]
    assert single.crate(None).board_by_card(0).name == "MDIG1"


def test_accepted_edge_values():
    text = system(
        crate(
            board(
                card="6",
                slot="7",
                package_data="4094",
                fifo_num="15",
                sim='trace_samples = 992\nfifo_words = 1024\nheader_type = "CFD"',
            ),
            board(
                name='"MTRG"',
                kind='"trigger_master"',
                card="5",
                slot="1",
                package_data="0",
                sim="event_rate_hz = 0\ntrace_samples = 0",
            ),
            keys="data_port = 0\nca_port = 1\npva_port = 65535\nseed = 0",
            tables="[crate.sender]\nmax_segment = 0\nidle_wait_s = 0\nmax_reply_bytes = 2048\n"
            "[crate.inloop]\nread_threshold_bytes = 4\nmin_free_buffers = 199\n",
        ),
        keys='globals = "remote"\nglobals_ca = "globals-ioc.example:65535"',
    )
    loaded = parse_config(text, SOURCE).crate("01")
    assert loaded.data_port == 0 and loaded.sender.max_segment == 0
    assert loaded.board_by_card(6).sim.header_type == 8
    assert loaded.board_by_card(5).kind.is_trigger
    assert loaded.board_by_card(0) is None


def test_replay_settings_load_with_relative_sources_beside_the_file(tmp_path):
    path = tmp_path / "replay.toml"
    path.write_text(replay('source = ["runs/run00042", "/data/r.replies_0"]\nspeed = "max"'
                           "\nloop = true"))
    loaded = load_config(path)
    settings = loaded.crate("01").replay
    assert settings.source == (str(tmp_path / "runs/run00042"), "/data/r.replies_0")
    assert (settings.speed, settings.loop, settings.fifo_words) == (0.0, True, 262144)
    assert parse_config(dump_config(loaded), "dumped") == loaded
    assert parse_config(replay('source = "r"\nspeed = 2.5'), SOURCE).crates[0].replay.speed == 2.5


def bad_board(**keys: str) -> str:
    return system(crate(board(**keys)))


def bad_sim(sim: str) -> str:
    return system(crate(board(sim=sim)))


def bad_crate(keys: str = "", tables: str = "", crate_id: str = '"01"') -> str:
    return system(crate(keys=keys, tables=tables, crate_id=crate_id))


def second_crate(keys: str,
                 system_keys: str = 'globals = "remote"\nglobals_ca = "127.0.0.1:5070"') -> str:
    """Crate 01 with the defaults beside crate 02 (CA/PVA ports of its own, and ``keys``)."""
    crate_02 = crate(board(package_data="201"), crate_id='"02"',
                     keys=f"ca_port = 5066\npva_port = 5077\n{keys}")
    return system(crate(), crate_02, keys=system_keys)


def replay(keys: str, backend: str = 'backend = "replay"') -> str:
    return bad_crate(keys=backend, tables=f"[crate.replay]\n{keys}\n")


def sender(keys: str) -> str:
    return bad_crate(tables=f"[crate.sender]\n{keys}\n")


def inloop(keys: str) -> str:
    return bad_crate(tables=f"[crate.inloop]\n{keys}\n")


TWO_BOARDS = "MDIG1", "MDIG2"

CASES = {
    # syntax and structure
    "toml syntax": ("[[crate]\ncrate = 1", ["invalid TOML", "line 1"]),
    "no crate": ("[system]\n", ["no [[crate]] table"]),
    "unknown top-level": (system(top="[crates]\n"), ["unknown key 'crates'", "'crate'"]),
    "unknown system key": (
        system(keys="globls = 'local'"),
        ["[system]: unknown key 'globls' (did you mean 'globals'?)"],
    ),
    "unknown crate key": (bad_crate(keys="data_prot = 9001"), ["crate 01", "'data_prot'"]),
    "unknown sender key": (sender("idle_wait = 1"), ["[crate.sender]", "'idle_wait'"]),
    "unknown inloop key": (inloop("latency = 1"), ["[crate.inloop]", "'latency'"]),
    "unknown board key": (bad_board(sloot="3"), ["board MDIG1", "'sloot'", "'slot'"]),
    "unknown sim key": (bad_sim("rate = 5"), ["[crate.board.sim]", "'rate'"]),
    "sim not a table": (
        system(crate(board() + "sim = 5\n")),
        ["board MDIG1", "sim must be a table"],
    ),
    "sim array": (
        system(crate(board() + "[[crate.board.sim]]\n")),
        ["board MDIG1: sim must be a table, got array"],
    ),
    "table for bool": (
        system(crate(board() + "[crate.board.enabled]\n")),
        ["enabled must be a boolean, got table"],
    ),
    "missing board key": (bad_board(slot=None), ["board MDIG1", "missing required key 'slot'"]),
    "missing board name": (bad_board(name=None), ["crate 01 board #1", "'name'"]),
    "missing crate id": ("[[crate]]\nseed = 1\n", ["crate #1", "missing required key 'crate'"]),
    # types
    "bool for int": (bad_board(card="true"), ["card must be an integer, got boolean true"]),
    "string for int": (bad_crate(keys='data_port = "9001"'), ["data_port", "string '9001'"]),
    "float for int": (bad_crate(keys="ca_port = 5064.0"), ["ca_port must be an integer"]),
    "int for bool": (bad_board(enabled="1"), ["enabled must be a boolean, got integer 1"]),
    "bool for float": (bad_sim("event_rate_hz = true"), ["event_rate_hz must be a number"]),
    "int for string": (bad_board(name="5"), ["name must be a string, got integer 5"]),
    "not finite": (sender("idle_wait_s = inf"), ["idle_wait_s must be a finite number"]),
    # crate ids
    "crate id three digits": (bad_crate(crate_id='"001"'), ["crate #1", "two digits", "'001'"]),
    "crate id letters": (bad_crate(crate_id='"A1"'), ["two digits", "'A1'"]),
    "crate id int too big": (bad_crate(crate_id="100"), ["two digits", "100"]),
    "crate id bool": (bad_crate(crate_id="true"), ["crate id", "true"]),
    "duplicate crate": (system(crate(), crate(board(package_data="102"))), ["duplicate crate 01"]),
    # boards within a crate
    "duplicate card": (
        system(crate(board(), board(name='"MDIG2"', slot="4", package_data="102"))),
        ["crate 01", "duplicate card 0 (MDIG1, MDIG2)"],
    ),
    "duplicate slot": (
        system(crate(board(), board(name='"MDIG2"', card="1", package_data="102"))),
        ["crate 01", "duplicate slot 3 (MDIG1, MDIG2)"],
    ),
    "duplicate name": (
        system(crate(board(), board(card="1", slot="4", package_data="102"))),
        ["crate 01: duplicate name MDIG1 (cards 0, 1)"],
    ),
    "duplicate package data": (
        system(crate(board(), board(name='"MDIG2"', card="1", slot="4"))),
        ["crate 01: duplicate package_data 101 (MDIG1, MDIG2)"],
    ),
    "package data across crates": (
        system(
            crate(keys="ca_port = 5100\npva_port = 5101\ndata_port = 9100"),
            crate(crate_id='"02"', keys="ca_port = 5102\npva_port = 5103\ndata_port = 9102"),
            keys='globals = "remote"\nglobals_ca = "127.0.0.1:5070"',
        ),
        ["duplicate package_data 101 (crate 01 MDIG1, crate 02 MDIG1)"],
    ),
    "two triggers": (
        system(
            crate(
                board(name='"MTRG"', kind='"trigger_master"'),
                board(
                    name='"MTRG2"', kind='"trigger_master"', card="1", slot="4", package_data="102"
                ),
            )
        ),
        ["crate 01", "at most one trigger_master", "MTRG, MTRG2"],
    ),
    "card too big": (bad_board(card="7"), ["board MDIG1", "card must be 0..6, got 7"]),
    "card negative": (bad_board(card="-1"), ["card must be 0..6, got -1"]),
    "slot zero": (bad_board(slot="0"), ["slot must be 1..7, got 0"]),
    "slot too big": (bad_board(slot="8"), ["slot must be 1..7, got 8"]),
    "package data 4095": (bad_board(package_data="4095"), ["package_data must be 0..4094"]),
    "unknown kind": (
        bad_board(kind='"router"'),
        ["kind must be one of 'digitizer_master', 'digitizer_slave', 'trigger_master'", "'router'"],
    ),
    "name X": (bad_board(name='"X"'), ["crate 01 board #1", "name must not be 'X'"]),
    "name digit first": (bad_board(name='"1DIG"'), ["name must be a PV name part", "'1DIG'"]),
    "name punctuation": (bad_board(name='"MD-1"'), ["PV name part", "'MD-1'"]),
    "name too long": (bad_board(name='"' + "M" * 37 + '"'), ["at most 36 characters"]),
    "fifo_num 16": (bad_board(fifo_num="16"), ["fifo_num must be 0..15, got 16"]),
    # simulation
    "rate too high": (bad_sim("event_rate_hz = 1_000_001"), ["event_rate_hz must be 0..1000000"]),
    "rate negative": (bad_sim("event_rate_hz = -1"), ["event_rate_hz must be 0..1000000"]),
    "odd trace": (
        bad_sim("trace_samples = 201"),
        ["trace_samples must be a multiple of 2, got 201"],
    ),
    "long trace": (bad_sim("trace_samples = 994"), ["trace_samples must be 0..992, got 994"]),
    "header type": (bad_sim('header_type = "TRAP"'), ["header_type must be 'LED' or 'CFD'"]),
    "small fifo": (bad_sim("fifo_words = 1008"), ["fifo_words must be 1024..", "1008"]),
    "odd fifo": (bad_sim("fifo_words = 1032"), ["fifo_words must be a multiple of 16, got 1032"]),
    # crate keys
    "data port too big": (bad_crate(keys="data_port = 65536"), ["data_port must be 0..65535"]),
    "ca port zero": (bad_crate(keys="ca_port = 0"), ["crate 01", "ca_port must be 1..65535"]),
    "pva port too big": (bad_crate(keys="pva_port = 70000"), ["pva_port must be 1..65535"]),
    "backend": (
        bad_crate(keys='backend = "vme"'),
        ['crate 01: backend must be "sim", "sim-inprocess", "replay", "module:Class"', "'vme'"],
    ),
    "replay without source": (
        bad_crate(keys='backend = "replay"'),
        ['crate 01: backend "replay" needs [crate.replay] source = "<run directory or files>"'],
    ),
    "replay speed word": (
        replay('source = "runs/run00042"\nspeed = "fast"'),
        ["crate 01 [crate.replay]: speed must be a number 0..1e+06 or \"max\", got string 'fast'"],
    ),
    "replay speed negative": (
        replay('source = "r"\nspeed = -2'), ['speed must be a number 0..1e+06 or "max", got -2']
    ),
    "replay source type": (
        replay("source = 42"), ["[crate.replay]: source must be a path or an array of paths"]
    ),
    "replay source empty": (replay("source = []"), ["source must name at least one file"]),
    "replay unknown key": (
        replay('sorce = "r"'), ["[crate.replay]: unknown key 'sorce' (did you mean 'source'?)"]
    ),
    "replay loop": (replay('source = "r"\nloop = "yes"'), ["loop must be a boolean"]),
    "replay fifo": (replay('source = "r"\nfifo_words = 100'), ["fifo_words must be 1024.."]),
    "backend module missing": (
        bad_crate(keys='backend = "no_such_driver:Crate"'),
        ["crate 01: backend cannot be loaded: module no_such_driver not found"],
    ),
    "backend class missing": (
        bad_crate(keys='backend = "json:Crate"'),
        ["backend cannot be loaded: module json has no Crate", "'json:Crate'"],
    ),
    "sim process": (
        bad_crate(keys='sim_process = "fork"'), ["crate 01: sim_process must be", "'fork'"]
    ),
    "sim window path": (
        bad_crate(keys='sim_window = "../etc/x"'), ["sim_window must be a file name"]
    ),
    "host empty": (bad_crate(keys='host = ""'), ["host must be a host name"]),
    "data_bind spaces": (bad_crate(keys='data_bind = "my host"'), ["data_bind must be a host"]),
    "data_bind bad address": (
        bad_crate(keys='data_bind = "999.1.1.1"'),
        ["crate 01: data_bind must be a host name or IPv4 address, got '999.1.1.1'"],
    ),
    "host three numbers": (bad_crate(keys='host = "10.1.2"'), ["host must be a host name"]),
    "globals_ca bad address": (
        system(keys='globals_ca = "127.0.0.256:5064"'),
        ['globals_ca must be "host:port"'],
    ),
    "seed negative": (bad_crate(keys="seed = -1"), ["seed must be 0.."]),
    # system keys
    "globals": (system(keys='globals = "lcoal"'), ["[system]", "globals must be 'local' or"]),
    "globals_ca no port": (system(keys='globals_ca = "127.0.0.1"'), ['"host:port"']),
    "globals_ca port 0": (system(keys='globals_ca = "127.0.0.1:0"'), ["globals_ca", "1..65535"]),
    "globals_ca bad port": (system(keys='globals_ca = "h:ca"'), ["globals_ca", "'h:ca'"]),
    "state_dir empty": (system(keys='state_dir = ""'), ["state_dir must not be empty"]),
    "run_protect a string": (
        system(keys='run_protect = "yes"'), ["[system]", "run_protect must be a boolean"]
    ),
    "run_protect a number": (system(keys="run_protect = 1"), ["run_protect must be a boolean"]),
    # sender
    "reply too small": (sender("max_reply_bytes = 2047"), ["max_reply_bytes must be 2048.."]),
    "reply too big": (sender("max_reply_bytes = 10_000_001"), ["..10000000, got 10000001"]),
    "idle wait negative": (sender("idle_wait_s = -0.1"), ["idle_wait_s must be >= 0"]),
    "accept delay negative": (sender("accept_delay_s = -1"), ["accept_delay_s must be >= 0"]),
    "segment small": (sender("max_segment = 535"), ["max_segment must be 0 (OS default) or 536"]),
    "segment big": (sender("max_segment = 65536"), ["max_segment", "65536"]),
    "idle timeout zero": (sender("idle_timeout_s = 0"), ["idle_timeout_s must be > 0"]),
    "delivery timeout": (sender("delivery_timeout_s = -5"), ["delivery_timeout_s must be >= 0"]),
    "retention budget": (sender("retain_mib = 195"), ["retain_mib must be 1..190"]),
    "allowed receivers": (
        bad_crate('allowed_receivers = ["10.0.0.0/8", "10.999.0.0/16"]'),
        ["allowed_receivers holds '10.999.0.0/16', which is not an address or CIDR network"],
    ),
    "allowed receivers type": (bad_crate('allowed_receivers = "10.0.0.0/8"'),
                               ["allowed_receivers must be an array"]),
    # inloop
    "threshold small": (inloop("read_threshold_bytes = 0"), ["read_threshold_bytes must be 4.."]),
    "threshold big": (inloop("read_threshold_bytes = 1048580"), ["..1048576, got 1048580"]),
    "threshold odd": (inloop("read_threshold_bytes = 6"), ["must be a multiple of 4, got 6"]),
    "latency zero": (inloop("max_latency_s = 0"), ["max_latency_s must be > 0"]),
    "drain zero": (inloop("drain_timeout_s = 0.0"), ["drain_timeout_s must be > 0"]),
    "free buffers 0": (inloop("min_free_buffers = 0"), ["min_free_buffers must be 1..199"]),
    "free buffers 200": (inloop("min_free_buffers = 200"), ["min_free_buffers must be 1..199"]),
    "realtime 99": (inloop("realtime_priority = 99"), ["realtime_priority must be 0..98, got 99"]),
    "sim realtime": (bad_crate(keys="sim_realtime_priority = -1"),
                     ["sim_realtime_priority must be 0..98, got -1"]),
    "switch interval": (inloop("run_switch_interval_s = 0.5"), ["run_switch_interval_s must be"]),
    # ports and globals across crates
    "data port equals ca port": (
        bad_crate(keys="ca_port = 9001"),
        ["crate 01 data_port 9001 clashes with crate 01 ca_port"],
    ),
    "same data port on one host": (
        system(
            crate(keys="ca_port = 5100\npva_port = 5101"),
            crate(
                board(package_data="201"),
                crate_id='"02"',
                keys='ca_port = 5102\npva_port = 5103\nhost = "localhost"',
            ),
            keys='globals = "remote"\nglobals_ca = "127.0.0.1:5070"',
        ),
        ["crate 02 data_port 9001 clashes with crate 01 data_port"],
    ),
    "default CA ports on one host": (
        system(
            crate(),
            crate(board(package_data="201"), crate_id='"02"', keys="data_port = 9002"),
            keys='globals = "remote"\nglobals_ca = "127.0.0.1:5070"',
        ),
        ["crate 02 ca_port 5064 clashes with crate 01 ca_port"],
    ),
    "remote globals on a crate port": (
        system(keys='globals = "remote"'),
        ["globals_ca 127.0.0.1:5064 clashes with crate 01 ca_port", "--globals-only"],
    ),
    "local globals with two crates": (
        second_crate("data_port = 9003\nsample_port = 9004", system_keys=""),
        ["globals = 'local' with 2 crates", "'remote'"],
    ),
    "a data port on another crate's sample port": (
        second_crate("data_port = 9002"),
        ["crate 02 data_port 9002 clashes with crate 01 sample_port on"],
    ),
    "the sampling PVA port on the CA port": (
        bad_crate(keys="sample_pva_port = 5064"),
        ["crate 01 sample_pva_port 5064 clashes with crate 01 ca_port"],
    ),
}


@pytest.mark.parametrize("text, fragments", CASES.values(), ids=CASES.keys())
def test_each_rule_names_the_problem(text, fragments):
    message = problem(text)
    for fragment in fragments:
        assert fragment in message


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[system]\n")
    with pytest.raises(ConfigError, match=r"binary\.toml: not UTF-8"):
        load_config(binary)
    typo = tmp_path / "typo.toml"
    typo.write_text(system(crate(board(sloot="3"))))
    with pytest.raises(ConfigError, match=r"typo\.toml: crate 01 board MDIG1: unknown key 'sloot'"):
        load_config(typo)


def test_a_byte_order_mark_is_accepted(tmp_path):
    marked = tmp_path / "notepad.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + system(crate(board(enabled="true"))).encode())
    loaded = load_config(marked)
    assert loaded.crate("01").boards[0].name == "MDIG1"
    assert loaded.crate("01").warnings == ()


WARNINGS = {
    "integer crate id": (
        crate(board(enabled="true"), crate_id="2"),
        'crate 02: crate = 2 is an integer; write the two-digit string crate = "02"',
    ),
    "no boards": ('[[crate]]\ncrate = "01"\n', "crate 01: no [[crate.board]]"),
    "every board disabled": (
        crate(board(enabled="false"), board(name='"MDIG2"', card="1", slot="4", package_data="2")),
        "crate 01: every board is disabled (enabled = false)",
    ),
}


@pytest.mark.parametrize("text, expected", WARNINGS.values(), ids=WARNINGS.keys())
def test_probably_unintended_crates_load_with_one_line_warnings(text, expected):
    (only,) = parse_config(system(text), SOURCE).crates
    (warning,) = only.warnings
    assert warning.startswith(f"{SOURCE}: ") and expected in warning and "\n" not in warning


def test_intended_crates_have_no_warnings():
    assert all(not c.warnings for c in load_config(EXAMPLES / "three-crates.toml").crates)
    assert not demo_config().crates[0].warnings
    assert not parse_config(system(crate(board(enabled="true"))), SOURCE).crates[0].warnings


@pytest.mark.parametrize("written", ['"01"', '"1"', "1"])
def test_crate_id_is_zero_padded(written):
    assert parse_config(bad_crate(crate_id=written), SOURCE).crates[0].crate == "01"


def test_select_a_crate_of_several():
    three = load_config(EXAMPLES / "three-crates.toml")
    for wanted in ("02", 2, "2"):
        assert three.crate(wanted).crate == "02"
    with pytest.raises(ConfigError, match=r"3 crates \(01, 02, 03\): choose one with --crate"):
        three.crate(None)
    with pytest.raises(ConfigError, match=r"no crate '04' \(crates: 01, 02, 03\)"):
        three.crate("04")
    with pytest.raises(ConfigError, match="two digits"):
        three.crate("x2")


def test_overrides_change_only_the_selected_crate():
    three = load_config(EXAMPLES / "three-crates.toml")
    changed, chosen = with_overrides(
        three, "02", data_port=0, ca_port=5200, pva_port=5201, state_dir="/tmp/state"
    )
    assert (chosen.crate, chosen.data_port, chosen.ca_port, chosen.pva_port) == (
        "02",
        0,
        5200,
        5201,
    )
    assert changed.crate("02") == chosen
    assert changed.crate("01") == three.crate("01") and changed.crate("03") == three.crate("03")
    assert changed.state_dir == "/tmp/state" and changed.globals == "remote"
    assert three.crate("02").data_port == 9002
    assert with_overrides(three, "03") == (three, three.crate("03"))


def test_overrides_may_run_one_crate_of_many_standalone():
    three = load_config(EXAMPLES / "three-crates.toml")
    changed, chosen = with_overrides(three, "01", globals="local", globals_ca="127.0.0.1:5300")
    assert changed.globals == "local" and changed.globals_endpoint == ("127.0.0.1", 5300)
    assert chosen == three.crate("01")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"data_port": 70000}, ["crate 01: data_port must be 0..65535, got 70000"]),
        ({"ca_port": 0}, ["ca_port must be 1..65535"]),
        ({"pva_port": "5075"}, ["pva_port must be an integer, got string '5075'"]),
        ({"globals": "global"}, ["globals must be 'local' or 'remote'"]),
        ({"globals_ca": "nohost"}, ['globals_ca must be "host:port"']),
        ({"state_dir": " "}, ["state_dir must not be empty"]),
        ({"ca_port": 9001}, ["data_port 9001 clashes with crate 01 ca_port"]),
    ],
)
def test_bad_overrides_name_the_problem(overrides, fragments):
    with pytest.raises(ConfigError) as caught:
        with_overrides(demo_config(), None, **overrides)
    message = str(caught.value)
    assert message.startswith("demo with command-line overrides: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_override_that_clashes_with_another_crate():
    three = load_config(EXAMPLES / "three-crates.toml")
    with pytest.raises(ConfigError, match="crate 02 ca_port 5064 clashes with crate 01 ca_port"):
        with_overrides(three, "02", ca_port=5064)
    with pytest.raises(ConfigError, match=r"globals_ca 127\.0\.0\.1:5066 clashes with crate 02"):
        with_overrides(three, "01", globals_ca="127.0.0.1:5066")


def test_configs_are_frozen():
    demo = demo_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo.crates[0].data_port = 1  # type: ignore[misc]


sims = st.builds(
    SimBoardConfig,
    event_rate_hz=st.floats(0, 1_000_000, allow_nan=False),
    trace_samples=st.integers(0, 496).map(lambda half: 2 * half),
    header_type=st.sampled_from([7, 8]),
    fifo_words=st.integers(64, 4096).map(lambda n: 16 * n),
)
senders = st.builds(
    SenderConfig,
    max_reply_bytes=st.integers(2048, 10_000_000),
    idle_wait_s=st.floats(0, 10),
    accept_delay_s=st.floats(0, 10),
    max_segment=st.one_of(st.just(0), st.integers(536, 65535)),
    idle_timeout_s=st.floats(1e-3, 1e3),
    delivery_timeout_s=st.floats(1e-3, 1e3),
)


@settings(max_examples=60, deadline=None)
@given(sim=sims, sender_config=senders, enabled=st.booleans(), fifo_num=st.integers(0, 15))
def test_any_valid_system_round_trips(sim, sender_config, enabled, fifo_num):
    demo = demo_config()
    boards = tuple(
        dataclasses.replace(b, sim=sim, enabled=enabled, fifo_num=fifo_num)
        for b in demo.crates[0].boards
    )
    changed = dataclasses.replace(demo.crates[0], sender=sender_config, boards=boards)
    original = SystemConfig(crates=(changed,), source="generated")
    assert parse_config(dump_config(original), "dumped") == original

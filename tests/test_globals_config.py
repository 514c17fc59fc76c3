"""Where the globals IOC serves PV Access and where autosaved values go, from the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from ioc.config import (
    ConfigError,
    default_state_dir,
    demo_config,
    load_config,
    parse_config,
    with_overrides,
)
from ioc.main import globals_ports, parse_args
from runctl.operator import Endpoint, globals_endpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BOARD = """
[[crate.board]]
name = "MDIG1"
kind = "digitizer_master"
card = 0
slot = 3
package_data = {package_data}
"""


def remote_system(system_keys: str, *crates: str) -> str:
    """A system with remote globals on 127.0.0.1:5070 and the given crate keys."""
    text = f'[system]\nglobals = "remote"\nglobals_ca = "127.0.0.1:5070"\n{system_keys}\n'
    for number, keys in enumerate(crates, 1):
        text += f'[[crate]]\ncrate = "{number:02d}"\n{keys}\n'
        text += BOARD.format(package_data=100 * number + 1)
    return text


def test_the_globals_pva_port_defaults_to_the_standard_port_on_the_globals_host():
    system = parse_config(remote_system("", "ca_port = 5100\npva_port = 5101"), "t.toml")
    assert system.globals_pva is None
    assert system.globals_pva_endpoint == ("127.0.0.1", 5075)
    assert globals_endpoint(system) == Endpoint("127.0.0.1", 5075)


def test_a_configured_globals_pva_is_where_ioc_operator_and_system_look():
    three = load_config(EXAMPLES / "three-crates.toml")
    assert three.globals_pva_endpoint == ("127.0.0.1", 5071)
    assert globals_endpoint(three) == Endpoint("127.0.0.1", 5071)
    assert globals_endpoint(three, "10.0.0.9:6000") == Endpoint("10.0.0.9", 6000)
    args = parse_args(["--globals-only", "--config", str(EXAMPLES / "three-crates.toml")])
    assert globals_ports(three, args) == {
        "EPICS_CA_SERVER_PORT": "5070",
        "EPICS_PVAS_SERVER_PORT": "5071",
        "EPICS_PVA_SERVER_PORT": "5071",
    }


def test_command_line_ports_win_and_without_a_file_the_environment_decides():
    three = load_config(EXAMPLES / "three-crates.toml")
    args = parse_args(
        ["--globals-only", "--config", "x.toml", "--ca-port", "6000", "--pva-port", "6001"]
    )
    assert globals_ports(three, args)["EPICS_CA_SERVER_PORT"] == "6000"
    assert globals_ports(three, args)["EPICS_PVAS_SERVER_PORT"] == "6001"
    assert globals_ports(three, parse_args(["--globals-only", "--demo"])) == {}


def test_a_globals_pva_port_taken_by_a_crate_names_the_fix():
    text = remote_system("", "ca_port = 5100")  # the crate's PVA port is the default 5075
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.toml")
    assert str(caught.value) == (
        "t.toml: globals_pva 127.0.0.1:5075 (the default) clashes with crate 01 pva_port; "
        'give the globals IOC a PV Access port of its own with [system] globals_pva = "host:port"'
    )
    fixed = parse_config(remote_system('globals_pva = "127.0.0.1:5071"', "ca_port = 5100"), "t")
    assert fixed.globals_pva_endpoint == ("127.0.0.1", 5071)
    other_host = remote_system('globals_pva = "daq2:5075"', "ca_port = 5100")
    assert parse_config(other_host, "t").globals_pva_endpoint == ("daq2", 5075)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('globals_pva = "127.0.0.1:5070"', "globals_pva 127.0.0.1:5070 clashes with globals_ca"),
        ('globals_pva = "127.0.0.1:9001"', "globals_pva 127.0.0.1:9001 clashes with crate 01"),
        ('globals_pva = "5071"', 'globals_pva must be "host:port"'),
        ("globals_pva = 5071", "globals_pva must be a string, got integer 5071"),
    ],
)
def test_bad_globals_pva_values_are_named(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(remote_system(keys, "ca_port = 5100\npva_port = 5101"), "t.toml")


def test_only_the_file_of_a_globals_ioc_must_keep_globals_pva_free():
    text = remote_system("", "").replace('"remote"', '"local"')
    assert parse_config(text, "t.toml").globals_pva_endpoint == ("127.0.0.1", 5075)
    # A crate told on its command line to follow remote globals never uses their PVA port.
    system, crate = with_overrides(
        demo_config(), None, globals="remote", globals_ca="127.0.0.1:5300"
    )
    assert system.globals_pva_endpoint == ("127.0.0.1", 5075) and crate.pva_port is None


def test_the_default_state_directory_is_per_user_and_fixed(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "dgs-crate-ioc"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "dgs-crate-ioc"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.chdir(tmp_path)
    system = parse_config(remote_system("", "ca_port = 5100\npva_port = 5101"), "t.toml")
    assert system.state_dir is None
    assert system.state_directory == tmp_path / "home" / ".local" / "state" / "dgs-crate-ioc"


def test_a_relative_state_dir_in_a_file_is_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "site" / "system.toml"
    config.parent.mkdir()
    crate = "ca_port = 5100\npva_port = 5101"
    for given, expected in (
        ("autosave", tmp_path / "site" / "autosave"),
        ("/var/lib/dgs", Path("/var/lib/dgs")),
        ("~/dgs-state", tmp_path / "home" / "dgs-state"),
    ):
        config.write_text(remote_system(f'state_dir = "{given}"', crate))
        assert load_config(config).state_directory == expected

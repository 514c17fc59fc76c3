"""Start-up refuses a second IOC of a crate and every port it could not serve on.

Each refusal is what a user sees: exit code 2 within 10 s, one line naming
the port, the setting or the other IOC, and the IOC already running keeps
serving. Ports are held by real sockets of the test, IOCs are real processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import subprocess
from pathlib import Path

import pytest
from ioc_harness import IocProcess, Ports, wait_until
from p4p.client.thread import Context

REFUSED_WITHIN_S = 10.0


def refusal(ioc: IocProcess) -> str:
    """The one line of an IOC that refused to start: exit 2 within 10 s of its launch."""
    assert ioc.proc is not None
    try:
        code = ioc.proc.wait(REFUSED_WITHIN_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {REFUSED_WITHIN_S} s:\n{ioc.log()}") from None
    lines = [line for line in ioc.log().splitlines() if line.strip()]
    assert code == 2, ioc.log()
    assert len(lines) == 1 and lines[0].startswith("dgs-ioc: "), ioc.log()
    return lines[0]


def state_dir(ioc: IocProcess) -> str:
    return ioc.args[ioc.args.index("--state-dir") + 1]


def still_serving(ioc: IocProcess) -> None:
    """The first IOC is untouched and takes the puts: nothing went to the refused one."""
    assert ioc.proc is not None and ioc.proc.poll() is None
    ioc.put_ok("Online_CS_SaveData", "Save")
    assert ioc.get("Online_CS_SaveData") == "Save"
    assert ioc.get("DAQC01_CV_State") == "Stopped"


def test_second_demo_on_the_same_ports_is_refused_naming_the_first(start_ioc, tmp_path):
    first = start_ioc("--demo")
    second = start_ioc(
        "--demo", "--state-dir", str(tmp_path / "elsewhere"), ports=first.ports, wait_ready=False
    )
    line = refusal(second)
    assert "crate 01" in line
    # Whichever search answers first names the first IOC: by its CA or its PVA port.
    assert any(f"127.0.0.1:{port}" in line for port in (first.ports.ca, first.ports.pva)), line
    still_serving(first)


def test_second_demo_sharing_the_state_directory_on_other_ports_is_refused(start_ioc):
    first = start_ioc("--demo")
    assert first.proc is not None
    second = start_ioc("--demo", "--state-dir", state_dir(first), wait_ready=False)
    line = refusal(second)
    assert f"pid {first.proc.pid}" in line
    assert f"CA port {first.ports.ca}, PVA port {first.ports.pva}" in line
    assert "DAQC01.lock" in line
    still_serving(first)


@pytest.mark.parametrize("protocol", ["CA", "PVA"])
def test_second_demo_on_other_ports_where_its_clients_look_is_refused(start_ioc, protocol):
    """The address lists a client on this host uses name both IOCs: they would see both."""
    first = start_ioc("--demo")
    if protocol == "CA":
        searched = f"127.0.0.1:{first.ports.ca}"
        client_env = {"EPICS_CA_ADDR_LIST": f"127.0.0.1 {searched}"}
        server = searched
    else:
        searched = f"127.0.0.1:{first.ports.pva_broadcast}"
        client_env = {"EPICS_PVA_ADDR_LIST": f"127.0.0.1 {searched}"}
        server = f"127.0.0.1:{first.ports.pva}"
    second = start_ioc("--demo", wait_ready=False, extra_env=client_env)
    line = refusal(second)
    assert f"serves crate 01 at {server}" in line
    assert f"DAQC01_CV_State answered a {protocol} search at {searched}" in line
    still_serving(first)


HELD_PORTS = {
    "CA TCP": ("ca", socket.SOCK_STREAM, "CA server port {} (TCP)"),
    "CA UDP": ("ca", socket.SOCK_DGRAM, "CA server port {} (UDP)"),
    "PVA TCP": ("pva", socket.SOCK_STREAM, "PVA server port {} (TCP)"),
    "PVA UDP": ("pva_broadcast", socket.SOCK_DGRAM, "PVA broadcast port {} (UDP)"),
    "data TCP": ("data", socket.SOCK_STREAM, "data port {} (TCP)"),
}


@pytest.mark.parametrize("held", HELD_PORTS, ids=list(HELD_PORTS))
def test_a_port_held_by_another_program_is_refused_naming_it(start_ioc, held):
    field, kind, named = HELD_PORTS[held]
    ports = Ports.allocate()
    port = getattr(ports, field)
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        ioc = start_ioc("--demo", ports=ports, wait_ready=False)
        line = refusal(ioc)
    assert named.format(port) in line and "already" in line


def test_the_ports_a_host_shares_are_no_conflict(start_ioc, tmp_path):
    """Crate 02 next to the demo, with a CA repeater port in use and the demo's PVA
    broadcast port (every PVA process of a host shares it): it starts."""
    first = start_ioc("--demo")
    shared = dataclasses.replace(
        Ports.allocate(),
        ca_repeater=first.ports.ca_repeater,
        pva_broadcast=first.ports.pva_broadcast,
    )
    config = tmp_path / "crate02.toml"
    follow_the_demo = "\n".join(
        [
            'globals = "remote"',
            f'globals_ca = "127.0.0.1:{first.ports.ca}"',
            f'globals_pva = "127.0.0.1:{first.ports.pva}"',
        ]
    )
    config.write_text(
        one_crate_toml('crate = "02"', 'data_bind = "127.0.0.1"', system=follow_the_demo)
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stand_in:
        with contextlib.suppress(OSError):  # else the demo's CA repeater holds it already
            stand_in.bind(("127.0.0.1", shared.ca_repeater))
        second = start_ioc("--config", str(config), ports=shared)
    assert second.get("DAQC02_CV_State") == "Stopped"
    assert first.get("DAQC01_CV_State") == "Stopped"


def test_a_lock_left_by_a_killed_ioc_does_not_block_its_restart(start_ioc):
    first = start_ioc("--demo")
    first.kill()
    again = start_ioc("--demo", "--state-dir", state_dir(first), ports=first.ports)
    assert again.get("DAQC01_CV_State") == "Stopped"


def test_second_globals_ioc_is_refused(start_ioc, tmp_path):
    first = start_ioc("--demo", "--globals-only")
    second = start_ioc(
        "--demo",
        "--globals-only",
        "--state-dir",
        str(tmp_path / "elsewhere"),
        ports=first.ports,
        wait_ready=False,
    )
    line = refusal(second)
    assert "global run-control records" in line
    # Whichever search answers first names the first IOC: by its CA or its PVA port.
    assert any(f"127.0.0.1:{port}" in line for port in (first.ports.ca, first.ports.pva)), line
    assert first.get("Online_CS_StartStop") == "Stop"


def banner_ports(ioc: IocProcess) -> tuple[int, int, int]:
    """CA, PVA and data port as the banner prints them."""
    log = ioc.log()
    served = re.search(r"on CA port (\d+), PVA port (\d+)", log)
    data = re.search(r"data service on 127\.0\.0\.1:(\d+) ", log)
    assert served and data, log
    return int(served[1]), int(served[2]), int(data[1])


def test_banner_prints_the_ports_really_in_use(demo_ioc):
    ca, pva, data = banner_ports(demo_ioc)
    assert (ca, pva, data) == (demo_ioc.ports.ca, demo_ioc.ports.pva, demo_ioc.ports.data)
    pinned = dataclasses.replace(demo_ioc.ports, ca=ca, pva=pva)
    assert IocProcess([], demo_ioc.workdir, pinned).get("DAQC01_CV_State") == "Stopped"
    # PV Access straight to the printed TCP port, no UDP search.
    conf = {"EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{pva}", "EPICS_PVA_AUTO_ADDR_LIST": "NO"}
    context = Context("pva", conf=conf, useenv=False)
    try:
        state = context.get("DAQC01_CV_State", timeout=10.0).raw.value
        assert state.choices[state.index] == "Stopped"
    finally:
        context.close()


def test_data_port_zero_starts_and_says_when_the_port_is_chosen(start_ioc):
    ioc = start_ioc("--demo", "--data-port", "0")
    assert "data service on 127.0.0.1, on a port the system picks" in ioc.log()
    assert ioc.get("DAQC01_CV_State") == "Stopped"


def one_crate_toml(*crate_keys: str, board: str = "enabled = true", system: str = "") -> str:
    """A system of one crate with ``crate_keys`` and one board (none if ``board`` is empty)."""
    lines = ["[system]", system, "[[crate]]", *crate_keys]
    if board:
        lines += [
            "[[crate.board]]",
            'name = "MDIG1"',
            'kind = "digitizer_master"',
            "card = 0",
            "slot = 3",
            "package_data = 201",
            board,
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (['data_bind = "999.1.1.1"'], "data_bind must be a host name or IPv4 address"),
        (['data_bind = "192.0.2.1"', "data_port = 0"], "data_bind 192.0.2.1 is not an address"),
    ],
    ids=["not an address", "not this host"],
)
def test_a_data_bind_the_ioc_cannot_use_is_refused_naming_the_key(
    start_ioc, tmp_path: Path, keys, named
):
    config = tmp_path / "crate.toml"
    config.write_text(one_crate_toml('crate = "01"', *keys))
    ioc = start_ioc("--config", str(config), wait_ready=False)
    assert named in refusal(ioc)


def test_probably_unintended_configuration_warns_and_starts(start_ioc, tmp_path):
    config = tmp_path / "crate.toml"
    config.write_text(one_crate_toml("crate = 3", 'data_bind = "127.0.0.1"', board=""))
    ioc = start_ioc("--config", str(config))
    warnings = [line for line in ioc.log().splitlines() if line.startswith("dgs-ioc: warning:")]
    assert len(warnings) == 2, ioc.log()
    assert 'crate = 3 is an integer; write the two-digit string crate = "03"' in warnings[0]
    assert "no [[crate.board]]" in warnings[1]
    wait_until(lambda: ioc.get("DAQC03_CV_State") == "Stopped", 10, "crate 03 serving")

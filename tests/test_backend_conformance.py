"""Backends against the contract of `ioc.hardware`, and a plug-in loaded by a running IOC.

The crate process, the in-process simulator, the replay backend (on a recording
written by hand) and a third-party-style backend (`fixed_words_backend`, loaded as
"module:Class") pass the same conformance suite; the plug-in then serves a
real `dgs-ioc` through a Start/Stop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_conformance import BackendConformance
from dataflow import CRATE, DEMO_SPECS, TRIGGER_SPEC, crate_toml, start_run, stop_run
from replay_files import crate_packets, write_board_layout

from ioc import backends
from ioc.config import BoardConfig, CrateConfig, ReplayConfig, SimBoardConfig, demo_config
from ioc.hardware import BoardKind, Crate

TESTS = Path(__file__).resolve().parent
PLUGIN = "fixed_words_backend:FixedWordsCrate"


def demo_with_trigger(backend: str) -> CrateConfig:
    """The demo crate's digitizers and a master trigger, on ``backend``."""
    demo = demo_config().crates[0]
    trigger = BoardConfig(
        name="MTRG",
        kind=BoardKind.TRIGGER_MASTER,
        card=4,
        slot=2,
        package_data=110,
        sim=SimBoardConfig(event_rate_hz=2000.0),
    )
    return dataclasses.replace(demo, backend=backend, boards=(*demo.boards, trigger))


class TestSimInProcess(BackendConformance):
    @pytest.fixture
    def crate(self) -> Crate:
        return backends.build(demo_with_trigger("sim-inprocess"))


class TestReplay(BackendConformance):
    @pytest.fixture
    def crate(self, tmp_path: Path) -> Iterator[Crate]:
        config = demo_with_trigger("replay")
        boards = [b.package_data for b in config.boards if not b.kind.is_trigger]
        packets = crate_packets(boards, 110, seconds=1.0, rate_hz=2000)
        write_board_layout(tmp_path / "run00001", packets)
        replay = ReplayConfig(source=(str(tmp_path / "run00001"),), loop=True)
        crate = backends.build(dataclasses.replace(config, replay=replay))
        yield crate
        crate.close()


class TestSimCrateProcess(BackendConformance):
    """Backend "sim": the crate in its own process, read through the shared window."""

    @pytest.fixture
    def crate(self) -> Iterator[Crate]:
        crate = backends.build(demo_with_trigger("sim"))
        yield crate
        crate.close()


class TestModuleClassPlugin(BackendConformance):
    @pytest.fixture
    def crate(self) -> Crate:
        return backends.build(demo_with_trigger(PLUGIN))


def test_sim_names_build_the_simulator_and_only_it_has_sim_controls() -> None:
    for name in backends.SIM_NAMES:
        crate = backends.build(demo_with_trigger(name))
        assert backends.simulated(crate)
        crate.close()
    assert not backends.simulated(backends.build(demo_with_trigger(PLUGIN)))


def test_an_entry_point_name_resolves_to_its_factory(tmp_path: Path, monkeypatch) -> None:
    """A package registering ``fixed-words`` under the group, as its pyproject would."""
    metadata = tmp_path / "mylab_backends-1.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Name: mylab-backends\nVersion: 1.0\n")
    (metadata / "entry_points.txt").write_text(
        f"[{backends.ENTRY_POINT_GROUP}]\nfixed-words = {PLUGIN}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    crate = backends.build(demo_with_trigger("fixed-words"))
    assert [board.identity.name for board in crate.boards] == [
        "MDIG1", "MDIG2", "MDIG3", "MDIG4", "MTRG"
    ]
    assert backends.problem("not-registered") is not None


def test_a_plugin_backend_serves_an_ioc_through_a_run(start_ioc, tmp_path: Path) -> None:
    config = tmp_path / "plugin.toml"
    text = crate_toml((*DEMO_SPECS, TRIGGER_SPEC))
    config.write_text(text.replace('seed = 1\n', f'seed = 1\nbackend = "{PLUGIN}"\n', 1))
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ioc = start_ioc("--config", str(config), extra_env={"PYTHONPATH": pythonpath})

    assert ioc.get(f"VME{CRATE}:MTRG:USER_PACKAGE_DATA") == "110"
    missing = ioc.tool("caget", "-w", "1", f"VME{CRATE}:MDIG1:SIM_Generated")
    assert "not found" in missing.stdout + missing.stderr, "no SIM_* records without sim"
    start_run(ioc)
    ioc.wait_numeric(f"DAQC{CRATE}_OL_TotalBufsWritten", lambda v: v > 0, what="data read")
    stop_run(ioc)
    assert ioc.get(f"DAQC{CRATE}_CV_State") == "Stopped"


def test_an_unloadable_backend_stops_start_up_with_one_line(start_ioc, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(crate_toml().replace("seed = 1\n", 'seed = 1\nbackend = "nowhere:Crate"\n'))
    ioc = start_ioc("--config", str(config), wait_ready=False)
    assert ioc.proc.wait(30) == 2
    assert ioc.log().strip().splitlines() == [
        f"dgs-ioc: {config}: crate {CRATE}: backend cannot be loaded: "
        "module nowhere not found, got 'nowhere:Crate'"
    ]


def test_a_backend_that_cannot_be_built_stops_start_up_with_one_line(
    start_ioc, tmp_path: Path
) -> None:
    config = tmp_path / "unreachable.toml"
    backend = "fixed_words_backend:unreachable_crate"
    config.write_text(crate_toml().replace("seed = 1\n", f'seed = 1\nbackend = "{backend}"\n'))
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ioc = start_ioc("--config", str(config), wait_ready=False, extra_env={"PYTHONPATH": pythonpath})
    assert ioc.proc.wait(60) == 2
    assert ioc.log().strip().splitlines() == [
        f"dgs-ioc: crate {CRATE}: backend '{backend}' cannot be built: no VME bridge for crate 01"
    ]

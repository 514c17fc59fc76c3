"""Shared fixtures: real IOC processes on isolated loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ioc_harness import IocProcess, Ports


@pytest.fixture
def start_ioc(tmp_path: Path) -> Iterator[Callable[..., IocProcess]]:
    """Start `dgs-ioc` processes with the given arguments; all are ended afterwards."""
    started: list[IocProcess] = []

    def start(
        *args: str,
        ports: Ports | None = None,
        wait_ready: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> IocProcess:
        ports = ports or Ports.allocate()
        argv = list(args)
        if "--data-port" not in argv and "--globals-only" not in argv:
            argv += ["--data-port", str(ports.data)]
        if "--state-dir" not in argv:
            argv += ["--state-dir", str(tmp_path / f"state-{ports.ca}")]
        ioc = IocProcess(argv, tmp_path, ports, extra_env)
        started.append(ioc)
        return ioc.start(wait_ready=wait_ready)

    yield start
    for ioc in started:
        ioc.kill()


@pytest.fixture
def demo_ioc(start_ioc) -> IocProcess:
    """The bundled demonstration crate (crate 01, MDIG1..MDIG4)."""
    return start_ioc("--demo")


@pytest.fixture(scope="module")
def shared_demo_ioc(tmp_path_factory) -> Iterator[IocProcess]:
    """One demo crate shared by the read-only tests of a module (nothing may start a run)."""
    workdir = tmp_path_factory.mktemp("shared-ioc")
    ports = Ports.allocate()
    argv = ["--demo", "--data-port", str(ports.data), "--state-dir", str(workdir / "state")]
    ioc = IocProcess(argv, workdir, ports).start()
    yield ioc
    ioc.kill()

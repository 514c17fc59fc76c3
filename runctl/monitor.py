"""`dgs-monitor`: live rates, spectra and sampled events of a crate, from a terminal.

    dgs-monitor HOST[:PORT]                       rates per board and channel, live
    dgs-monitor HOST --spectrum MDIG1:3           a channel's spectrum in the terminal
    dgs-monitor HOST --spectrum 101:3 --png s.png the same as a PNG image
    dgs-monitor HOST --sample "board=101 ch=0-3 prescale=100"   sampled events

PORT is the IOC's PV Access port (5075 by default); everything is read over
PV Access from that one server (TCP name search), and the sampling service
from the port the IOC names in ``DAQC<NN>_SMP_PvaPort``. Rates come from the
per-channel ``VME<NN>:<board>:Rate<n>`` PVs; an IOC without them shows the
per-card data rates (``DAQC<NN>_OL_DataRate<n>``) instead. A spectrum comes
from ``VME<NN>:<board>:Spectrum<n>`` (keV, ``SpectrumKeVPerBin`` per bin); an
IOC without those PVs is sampled for ``--seconds`` and the energies (digitizer
units) are histogrammed here.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ioc.packets import TRIGGER_CHANNEL
from receiver.sampler import Sampler, context_for
from receiver.snapshot import list_pva_names

DEFAULT_PVA_PORT = 5075
CHANNELS = 10
#: Bins of the histogram made from sampled energies (digitizer units 0..16383).
SAMPLED_BINS = 4096
SAMPLED_RANGE = 16384


def address_of(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon:
        return f"{text}:{DEFAULT_PVA_PORT}"
    if not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST[:PORT]")
    return f"{host}:{port}"


class Crate:
    """What the monitor learns of one crate IOC over PV Access."""

    def __init__(self, address: str, crate: str | None, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self.ctx = context_for(address)
        names = list_pva_names(address, timeout)
        if crate is None:
            state = re.compile(r"DAQC(\d+)_CV_State")
            found = sorted({m.group(1) for n in names if (m := state.fullmatch(n))})
            if not found:
                raise RuntimeError(f"no crate IOC at {address}")
            crate = found[0]
        self.crate = crate
        self.boards = sorted(
            m.group(1) for n in names if (m := re.fullmatch(rf"VME{crate}:(\w+):CS_Ena", n))
        )
        self.names = set(names)

    def get(self, name: str):
        return self.ctx.get(name, timeout=self.timeout)

    def board_id(self, board: str) -> int:
        for suffix in ("user_package_data", "USER_PACKAGE_DATA"):
            name = f"VME{self.crate}:{board}:{suffix}"
            if name in self.names:
                return int(self.get(name))
        raise KeyError(board)

    def board_name(self, text: str) -> str:
        """A board by name (MDIG1) or by its board id (101)."""
        if text in self.boards:
            return text
        if text.isdigit():
            for board in self.boards:
                if self.board_id(board) == int(text):
                    return board
        raise ValueError(f"no board {text!r} in crate {self.crate} ({', '.join(self.boards)})")

    def sampler(self, sample_filter: str) -> Sampler:
        port = int(self.get(f"DAQC{self.crate}_SMP_PvaPort"))
        if not port:
            raise RuntimeError("the IOC serves no sampling service")
        host = self.address.rpartition(":")[0]
        return Sampler(f"{host}:{port}", self.crate, sample_filter, name="dgs-monitor")

    def close(self) -> None:
        self.ctx.close()


def rate_table(crate: Crate) -> str:
    """One table of the rates as they are now."""
    c = crate.crate
    boards = [b for b in crate.boards if f"VME{c}:{b}:Rate0" in crate.names]
    if boards:
        names = [f"VME{c}:{b}:Rate{n}" for b in boards for n in range(CHANNELS)]
        values = crate.ctx.get(names, timeout=crate.timeout)
        lines = [f"{'board':>8} " + "".join(f"{'ch' + str(n):>9}" for n in range(CHANNELS))
                 + f"{'total':>11}   (Hz)"]
        for row, board in enumerate(boards):
            rates = [float(v) for v in values[row * CHANNELS : (row + 1) * CHANNELS]]
            lines.append(f"{board:>8} " + "".join(f"{r:9.1f}" for r in rates)
                         + f"{sum(rates):11.1f}")
        return "\n".join(lines)
    cards = [f"DAQC{c}_OL_DataRate{n}" for n in range(7)]
    rates = crate.ctx.get(cards, timeout=crate.timeout)
    lines = ["(no per-channel Rate PVs on this IOC: data rate per card)",
             f"{'card':>5} {'kB/s':>10}"]
    lines += [f"{n:>5} {float(r):10.1f}" for n, r in enumerate(rates)]
    return "\n".join(lines)


def spectrum_of(
    crate: Crate, board: str, channel: int, seconds: float
) -> tuple[np.ndarray, float, str]:
    """(counts, bin width, unit): the IOC's spectrum PV, else sampled energies."""
    name = f"VME{crate.crate}:{board}:Spectrum{channel}"
    if name in crate.names:
        counts = np.asarray(crate.get(name), dtype=np.float64)
        width_pv = f"VME{crate.crate}:{board}:SpectrumKeVPerBin"
        width = float(crate.get(width_pv)) if width_pv in crate.names else 1.0
        return counts, width, "keV"
    counts = np.zeros(SAMPLED_BINS)
    with crate.sampler(f"board={crate.board_id(board)} ch={channel}") as sampler:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = sampler.next(50_000, wait=min(1.0, max(0.0, deadline - time.monotonic())))
            energy = batch.events["energy"]
            counts += np.histogram(energy, SAMPLED_BINS, (0, SAMPLED_RANGE))[0]
    return counts, SAMPLED_RANGE / SAMPLED_BINS, "digitizer units"


def draw(counts: np.ndarray, width: float, unit: str, columns: int = 72, rows: int = 16) -> str:
    """The spectrum as a bar chart of ``columns`` × ``rows`` characters."""
    used = np.flatnonzero(counts)
    last = int(used[-1]) + 1 if used.size else counts.size
    per = max(1, -(-last // columns))
    shown = counts[: per * columns].copy()
    shown.resize(per * columns)
    bars = shown.reshape(columns, per).sum(axis=1)
    top = bars.max() or 1.0
    heights = np.round(bars / top * rows).astype(int)
    lines = [
        "".join("#" if h >= level else " " for h in heights) for level in range(rows, 0, -1)
    ]
    lines.append("-" * columns)
    lines.append(f"0 .. {per * columns * width:g} {unit}, {per * width:g} {unit} per column, "
                 f"highest column {int(top)} counts, total {int(counts.sum())}")
    return "\n".join(lines)


def write_png(path: Path, counts: np.ndarray, height: int = 240) -> None:
    """The spectrum as a plain PNG bar chart (one pixel column per bin, log-free)."""
    used = np.flatnonzero(counts)
    last = max(int(used[-1]) + 1 if used.size else counts.size, 1)
    per = max(1, -(-last // 1024))
    shown = counts[: per * 1024].copy()
    shown.resize(per * 1024)
    bars = shown.reshape(1024, per).sum(axis=1)
    levels = np.round(bars / (bars.max() or 1.0) * (height - 1)).astype(int)
    image = np.full((height, bars.size), 255, dtype=np.uint8)
    rows = np.arange(height)[:, None]
    image[(height - 1 - rows) <= levels[None, :]] = 40
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", bars.size, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def print_samples(
    crate: Crate, sample_filter: str, count: int | None, seconds: float | None
) -> int:
    """Print sampled events, one per line, until ``count`` events or ``seconds``."""
    printed = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    state_shown = ""
    with crate.sampler(sample_filter) as sampler:
        print(f"consumer {sampler.id}: {sampler.filter}", flush=True)
        print(f"{'board':>5} {'ch':>4} {'timestamp':>15} {'energy':>7} {'type':>4} {'flags':>6}")
        while (count is None or printed < count) and (
            deadline is None or time.monotonic() < deadline
        ):
            batch = sampler.next(1000 if count is None else count - printed, wait=1.0)
            for row in range(len(batch)):
                print(_sample_line({name: values[row] for name, values in batch.events.items()}))
            printed += len(batch)
            if not len(batch):
                state_shown = _say_why_nothing_comes(crate, state_shown)
        print(f"events {printed} delivered {batch.delivered if printed else 0} "
              f"lost {batch.lost if printed else 0}", flush=True)
    return printed


def _say_why_nothing_comes(crate: Crate, shown: str) -> str:
    """While no sample arrives and the crate is not running, say so once per state (an
    operator attaching before Start must not take the silence for a broken sampler)."""
    state = str(crate.get(f"DAQC{crate.crate}_CV_State"))
    if state != shown and state != "Running":
        print(f"crate {crate.crate} is {state}: waiting for a run (Ctrl-C ends)", flush=True)
    return state


def _sample_line(e: dict[str, Any]) -> str:
    """One sampled event; a master-trigger packet shows its type, bit mask and multiplicity."""
    if e["channel"] == TRIGGER_CHANNEL:
        return (f"{e['board']:5d} trig {e['timestamp']:15d} {'-':>7} {e['trigger_type']:4d} "
                f"0x{e['trigger_mask']:04x} multiplicity {e['multiplicity']}")
    return (f"{e['board']:5d} {e['channel']:4d} {e['timestamp']:15d} {e['energy']:7d} "
            f"{e['header_type']:4d} 0x{e['flags']:04x}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgs-monitor", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST[:PORT] of the crate IOC's PV Access server")
    parser.add_argument("--crate", metavar="NN", help="crate number (default: the IOC's)")
    parser.add_argument("--spectrum", metavar="BOARD:CH", help="draw a channel's spectrum")
    parser.add_argument("--png", type=Path, metavar="FILE", help="save the spectrum as a PNG")
    parser.add_argument("--sample", metavar="FILTER",
                        help='print sampled events, e.g. "board=101 ch=0-3 prescale=100"')
    parser.add_argument("--count", type=int, help="tables / events to print, then exit")
    parser.add_argument("--seconds", type=float, help="how long to sample (spectrum default 5)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between tables")
    args = parser.parse_args(argv)
    try:
        crate = Crate(address_of(args.address), args.crate)
    except (ValueError, RuntimeError, TimeoutError) as err:
        print(f"dgs-monitor: {err}", file=sys.stderr)
        return 1
    try:
        if args.sample is not None:
            print_samples(crate, args.sample, args.count, args.seconds)
        elif args.spectrum:
            board_text, _, channel = args.spectrum.rpartition(":")
            board = crate.board_name(board_text)
            counts, width, unit = spectrum_of(crate, board, int(channel), args.seconds or 5.0)
            if args.png:
                write_png(args.png, counts)
                print(f"spectrum of {board} channel {channel} saved in {args.png}")
            else:
                print(f"{board} channel {channel}")
                print(draw(counts, width, unit))
        else:
            shown = 0
            while args.count is None or shown < args.count:
                if shown:
                    time.sleep(args.interval)
                print(time.strftime("%H:%M:%S"), f"crate {crate.crate}")
                print(rate_table(crate), flush=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError, TimeoutError) as err:
        print(f"dgs-monitor: {err}", file=sys.stderr)
        return 1
    finally:
        crate.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long inLoop waits after a pass over the boards (spec 02 §2), and when a
board's data are worth a read.

Two rules set the wait: the pool's flow control (`scan_delay`, at least
`IDLE_SCAN_DELAY_S` after a pass that found every board empty), capped by the
fill-time guard (`fill_guard_s`) at a small share of the time the fastest-filling
FIFO takes to fill. The fill-rate estimate behind the guard is kept per board
(`ioc.board_reader.BoardRun`) with the constants here. `read_rule` says how much
data, or how old, makes a poll read: larger, rarer reads while the pool is low,
never so large or rare that a FIFO comes closer to full than the guard allows.
"""

from __future__ import annotations

import math

from ioc.pool import POOL_SIZE

#: Shortest scan delay, reached with at least 160 of 200 buffers free.
SCAN_DELAY_MIN_S = 0.001
#: Scan delay when every board was empty in the pass: polling idle FIFOs every
#: 1 ms costs about 4 % of a core for nothing (P6 idle: 5-6.5 % at 1 ms,
#: 3.0-5.3 % at 5 ms, 3.7-4.3 % at 10 ms). The first event after a quiet spell
#: waits at most this long to be seen; reads are coalesced over 20 ms anyway.
IDLE_SCAN_DELAY_S = 0.010
#: The wait after a pass stays within this share of the shortest time any board's
#: FIFO takes to fill at the rate it has been filling: the pool's flow control may
#: ask up to max_latency_s, and a pass the host delays adds to it. With a physical
#: 1 MiB FIFO at 22.6 MB/s (46 ms to fill) the wait stays under 11.5 ms.
FILL_SHARE = 0.25
#: Reads while the pool is low: half a physical FIFO, or one outLoop batch period,
#: whichever comes first (within `FILL_SHARE` of the board's FIFO and fill time).
PRESSURE_READ_BYTES = 512 * 1024
PRESSURE_LATENCY_S = 0.050
#: The fill-rate estimate falls by this factor at each poll: a burst is remembered
#: for a few dozen polls, a rate that has dropped is not held for the whole run.
FILL_RATE_DECAY = 0.95
#: A fill rate is measured over at least this long (shorter spans see the boards'
#: bursts, not their rate); until a board's first measure, waits are this long at most.
FILL_SAMPLE_S = 0.005


def scan_delay(free: int, total: int = POOL_SIZE, longest: float = 0.020) -> float:
    """The flow-control wait after each pass: grows as the pool fills up, but never
    past ``longest`` (the maximum read latency).

    The original's formula alone waits up to 0.45 s; a physical 1 MiB FIFO at
    2000 events/s per channel fills in about 0.1 s, so that wait overflowed
    FIFOs while most of the retention memory was still free. Fewer free buffers
    now make reads larger, not rarer than every ``longest`` seconds.
    """
    used = total - free
    return min(longest, max(SCAN_DELAY_MIN_S, 0.300 * (used - 40) / 100))


def fill_guard_s(fill_times: list[float | None]) -> float:
    """The longest wait after a pass that keeps every FIFO far from full.

    ``fill_times`` holds each enabled board's time to fill (None: not measured yet).
    """
    if None in fill_times:
        return FILL_SAMPLE_S
    return max(SCAN_DELAY_MIN_S, FILL_SHARE * min(fill_times, default=math.inf))


def read_rule(
    pool_low: bool,
    threshold_bytes: int,
    latency_s: float,
    capacity_words: int | None,
    fill_time_s: float | None,
) -> tuple[int, float]:
    """The read threshold (bytes) and latency (s) of one board's polls.

    ``threshold_bytes`` and ``latency_s`` are the configured ones. With the pool low
    (``pool_low``: `ioc.pool.BufferPool.under_pressure`) nobody is taking data promptly, so
    latency does not matter but buffers do: reads grow to `PRESSURE_READ_BYTES` or
    `PRESSURE_LATENCY_S`, though not past `FILL_SHARE` of the FIFO (``capacity_words``,
    None if unknown) or of its fill time: a FIFO left half full before each read
    overflows after a host stall half as long as one read each poll would survive.
    """
    if not pool_low:
        return threshold_bytes, latency_s
    pressure_bytes, pressure_s = PRESSURE_READ_BYTES, PRESSURE_LATENCY_S
    if capacity_words:
        pressure_bytes = min(pressure_bytes, int(FILL_SHARE * capacity_words) * 4)
    if fill_time_s is not None:
        pressure_s = min(pressure_s, FILL_SHARE * fill_time_s)
    return max(threshold_bytes, pressure_bytes), max(latency_s, pressure_s)

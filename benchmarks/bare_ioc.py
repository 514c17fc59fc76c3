"""The baseline IOC of P6-P8: pythonSoftIOC serving as many plain records as the crate IOC.

Nothing runs in it besides the EPICS servers: no read-out threads, no
publisher. ``--pool`` also allocates the 200 x 1 MiB buffer pool the crate
IOC preallocates, so its resident memory is the floor of any design that
keeps that pool. Like the crate IOC (ioc/app.py) it keeps iocInit from
locking the address space into RAM, so the two compare. It prints
``bare_ioc: ready`` once the records are served.

    python benchmarks/bare_ioc.py --records N [--pool]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300, help="ai records to serve")
    parser.add_argument("--pool", action="store_true", help="also hold the 200 x 1 MiB pool")
    args = parser.parse_args(argv)

    from softioc import asyncio_dispatcher, builder, imports, softioc

    from ioc.pool import BufferPool

    pool = BufferPool() if args.pool else None
    builder.SetDeviceName("BARE")
    records = [builder.aIn(f"VALUE{number}", initial_value=0) for number in range(args.records)]
    builder.LoadDatabase()
    with contextlib.suppress(ValueError):  # an older EPICS has no switch and locks as before
        ctypes.c_int.in_dll(imports.dbCore, "dbThreadRealtimeLock").value = 0
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    held = f", pool of {pool.size} buffers" if pool else ""
    print(f"bare_ioc: ready, {len(records)} records{held}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    softioc.safeEpicsExit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

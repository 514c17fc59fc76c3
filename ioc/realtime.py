"""Keeping inLoop's timing whatever else the process and the host do.

A digitizer's 1 MiB FIFO fills in about 46 ms at 5000 events/s per channel, so
inLoop must come back to every board well within that. Two things can keep it
away: other processes taking the CPU (a busy neighbour on a 2-core machine),
and the IOC's own threads holding the interpreter lock. inLoop therefore may
run under the real-time FIFO policy (above every ordinary process, where the
host permits it), and while a run goes the interpreter hands the lock over
more often than its 5 ms default, so a thread that wants it waits less.

The lock is the catch: inLoop under the real-time policy still waits for
whichever thread holds the interpreter lock, and if that thread runs under the
ordinary policy, a busy neighbour pre-empts it while it holds the lock (priority
inversion; measured with two spin loops beside a 90 MB/s run: gaps of 60-90 ms
and full FIFOs). So with inLoop in real time, the IOC's other ordinary threads
(Python's: EPICS already runs its own under the real-time policy where it may) go
under it too, at the lowest priority (`LOCK_HOLDER_PRIORITY`):
below inLoop, above every ordinary process, which brought the same run's longest
gap to 20 ms. This is done at each Start, so threads the IOC or its libraries
started since are placed too.

The garbage collector is the other lock holder: a full collection walks every
object of the process (about 100 000 in an idle demo IOC, 50 ms with the lock
held), whichever thread happens to trigger it. So each run starts with a
collection and then freezes what exists (`frozen_heap`): during the run a full
collection walks only what the run itself created (about 1 ms).

Both are process settings a host administrator may refuse: a refused real-time
request is logged once and reported (`RealtimeState.REFUSED`); the run goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import gc
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Real-time priorities the configuration accepts (SCHED_FIFO's range, minus
#: the top one, which belongs to the kernel's own watchdogs).
PRIORITY_RANGE = (1, 98)


class RealtimeState(enum.Enum):
    """Whether the inLoop thread runs under the real-time policy (DAQC<NN>_CV_RealTime)."""

    OFF = "Off"
    ON = "On"
    REFUSED = "Refused"


#: prctl(2) option that names the calling thread (its "comm", 15 bytes at most).
_PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where ps, top -H and /proc show threads, so an
    operator can find the reader among the IOC's threads (best effort)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


#: Real-time priority of the IOC's other threads while inLoop runs in real time: the
#: lowest, so they never pass inLoop but an ordinary process never pre-empts them.
LOCK_HOLDER_PRIORITY = 1


def raise_other_threads(log: logging.Logger, priority: int = LOCK_HOLDER_PRIORITY) -> int:
    """Put every other ordinary-policy thread of this process under SCHED_FIFO at
    ``priority``, so none is pre-empted by ordinary processes while it holds the
    interpreter lock; returns how many were raised (best effort, thread by thread)."""
    caller = threading.get_native_id()
    raised = 0
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            if tid == caller or os.sched_getscheduler(tid) != os.SCHED_OTHER:
                continue
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
        except OSError:  # the thread has ended, or the host refuses: it stays as it was
            continue
        raised += 1
    if not raised:
        return 0
    log.info(
        "%d other threads of the IOC at real-time priority %d, so none is pre-empted by "
        "an ordinary process while holding the interpreter lock",
        raised,
        priority,
    )
    return raised


def enter_realtime(priority: int, log: logging.Logger, who: str = "inLoop") -> RealtimeState:
    """Put the calling thread (only it) under SCHED_FIFO at ``priority``; 0 leaves it alone.

    Linux applies a policy set for "pid 0" to the calling thread alone, so the
    other threads of the IOC keep the ordinary policy.
    """
    if priority == 0:
        return RealtimeState.OFF
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as err:
        log.warning(
            "%s: real-time priority %d refused (%s); going on under the normal policy",
            who,
            priority,
            getattr(err, "strerror", None) or err,
        )
        return RealtimeState.REFUSED
    log.info("%s: running under the real-time FIFO policy, priority %d", who, priority)
    return RealtimeState.ON


def freeze_heap() -> None:
    """Collect, then put every object that exists now out of the garbage collector's
    reach: later full collections walk only what is created after."""
    gc.collect()
    gc.freeze()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the heap as it is now frozen (`freeze_heap`); thawed after,
    so that what the block's objects leave behind is collected as usual."""
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """Run the block with the interpreter's thread switch interval at ``seconds``
    (0: leave it), then put back what it was."""
    if seconds <= 0:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)

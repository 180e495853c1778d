"""Waiting for a quiet machine before a timed run.

On a machine shared with other work (a test run in another session, a build), a run that
overlaps it measures the other work as much as its own. Before each run the harnesses sync the
disk and wait until the CPUs have been idle for a moment (from ``/proc/stat``; the harness and
its servers are idle then), so that a run at least starts on a quiet machine. Work that starts
during a run is not seen: compare runs of one session, in alternation, and repeat a case
whose figures stray.
"""

from __future__ import annotations

import os
import sys
import time

BUSY = 0.10  #: share of all CPUs above which the machine counts as busy
QUIET_SECONDS = 2.0  #: how long it must stay below that before a run
SAMPLE_SECONDS = 0.5
TIMEOUT = 600.0  #: after this long, run anyway (with a warning)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user already
    return total - idle, total


def wait_until_quiet(
    busy: float = BUSY, quiet: float = QUIET_SECONDS, timeout: float = TIMEOUT
) -> float:
    """Sync the disk, then wait until the CPUs have been at most ``busy`` busy for ``quiet``
    seconds in a row; returns the seconds waited beyond that. Without ``/proc/stat``, only
    sleeps ``quiet`` seconds."""
    os.sync()
    began = time.monotonic()
    if not os.path.exists("/proc/stat"):
        time.sleep(quiet)
        return 0.0
    calm_since = began
    last = _cpu_times()
    share = 0.0
    while True:
        time.sleep(SAMPLE_SECONDS)
        now = _cpu_times()
        spent, total = now[0] - last[0], now[1] - last[1]
        last = now
        share = spent / total if total else 0.0
        moment = time.monotonic()
        if share > busy:
            calm_since = moment
        elif moment - calm_since >= quiet:
            return moment - began - quiet
        if moment - began > timeout:
            print(
                f"warning: the machine stayed busy ({share:.0%} of the CPUs) for "
                f"{timeout:.0f} s: running anyway",
                file=sys.stderr,
                flush=True,
            )
            return moment - began

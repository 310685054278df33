"""Time for the real-time threads: one monotonic clock in seconds, and a manual one for tests.

Every timestamp in the daemon (input arrival, due times, phrase ends) comes from the same
clock, so they can be subtracted from one another. Wall-clock time (time.time) jumps with NTP
and is never used.
"""

from __future__ import annotations

import time

# Sleeping overshoots by ~0.1 ms median and up to ~1 ms at p99 here; spinning the last
# stretch on the clock lands within a few microseconds when a core is free.
SPIN_S = 0.002


class MonotonicClock:
    """perf_counter: CLOCK_MONOTONIC on Linux, with nanosecond resolution."""

    now = staticmethod(time.perf_counter)

    @staticmethod
    def sleep(seconds: float) -> None:
        # sleep(0) still releases the GIL: spinning loops use it to let other threads in.
        time.sleep(max(seconds, 0.0))

    def sleep_until(self, t: float, spin_s: float = SPIN_S) -> None:
        """Sleep until spin_s before t, then spin: the precise part costs at most spin_s of CPU."""
        rest = t - time.perf_counter() - spin_s
        if rest > 0:
            time.sleep(rest)
        while time.perf_counter() < t:
            # sleep(0) releases the GIL, so the MIDI input callback is never kept waiting by the spin.
            time.sleep(0)


class ManualClock:
    """A clock that only moves when told to; sleeping advances it instantly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def set(self, t: float) -> float:
        self.t = max(self.t, t)
        return self.t

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.t += seconds

    def sleep_until(self, t: float, spin_s: float = SPIN_S) -> None:
        self.set(t)

"""The clock follower on simulated tick streams that a loaded JACK graph hands a client: ticks
dropped (the rig's relay drops), stalls that hold ticks back and release them in a bunch, stalls
that start while an earlier one still holds, stamps taken per 64-frame JACK cycle; or a source
whose ticks fall behind for good (JACK without real-time scheduling). Used by
tests/test_midiclock.py, and run as a program for the figures in docs/clock.md:

    python -m antiphon.daemon.rigs.clocksim [--runs 1000] [--stalls 0.03] [--longest 3] [--no-drops] [--behind]

It prints how many runs ended with the follower's song position a tick or more from the truth.
"""

from __future__ import annotations

import argparse
import random
import sys

from antiphon.daemon.midiclock import CLOCK, PPQN, START, ClockFollower

PERIOD = 60.0 / (PPQN * 100)  # 100 bpm
CYCLE = 64 / 48000  # one JACK period at the rig's settings
# The ticks (counted from 1) the clock rig's relay keeps from antiphon (clocksession.py), and these runs' drops.
RELAY_DROPS = (30, 31, 75, 120, 121, 122, 200, 260, 333, 400, 480, 560, 561, 640, 700)
T0 = 1000.0


def stalled_stream(seed: int, stalls: float = 0.03, longest: float = 3.0, drops: tuple[int, ...] = RELAY_DROPS,
                   behind: bool = False, beats: int = 36) -> tuple[list[float], list[tuple[float, int]]]:
    """(when the source played each tick, [(when the client got it, its index)]). A stall starts at
    a tick with probability `stalls` (after the first 30) and lasts 0.3 to `longest` periods;
    `behind`: the source itself falls that far behind for good instead (no bunch)."""
    rng = random.Random(seed)
    played, delivered, held, late = [], [], 0.0, 0.0
    for i in range(beats * PPQN):
        r, u = rng.random(), rng.uniform(0.3, longest)
        t = T0 + i * PERIOD + late
        if i > 30 and r < stalls:
            if behind:
                late += u * PERIOD
                t += u * PERIOD
            else:
                held = max(held, t + u * PERIOD)
        played.append(t)
        if (i + 1) not in drops:  # the relay counts from 1
            delivered.append(((int(max(t, held) / CYCLE) + 1) * CYCLE, i))
    return played, delivered


def final_error(played: list[float], delivered: list[tuple[float, int]]) -> float:
    """The follower's song position minus the truth, in ticks, at the last tick delivered on time."""
    f = ClockFollower()
    f.feed([START], delivered[0][0] - 0.01)
    err = 0.0
    for t, i in delivered:
        f.feed([CLOCK], t)
        if t - played[i] <= CYCLE:
            err = f.position_beats(played[i]) * PPQN - i
    return err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000, help="simulated 36-beat runs (seeds 0..runs-1)")
    p.add_argument("--stalls", type=float, default=0.03, help="chance that a stall starts at a tick")
    p.add_argument("--longest", type=float, default=3.0, help="longest stall, in tick periods")
    p.add_argument("--no-drops", action="store_true", help="no relay drops")
    p.add_argument("--behind", action="store_true", help="the source falls behind for good instead of bunching")
    a = p.parse_args(argv)
    errors = [round(final_error(*stalled_stream(seed, a.stalls, a.longest, () if a.no_drops else RELAY_DROPS,
                                                a.behind))) for seed in range(a.runs)]
    ahead, behind = sum(e > 0 for e in errors), sum(e < 0 for e in errors)
    print(f"{a.runs} runs: {ahead + behind} ended a tick or more off ({ahead} ahead, {behind} behind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

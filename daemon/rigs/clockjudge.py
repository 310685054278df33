"""The clock rig's judgements of what a client counted against the clock source's own count
(clocklisten.SourceBeats), tick by tick, and of the relay's silences: pure functions of what was
heard and traced, used by clocksession.py and unit-tested without a JACK server."""

from __future__ import annotations

import itertools
import math

from antiphon.daemon.midiclock import LOST_MIN_S, ClockFollower
from antiphon.daemon.rigs.clocklisten import PPQN, SourceBeats


def believed_vs_source(clock_in: list[tuple[float, list[int], tuple[int, float] | None]], source: SourceBeats,
                       until: float = math.inf) -> list[float]:
    """For each tick antiphon's follower counted (read_trace_clock), its time for that song position
    minus the source's time of it, ms: what antiphon believed, tick by tick, against the clock."""
    out, last = [], None
    for t, msg, belief in clock_in:
        if t >= until:
            break
        if msg[0] != 0xF8 or belief is None or belief == last:
            continue  # a repeat leaves the belief as it was
        last = belief
        tick, at = belief
        src_t = source.time_of(tick / PPQN, near=at)
        if src_t is not None:
            out.append(1000 * (at - src_t))
    return out


def follower_on_the_listeners_stamps(heard: list[tuple[float, list[int]]],
                                     source: SourceBeats) -> tuple[int, int, int]:
    """antiphon's follower, fed what the listener heard, against the listener's count: tick by
    tick, the song position the follower gave the tick (its anchor once counted) minus the one the
    listener's count gives it. See clocksession.Session.replayed."""
    follower = ClockFollower()
    counted: dict[float, int] = {}
    for t, m in heard:
        follower.feed(m, t)
        if m[0] == 0xF8 and follower.state.locked and follower.state.last_tick == t:
            counted[t] = follower.state.anchor_tick
    compared = apart = runs_apart = 0
    for run in source.runs:
        if run.first is None:
            continue
        d = [counted[t] - (run.first + int(i)) for i, t in zip(run.idx, run.t) if t in counted]
        compared += len(d)
        apart += sum(1 for x in d if x != 0)
        runs_apart += bool(d) and d[0] != 0
    return compared, apart, runs_apart


# After a silence the follower refits its line on fresh ticks: as long as the session waits for one.
REFIT_S = 1.5


def silences(times: list[float], until: float) -> list[tuple[float, float]]:
    """The stretches (from, to) longer than LOST_MIN_S between messages heard at `times` (in
    order), up to `until` (the source's last tick: a relay that forwarded nothing after some point
    fell silent up to there)."""
    ts = [*times, until] if times and until > times[-1] else list(times)
    return [(a, b) for a, b in itertools.pairwise(ts) if b - a > LOST_MIN_S]


def gone_while(gap: tuple[float, float], since: float, until: float) -> bool:
    """antiphon's clock was gone (no tick for LOST_MIN_S) at some time from `since` to `until`, or
    had come back too recently for a refit, in the silence `gap`."""
    return gap[0] + LOST_MIN_S < until and since < gap[1] + REFIT_S

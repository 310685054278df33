"""An answer placed on a beat of the MIDI clock stays on that beat when the tempo line moves
before it sounds (the studio's retimer and the scheduler, manual clock, ticks through Studio.route)."""

from __future__ import annotations

import pytest

from antiphon.daemon.clock import ManualClock
from antiphon.daemon.config import JamConfig
from antiphon.daemon.midiclock import CLOCK, PPQN, START, ClockState
from antiphon.daemon.scheduler import Item, Scheduler
from antiphon.daemon.studio import Studio

ON, OFF = 0x90, 0x80
T0, BPM = 1000.0, 100.0
PERIOD = 60.0 / (PPQN * BPM)  # 25 ms
BEAT = PPQN * PERIOD


def rig(logs: list[str] | None = None, **cfg):
    clock = ManualClock(T0 - 0.5)
    studio = Studio(JamConfig(**cfg), clock, log=(logs if logs is not None else []).append)
    dues: list[tuple[float, list[int]]] = []
    sched = Scheduler(lambda m: None, clock, 100.0, 0, lambda s: None, lambda due, sent, m: dues.append((due, m)))
    studio.scheduler, sched.retimer = sched, studio.on_the_beat
    return clock, studio, sched, dues


def hear(clock, studio, sched, msg, t):
    clock.set(t)
    studio.route(("input", t, msg, t))  # the MIDI system's stamp is the arrival: no JACK offset
    sched.run_due(t)


@pytest.mark.parametrize("late_ms", [-9.0, 12.0])
@pytest.mark.parametrize("retimed", [True, False])
def test_the_answer_follows_its_beat_when_the_line_moves_before_it_sounds(late_ms, retimed):
    clock, studio, sched, dues = rig()
    if not retimed:
        sched.retimer = None  # what antiphon did before: the beat as the line had it when placed
    hear(clock, studio, sched, [START], T0 - 0.01)
    for k in range(80):  # two seconds of steady ticks
        hear(clock, studio, sched, [CLOCK], T0 + k * PERIOD)
    start = studio.align(clock.now() + 0.3)
    assert start == pytest.approx(T0 + 4 * BEAT, abs=1e-4)  # the next beat after 2.3 s: beat 4 at 2.4 s
    sched.submit(1, [Item(start, 0, ON, 60, 90, 1), Item(start + 0.2, 1, OFF, 60, 0, 1)], start)
    # The source's ticks now come late_ms off the old line (a stalled graph, a clock that stepped):
    # after three of them the line restarts through them, and beat 4 moves with it.
    for k in range(80, 100):
        hear(clock, studio, sched, [CLOCK], T0 + k * PERIOD + late_ms / 1000)
    sched.submit(1, [Item(start + 0.3, 2, ON, 62, 90, 2)], start)  # the engine's later notes, as placed
    for k in range(100, 140):
        hear(clock, studio, sched, [CLOCK], T0 + k * PERIOD + late_ms / 1000)
    firsts = [d for d, m in dues if m[0] == ON]
    assert len(firsts) == 2
    # Retimed: on beat 4 of the moved line. Not: where beat 4 was before the line moved.
    assert firsts[0] == pytest.approx(start + (late_ms / 1000 if retimed else 0.0), abs=0.001)
    assert firsts[1] - firsts[0] == pytest.approx(0.3, abs=1e-9)  # the answer keeps its rhythm
    off_beat = abs(studio.beat.position_beats(firsts[0]) - 4.0)
    assert off_beat < 0.002 if retimed else off_beat > 0.01


def state(anchor_time: float, last_tick: float) -> ClockState:
    """A 100 bpm line with beat 0 at anchor_time; the latest tick came at last_tick."""
    return ClockState(True, True, PERIOD, anchor_time, 0, 0, last_tick, 48, False)


def test_a_beat_the_line_puts_in_the_past_starts_at_once_or_on_the_next_beat():
    logs: list[str] = []
    _, studio, _, _ = rig(logs)
    start = T0 + 4 * BEAT  # placed on beat 4
    now = start - 0.01  # beat 4 was 10 ms ago: still on time, the rest of the answer on the line
    studio.beat.state = state(T0 - 0.02, now)  # the line now has every beat 20 ms earlier
    assert studio.on_the_beat(start, now) == pytest.approx(start - 0.02)
    assert logs == []
    studio.beat.state = state(T0 - 0.1, now)  # 100 ms earlier: late on the beat, so the next beat
    assert studio.on_the_beat(start, now) == pytest.approx(start - 0.1 + BEAT)
    assert logs == ["clock: the tempo line moved this answer's beat 90 ms into the past: it starts on the next one"]
    studio.beat.state = state(T0 + 0.2, now)  # later: the same beat, waited for
    assert studio.on_the_beat(start, now) == pytest.approx(start + 0.2)
    # Ticks gone for over a second: free time, the start is left alone.
    studio.beat.state = state(T0 - 0.02, now - 1.5)
    assert studio.on_the_beat(start, now) == start


def test_bars_stay_bars_and_on_time_never_exceeds_half_the_late_drop():
    _, studio, _, _ = rig(sync_to="bar", beats_per_bar=3)
    start = T0 + 6 * BEAT  # bar 2 of 3/4
    studio.beat.state = state(T0 - 0.1, start - 0.03)
    assert studio.on_the_beat(start, start - 0.03) == pytest.approx(start - 0.1 + 3 * BEAT)  # the next bar
    _, studio, _, _ = rig(late_drop_ms=20.0)
    assert studio.on_time_s == pytest.approx(0.01)


def test_only_an_answer_on_a_beat_that_has_not_sounded_is_moved():
    clock = ManualClock(T0)
    dues: list[float] = []
    sched = Scheduler(lambda m: None, clock, 100.0, 0, lambda s: None, lambda due, sent, m: dues.append(due))
    beat = [T0 + 0.5]
    sched.retimer = lambda start, now: beat[0]
    sched.submit(1, [Item(T0 + 0.5, 0, ON, 60, 90, 1), Item(T0 + 0.7, 1, OFF, 60, 0, 1)], T0 + 0.5)
    beat[0] = T0 + 0.46
    sched.retime()
    assert sched.next_due() == pytest.approx(T0 + 0.46)
    clock.set(T0 + 0.46)
    sched.run_due(clock.now())
    beat[0] = T0 + 0.6  # it sounds: its beat is kept, not chased
    sched.retime()
    sched.submit(1, [Item(T0 + 0.8, 2, ON, 62, 90, 2)], T0 + 0.5)  # later notes keep the shift
    for t in (T0 + 0.66, T0 + 0.76):
        clock.set(t)
        sched.run_due(clock.now())
    assert dues == pytest.approx([T0 + 0.46, T0 + 0.66, T0 + 0.76])
    # A stopped answer is forgotten, one in free time (no start given) is left where it is.
    sched.submit(2, [Item(T0 + 3, 0, ON, 64, 90, 3)], T0 + 3)
    sched.stop(2)
    assert sched.pending_start is None
    sched.submit(3, [Item(T0 + 4, 0, ON, 60, 90, 4)])
    sched.retime()
    assert sched.next_due() == pytest.approx(T0 + 4) and sched.pending_start is None

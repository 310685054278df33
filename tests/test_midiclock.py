"""MIDI clock follower: tempo tracking under jitter, tempo changes, transport, song position, snapping."""

from __future__ import annotations

import random

import pytest

from antiphon.daemon.midiclock import (
    CLOCK,
    CONTINUE,
    PPQN,
    SONG_POSITION,
    START,
    STOP,
    ClockConfigError,
    ClockFollower,
)

T0 = 1000.0


def tick_times(segments: list[tuple[float, int]], start: float = T0) -> list[float]:
    """True tick times for (bpm, beats) segments played back to back."""
    out, t = [], start
    for bpm, beats in segments:
        for _ in range(beats * PPQN):
            out.append(t)
            t += 60.0 / (PPQN * bpm)
    return out


def play(f: ClockFollower, times: list[float], jitter: float = 0.0, seed: int = 0, on_tick=None) -> None:
    rng = random.Random(seed)
    for i, t in enumerate(times):
        f.feed([CLOCK], t + rng.uniform(-jitter, jitter))
        if on_tick is not None:
            on_tick(i, t)


def prediction_errors(times: list[float], jitter: float, checked, beats_per_bar: int = 4, seed: int = 0):
    """Largest |predicted - true| for the next beat and next bar, over the ticks `checked(i)` accepts."""
    f = ClockFollower(beats_per_bar=beats_per_bar)
    f.feed([START], times[0] - 0.01)
    worst = {"beat": 0.0, "bar": 0.0, "n": 0}
    bar = PPQN * beats_per_bar

    def check(i: int, t: float) -> None:
        if not checked(i):
            return
        now = t + 0.002  # just after tick i: it is past, whatever its jitter
        k_beat, k_bar = (i // PPQN + 1) * PPQN, (i // bar + 1) * bar
        if k_bar >= len(times):
            return
        worst["beat"] = max(worst["beat"], abs(f.next_beat(now) - times[k_beat]))
        worst["bar"] = max(worst["bar"], abs(f.next_bar(now) - times[k_bar]))
        worst["n"] += 1

    play(f, times, jitter, seed, check)
    return f, worst


@pytest.mark.parametrize("seed", range(4))
def test_follows_120_to_90_bpm_and_predicts_beats_and_bars_within_1ms(seed):
    times = tick_times([(120, 8), (90, 16)])
    change = 8 * PPQN
    settled = lambda i: 2 * PPQN <= i < change - 1 or i >= change + 2 * PPQN
    f, worst = prediction_errors(times, jitter=0.0005, checked=settled, seed=seed)
    assert worst["n"] > 300
    assert worst["beat"] < 0.001 and worst["bar"] < 0.001, worst
    assert f.bpm == pytest.approx(90.0, abs=0.3)
    assert f.restarts == 1  # the jump was seen as one tempo change, not as noise


def test_tempo_jump_is_followed_within_half_a_beat():
    f = ClockFollower()
    f.feed([START], T0 - 0.01)
    times = tick_times([(120, 8), (90, 4)])
    bpms = []
    play(f, times, jitter=0.0005, on_tick=lambda i, t: bpms.append(f.bpm))
    change = 8 * PPQN
    assert bpms[change - 1] == pytest.approx(120.0, abs=0.5)
    assert bpms[change + PPQN // 2] == pytest.approx(90.0, rel=0.03)


def test_one_ms_jitter_is_noise_not_tempo_change():
    times = tick_times([(120, 32)])
    f, worst = prediction_errors(times, jitter=0.001, checked=lambda i: i >= 2 * PPQN, seed=3)
    assert f.restarts == 0
    assert f.bpm == pytest.approx(120.0, abs=0.2)
    assert worst["beat"] < 0.002 and worst["bar"] < 0.002, worst


def test_stop_keeps_position_song_position_pointer_moves_it_continue_resumes_there():
    f = ClockFollower(beats_per_bar=4)
    period = 60.0 / (PPQN * 120)
    f.feed([START], T0 - 0.01)
    assert f.running and not f.synced(T0)
    play(f, tick_times([(120, 2)]), jitter=0.0)  # positions 0..47
    last = T0 + 47 * period
    assert f.synced(last) and f.position_beats(last) == pytest.approx(47 / PPQN)

    f.feed([STOP], last + 0.005)
    assert not f.running and not f.synced(last + 0.005)
    assert f.position_beats(last + 1.0) == pytest.approx(2.0)  # stands where the next tick would have played
    assert f.next_beat(last + 0.005) is None and f.next_bar(last) is None

    # The DAW keeps clocking while stopped: tempo stays known, the position does not move.
    play(f, tick_times([(120, 1)], start=last + period))
    assert f.bpm == pytest.approx(120.0, abs=0.01) and f.position_beats(last + 2.0) == pytest.approx(2.0)

    f.feed([SONG_POSITION, 32, 0], last + 0.6)  # 32 sixteenths = beat 8 = bar 3
    assert f.position_beats(last + 0.6) == pytest.approx(8.0)
    resume = last + 25 * period
    f.feed([CONTINUE], resume - 0.001)
    assert f.running and not f.synced(resume - 0.001)  # locked only once the first tick places beat 8
    f.feed([CLOCK], resume)
    assert f.synced(resume) and f.position_beats(resume) == pytest.approx(8.0)
    assert f.next_bar(resume + 0.001) == pytest.approx(resume + 4 * PPQN * period, abs=1e-6)
    assert f.next_beat(resume + 0.001) == pytest.approx(resume + PPQN * period, abs=1e-6)

    # Stop and continue without a pointer: the next tick follows the last one played.
    f.feed([STOP], resume + 0.001)
    f.feed([CONTINUE], resume + 0.5)
    f.feed([CLOCK], resume + 0.5 + period)
    assert f.position_beats(resume + 0.5 + period) == pytest.approx(8.0 + 1 / PPQN)

    f.feed([START], resume + 1.0)  # start always means the top of the song
    f.feed([CLOCK], resume + 1.0 + period)
    assert f.position_beats(resume + 1.0 + period) == pytest.approx(0.0)


def test_clock_that_vanishes_without_stop_falls_back_to_free_time():
    f = ClockFollower(quantize=16)
    f.feed([START], T0 - 0.01)
    times = tick_times([(120, 4)])
    play(f, times, jitter=0.0)
    assert f.synced(times[-1] + 0.05)
    assert f.synced(times[-1] + 0.6)  # a stalled graph, as likely: the line is still the best beat
    gone = times[-1] + 1.05
    assert not f.synced(gone)
    assert f.snap(gone + 0.0123, now=gone) == gone + 0.0123


def test_snap_moves_onsets_to_the_nearest_sixteenth_only_while_synced():
    f = ClockFollower(quantize=16)
    sixteenth = 60.0 / 120 / 4
    assert f.snap(T0 + 0.03, now=T0) == T0 + 0.03  # no clock yet: free time
    f.feed([START], T0 - 0.01)
    times = tick_times([(120, 4)])
    play(f, times, jitter=0.0)
    now = times[-1]
    beat4 = T0 + 4 * 0.5  # the downbeat of bar 2, still to come
    assert f.snap(beat4 + 0.04, now) == pytest.approx(beat4, abs=1e-6)
    assert f.snap(beat4 + 0.08, now) == pytest.approx(beat4 + sixteenth, abs=1e-6)
    assert f.snap(beat4 - 0.05, now) == pytest.approx(beat4, abs=1e-6)
    # Never earlier than the caller can still play: the next grid point instead.
    assert f.snap(beat4 + 0.04, now, not_before=beat4 + 0.01) == pytest.approx(beat4 + sixteenth, abs=1e-6)
    assert ClockFollower(quantize=0).snap(beat4 + 0.04, now) == beat4 + 0.04


def test_other_messages_are_not_clock_and_bad_settings_are_refused():
    f = ClockFollower()
    assert not f.feed([0x90, 60, 100], T0)
    assert not f.feed([0xF0, 1, 0xF7], T0)
    assert f.feed([CLOCK], T0)
    assert f.bpm == 0.0  # one tick is no tempo
    with pytest.raises(ClockConfigError, match="beats-per-bar"):
        ClockFollower(beats_per_bar=0)
    with pytest.raises(ClockConfigError, match="quantize"):
        ClockFollower(quantize=-4)


# --------------------------------------------------------------------------- ticks lost, repeated, late, bunched
# What JACK does to a client's MIDI on a busy box (DESIGN.md 2): a late cycle loses its events,
# an xrun repeats a cycle, a stalled client gets its ticks late and all at once.

PERIOD_100 = 60.0 / (PPQN * 100)
CYCLE = 64 / 48000  # one JACK period: a repeated cycle comes this much later


def follow(delivered: list[tuple[float, int]], jitter: float = 0.0, seed: int = 0, check=None) -> ClockFollower:
    """Feed Start, then each delivered (time, true index) tick; `check(f, i, t)` after each."""
    f = ClockFollower()
    rng = random.Random(seed)
    f.feed([START], delivered[0][0] - 0.01)
    for t, i in delivered:
        f.feed([CLOCK], t + rng.uniform(-jitter, jitter))
        if check is not None:
            check(f, i, t)
    return f


def grid(n: int, period: float = PERIOD_100) -> list[float]:
    return [T0 + i * period for i in range(n)]


class Judge:
    """After each on-time tick: the position of that tick and the time of the next beat, against the truth."""

    def __init__(self, times: list[float], period: float = PERIOD_100) -> None:
        self.times, self.period = times, period
        self.pos_err, self.beat_err, self.n = 0.0, 0.0, 0

    def __call__(self, f: ClockFollower, i: int, t: float) -> None:
        if i < 2 * PPQN or t - self.times[i] > 0.0015:
            return  # settling, or a late tick: judged at the next on-time one
        now = self.times[i] + 0.0015
        self.pos_err = max(self.pos_err, abs(f.position_beats(self.times[i]) * PPQN - i))
        k = (i // PPQN + 1) * PPQN
        if k < len(self.times):
            self.beat_err = max(self.beat_err, abs(f.next_beat(now) - self.times[k]))
        self.n += 1


@pytest.mark.parametrize("seed", range(3))
def test_lost_ticks_leave_the_position_where_the_clock_is(seed):
    times = grid(24 * 40)
    rng = random.Random(seed)
    lost = {i for i in range(60, len(times)) if rng.random() < 0.05} | {300, 301, 302}  # and a burst of 3
    judge = Judge(times)
    f = follow([(t, i) for i, t in enumerate(times) if i not in lost], jitter=0.0005, seed=seed, check=judge)
    assert judge.n > 800
    assert judge.pos_err < 0.1, judge.pos_err  # in ticks: never a whole tick behind
    assert judge.beat_err < 0.001, judge.beat_err
    assert f.lost == len(lost) and f.repeats == 0
    assert f.bpm == pytest.approx(100.0, abs=0.2)


@pytest.mark.parametrize("seed", range(3))
def test_a_repeated_tick_is_never_counted_twice(seed):
    times = grid(24 * 40)
    rng = random.Random(seed)
    twice = {i for i in range(30, len(times)) if rng.random() < 0.05}
    delivered = []
    for i, t in enumerate(times):
        delivered.append((t, i))
        if i in twice:
            delivered.append((t + CYCLE, i))  # JACK delivered the cycle again
    judge = Judge(times)
    f = follow(delivered, jitter=0.0003, seed=seed, check=judge)
    assert f.repeats == len(twice) and f.lost == 0
    assert judge.pos_err < 0.1 and judge.beat_err < 0.001, (judge.pos_err, judge.beat_err)


@pytest.mark.parametrize("seed", range(3))
def test_late_and_bunched_ticks_move_neither_position_nor_tempo(seed):
    """A client that ran late gets its ticks late, the next ones bunched behind them (delivered no
    earlier than the late one): stalls of 0.3 to 8 tick periods."""
    times = grid(24 * 48)
    rng = random.Random(seed)
    delivered, held_until = [], 0.0
    for i, t in enumerate(times):
        if i > 60 and rng.random() < 0.03:
            held_until = t + rng.uniform(0.3, 8.0) * PERIOD_100
        delivered.append((max(t, held_until), i))
    judge = Judge(times)
    f = follow(delivered, jitter=0.0003, seed=seed, check=judge)
    late = sum(1 for (d, i) in delivered if d - times[i] > 0.5 * PERIOD_100)
    assert late > 10  # the stream really was late and bunched
    assert judge.n > 900
    assert judge.pos_err < 0.1 and judge.beat_err < 0.001, (judge.pos_err, judge.beat_err)
    assert f.bpm == pytest.approx(100.0, abs=0.2)


@pytest.mark.parametrize(("seed", "stalls", "longest"), [(213, 0.03, 3.0), (281, 0.03, 3.0), (409, 0.03, 3.0),
                                                       (858, 0.03, 3.0), (82, 0.05, 6.0), (230, 0.05, 6.0)])
def test_stalls_that_stack_up_behind_the_relays_dropped_ticks_do_not_move_the_count(seed, stalls, longest):
    """What a relay under load hands on (the clock rig's relay scenario): its own drops, and stalls
    that start while an earlier one still holds the ticks back, released in a bunch, stamped per
    64-frame JACK cycle. The late ticks read as following lost ones, and three of them in a row
    restarted the line from their late times: one tick behind for good (these seeds, before
    2026-12-02; docs/clock.md has the counts over 1,000 seeds, `python -m antiphon.daemon.rigs.clocksim`)."""
    from antiphon.daemon.rigs.clocksim import stalled_stream

    times, delivered = stalled_stream(seed, stalls, longest)
    judge = Judge(times)
    f = follow(delivered, check=judge)
    assert sum(1 for d, i in delivered if d - times[i] > PERIOD_100) > 10  # ticks really came over a period late
    assert judge.n > 600
    assert judge.pos_err < 0.5, judge.pos_err
    assert f.position_beats(times[-1]) * PPQN == pytest.approx(len(times) - 1, abs=0.1)


def test_all_at_once_losses_repeats_and_stalls_with_jitter():
    times = grid(24 * 60)
    rng = random.Random(7)
    delivered, held_until = [], 0.0
    for i, t in enumerate(times):
        r = rng.random()
        if i > 60 and r < 0.03:
            continue  # lost
        if i > 60 and r < 0.05:
            held_until = t + rng.uniform(0.5, 4.0) * PERIOD_100
        d = max(t, held_until)
        delivered.append((d, i))
        if i > 60 and 0.05 <= r < 0.07:
            delivered.append((d + CYCLE, i))
    judge = Judge(times)
    follow(delivered, jitter=0.0008, seed=1, check=judge)
    assert judge.n > 1200
    assert judge.pos_err < 0.15 and judge.beat_err < 0.0015, (judge.pos_err, judge.beat_err)


def test_a_clock_that_comes_back_on_its_grid_is_placed_by_time_not_by_count():
    """1.5 s of ticks never reached us (the JACK graph stalled for this client), the source
    played on: the ticks after the gap are 60 ticks on, not one."""
    times = grid(24 * 12)
    f = follow([(t, i) for i, t in enumerate(times[:100])])
    assert not f.synced(times[99] + 1.2)  # meanwhile: free time
    for t in times[160:]:
        f.feed([CLOCK], t)
    last = times[-1]
    assert f.position_beats(last) == pytest.approx((len(times) - 1) / PPQN, abs=1e-6)
    assert f.lost == 60


@pytest.mark.parametrize("stall", [0.55, 0.7])
def test_a_stall_that_shifts_the_source_by_most_of_a_period_is_not_a_lost_tick(stall):
    """Without real-time scheduling JACK's dummy driver stalls and never catches up: every tick from
    then on comes `stall` periods late, none lost. Rounding read 0.55 as a lost tick and put every
    later beat one tick early. A tick really lost, its successor early by the jitter, still counts."""
    times = grid(24 * 8)
    shifted = [t + (stall * PERIOD_100 if i >= 100 else 0.0) for i, t in enumerate(times)]
    f = follow([(t, i) for i, t in enumerate(shifted)])
    assert f.lost == 0
    assert f.position_beats(shifted[-1]) == pytest.approx((len(times) - 1) / PPQN, abs=0.01)
    early = [(t - (0.2 * PERIOD_100 if i >= 101 else 0.0), i) for i, t in enumerate(times) if i != 100]
    f = follow(early)
    assert f.lost == 1
    assert round(f.position_beats(early[-1][0]) * PPQN) == len(times) - 1


def test_a_faster_tempo_is_followed_not_read_as_repeats():
    f = ClockFollower()
    f.feed([START], T0 - 0.01)
    times = tick_times([(90, 8), (120, 8)])
    change = 8 * PPQN
    errs = []
    play(f, times, jitter=0.0005,
         on_tick=lambda i, t: errs.append(abs(f.position_beats(t) * PPQN - i)) if i >= change + PPQN // 2 else None)
    assert f.bpm == pytest.approx(120.0, abs=0.5) and f.restarts >= 1
    assert max(errs) < 0.1  # in ticks, from half a beat after the change on


def test_ticks_without_start_count_beats_from_the_first_tick_heard():
    """A clock source that joined while its transport rolled sends no Start: follow its tempo,
    beats counted from its first tick; a Start later puts the song position right."""
    f = ClockFollower()
    times = grid(24 * 3)
    play(f, times)
    s = f.state
    assert f.synced(times[-1]) and s.assumed
    assert f.next_beat(times[-1] + 0.001) == pytest.approx(times[0] + 3 * PPQN * PERIOD_100, abs=1e-6)
    f.feed([STOP], times[-1] + 0.005)
    assert not f.running
    f.feed([START], times[-1] + 0.5)
    f.feed([CLOCK], times[-1] + 0.6)
    assert f.synced(times[-1] + 0.6) and not f.state.assumed
    assert f.position_beats(times[-1] + 0.6) == pytest.approx(0.0)


@pytest.mark.parametrize("segments", [[(120, 9), (90, 12)], [(90, 9), (120, 12)], [(100, 21)]])
def test_ticks_stamped_per_jack_cycle_of_256_frames_are_followed(segments):
    """rtmidi stamps a JACK tick when the cycle after it runs: with a period of 256 frames at 48 kHz
    (a usual setting) up to 5.3 ms late, a quarter of a tick at 120 bpm. Ticks that far off a
    young line once read as lost or repeated ones and put every later beat ticks off (measured
    before the fix: 120-370 ms); the position must stay within a few ms, tempo changes included."""
    times = tick_times(segments)
    q = 256 / 48000
    for seed in range(10):
        phase = random.Random(seed).uniform(0, q)
        f = ClockFollower()
        f.feed([START], times[0] - 0.01)
        for t in times:
            f.feed([CLOCK], (t - phase) // q * q + q + phase)
        change = segments[0][1] * PPQN if len(segments) > 1 else 0
        worst = max(abs(f.position_beats(times[k] + q) * PPQN - k) * (times[k] - times[k - 1])
                    for k in range(change + 2 * PPQN, len(times) - 1, PPQN))
        assert worst < 0.008, (seed, worst)


def test_a_late_tick_then_a_lost_one_is_not_read_as_a_slower_tempo():
    """Seen over JACK at 100 bpm: a tick 4 ms late, the next one lost, the one after 7 ms early:
    intervals of 1.16 and 1.57 periods. Two long intervals in a row also begin a slower tempo, but
    these two disagree with each other: the lost tick is counted and the position stays put."""
    times = grid(24 * 12)
    delivered = [(t, i) for i, t in enumerate(times) if i != 201]
    delivered = [(t + (0.16 if i == 200 else -0.27 if i == 202 else 0.0) * PERIOD_100, i) for t, i in delivered]
    f = follow(delivered)
    assert f.position_beats(times[-1]) * PPQN == pytest.approx(len(times) - 1, abs=0.1)
    assert f.lost == 1


@pytest.mark.parametrize("first_interval", [0.59, 0.06, 0.0025])
def test_a_first_interval_stretched_by_a_stall_or_squeezed_by_a_bunch_does_not_set_the_tempo(first_interval):
    """Seen over JACK without real-time scheduling: the first tick after a Start, then a stall, then
    steady ticks. A young line took the stalled interval as its period (4 bpm), read every later tick
    as a repeat and never recovered: no answer all session, and a tempo the recorder could not write."""
    f = ClockFollower()
    f.feed([START], T0 - 0.01)
    f.feed([CLOCK], T0)
    times = [T0 + first_interval + k * PERIOD_100 for k in range(4 * PPQN)]
    play(f, times, jitter=0.0003)
    assert f.bpm == pytest.approx(100.0, abs=0.5)
    # Every steady tick counted once after the first: position and beats to come are the clock's.
    now = times[-1] + 0.001
    assert f.position_beats(times[-1]) * PPQN == pytest.approx(len(times), abs=0.5)
    assert f.next_beat(now) == pytest.approx(times[-1] + PPQN * PERIOD_100, abs=0.001)  # beat 5


def test_a_line_too_slow_to_be_a_clock_places_nothing():
    """Two ticks seconds apart and nothing else (a stalled graph): not a tempo to place answers by."""
    f = ClockFollower()
    f.feed([START], T0 - 0.01)
    f.feed([CLOCK], T0)
    f.feed([CLOCK], T0 + 0.5)
    assert f.state.locked and f.bpm == pytest.approx(5.0)
    assert not f.synced(T0 + 0.6)


def test_the_simulation_program_counts_runs_that_end_a_tick_off(capsys):
    """`python -m antiphon.daemon.rigs.clocksim`, whose counts docs/clock.md gives: stalls behind the
    relay's drops leave no run a tick off; a source that falls behind for good (JACK without
    real-time scheduling) reads as lost ticks, a tick ahead (a limit, docs/clock.md)."""
    from antiphon.daemon.rigs import clocksim

    assert clocksim.main(["--runs", "100"]) == 0
    assert capsys.readouterr().out.strip() == "100 runs: 0 ended a tick or more off (0 ahead, 0 behind)"
    clocksim.main(["--runs", "20", "--behind", "--stalls", "0.02", "--longest", "0.7"])
    ahead = int(capsys.readouterr().out.split("(")[1].split()[0])
    assert ahead >= 5

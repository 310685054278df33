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
    gone = times[-1] + 1.0
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

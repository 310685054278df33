"""Follow a DAW's MIDI clock: tempo, transport, song position, and the times of beats to come.

MIDI clock is 24 ticks per quarter note (0xF8), with transport messages Start (0xFA: the next
tick is the downbeat of position 0), Continue (0xFB: the next tick is at the current position),
Stop (0xFC) and Song Position Pointer (0xF2, in sixteenths, only meaningful while stopped).

Tempo is a least-squares line through the last `window` tick timestamps, so one tick's jitter
moves it by ~1/window of that jitter. A tempo change shows up as several successive ticks off
the line on the same side; the line then restarts from those ticks alone, so a jump from 120 to
90 bpm is followed within a fraction of a beat instead of after a whole window. Position counts
ticks, as the MIDI spec has it: a tick lost on the way restarts the fit like a tempo change and
leaves the position one tick (1/24 beat) behind until the next Start or Song Position Pointer.

`feed` is called by one thread (the one that sees input first). After each tick the result is
published as one immutable `ClockState`, so any other thread reads a consistent picture with
a single attribute load and no lock. Times are seconds on the daemon's monotonic clock.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from antiphon.daemon.errors import UserError

PPQN = 24
CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2
TICKS_PER_SPP_UNIT = 6  # Song Position Pointer counts sixteenth notes

# A tick this far off the line (or a tenth of a tick period, if more) counts as "off"; jitter of
# ±1 ms stays well inside it. OFF_RUN successive offs on one side mean the tempo changed.
OFF_LINE_S = 0.0025
OFF_RUN = 3
# No tick for this many periods (and at least LOST_MIN_S) means the clock is gone: free time.
LOST_PERIODS = 6.0
LOST_MIN_S = 0.25


class ClockState(NamedTuple):
    running: bool  # the transport plays (Start/Continue seen, no Stop since)
    locked: bool  # running, and a tick has placed the song position on the time line
    period: float  # seconds per tick from the fit (0.0 until two ticks have been seen)
    anchor_time: float  # fitted time of the latest tick
    anchor_tick: int  # song position of the latest tick, in ticks (when locked)
    stopped_tick: int  # where the transport stands or will continue from, in ticks (when not locked)
    last_tick: float  # raw timestamp of the latest tick, for loss detection
    fit_ticks: int  # ticks in the current fit: precision grows with it


class ClockConfigError(UserError, ValueError):
    """--beats-per-bar or --quantize out of range."""


_IDLE = ClockState(False, False, 0.0, 0.0, 0, 0, -math.inf, 0)


class ClockFollower:
    def __init__(self, beats_per_bar: int = 4, quantize: int = 0, window: int = 48) -> None:
        """`quantize`: answer onsets snap to 1/quantize notes while locked (0: no snapping)."""
        if beats_per_bar < 1:
            raise ClockConfigError(f"--beats-per-bar {beats_per_bar}: must be 1 or more")
        if quantize < 0:
            raise ClockConfigError(f"--quantize {quantize}: use 0 (off) or a note division such as 16")
        if window < OFF_RUN:
            raise ValueError(f"window must hold at least {OFF_RUN} ticks")
        self.beats_per_bar = beats_per_bar
        self.grid_beats = 4.0 / quantize if quantize else 0.0
        self.state = _IDLE
        self._times = [0.0] * window  # ring of raw tick times, preallocated
        self._head = 0  # slot of the next tick
        self._n = 0  # ticks in the fit
        self._period = 0.0
        self._fit_last = 0.0
        self._off_run = 0
        self._off_sign = 0
        self._running = False
        self._next_tick = 0  # song position the next tick will have
        self._locked = False
        self._anchor_tick = 0  # song position of the latest tick, while locked
        self.restarts = 0  # times the fit restarted on a tempo change (for logs and tests)

    # ------------------------------------------------------------------ input (one thread)

    def feed(self, msg: list[int] | tuple[int, ...], t: float) -> bool:
        """Consume one message received at t; False if it is not a clock/transport message."""
        status = msg[0] if msg else 0
        if status == CLOCK:
            self._tick(t)
        elif status == START:
            self._running, self._locked, self._next_tick = True, False, 0
        elif status == CONTINUE:
            self._running, self._locked = True, False
        elif status == STOP:
            if self._locked:
                self._next_tick = self._anchor_tick + 1
            self._running, self._locked = False, False
        elif status == SONG_POSITION and len(msg) >= 3:
            self._next_tick = ((msg[2] & 0x7F) << 7 | (msg[1] & 0x7F)) * TICKS_PER_SPP_UNIT
            self._locked = False  # a jump while running: re-anchor on the next tick
        else:
            return False
        if status != CLOCK:
            self._publish(self.state.last_tick)
        return True

    def _tick(self, t: float) -> None:
        w = len(self._times)
        if self._n and (t - self._times[(self._head - 1) % w] > self._lost_after(self._period)):
            self._n = 0  # the clock was gone: old ticks say nothing about the new line
        if self._n >= 2:
            off = t - (self._fit_last + self._period)
            if abs(off) > max(OFF_LINE_S, 0.1 * self._period):
                sign = 1 if off > 0 else -1
                self._off_run = self._off_run + 1 if sign == self._off_sign else 1
                self._off_sign = sign
            else:
                self._off_run, self._off_sign = 0, 0
        self._times[self._head] = t
        self._head = (self._head + 1) % w
        self._n = min(self._n + 1, w)
        if self._off_run >= OFF_RUN:
            self._n = OFF_RUN  # keep only the ticks after the change
            self._off_run, self._off_sign = 0, 0
            self.restarts += 1
        self._fit()
        if self._running:
            if self._locked:
                self._anchor_tick += 1
            else:
                self._anchor_tick, self._locked = self._next_tick, True
        self._publish(t)

    def _fit(self) -> None:
        n, w, head, times = self._n, len(self._times), self._head, self._times
        newest = times[(head - 1) % w]
        if n == 1:
            self._fit_last = newest
            return
        # x = 0..n-1 oldest to newest, y = time relative to the newest tick (small, exact floats)
        x_mean = (n - 1) / 2.0
        y_sum = 0.0
        xy = 0.0
        for i in range(n):
            y = times[(head - n + i) % w] - newest
            y_sum += y
            xy += (i - x_mean) * y
        slope = xy / (n * (n * n - 1) / 12.0)
        self._period = slope
        self._fit_last = newest + y_sum / n + slope * (n - 1 - x_mean)

    def _publish(self, last_tick: float) -> None:
        locked = self._running and self._locked
        self.state = ClockState(self._running, locked, self._period, self._fit_last,
                                self._anchor_tick if locked else 0, self._next_tick, last_tick, self._n)

    @staticmethod
    def _lost_after(period: float) -> float:
        return max(LOST_PERIODS * period, LOST_MIN_S)

    # ------------------------------------------------------------------ queries (any thread)

    @property
    def running(self) -> bool:
        return self.state.running

    @property
    def bpm(self) -> float:
        """Tempo from the ticks (also while stopped, if the DAW keeps clocking); 0.0 if unknown."""
        p = self.state.period
        return 60.0 / (PPQN * p) if p > 0 else 0.0

    def synced(self, now: float) -> bool:
        """Running, placed on the time line, with a tempo, and ticks still arriving."""
        return _synced(self.state, now)

    def position_beats(self, t: float) -> float:
        """Song position at time t in beats (quarter notes) from the song start."""
        return _position(self.state, t)

    def time_of(self, beats: float) -> float | None:
        """When song position `beats` plays, extrapolating the current tempo; None if not locked."""
        return _time_of(self.state, beats)

    def next_grid(self, after: float, grid_beats: float) -> float | None:
        """The first time strictly after `after` at a multiple of grid_beats from the song start."""
        return _next_grid(self.state, after, grid_beats)

    def next_beat(self, after: float) -> float | None:
        return _next_grid(self.state, after, 1.0)

    def next_bar(self, after: float) -> float | None:
        return _next_grid(self.state, after, float(self.beats_per_bar))

    def snap(self, t: float, now: float, not_before: float | None = None) -> float:
        """Answer onset t moved to the nearest grid point while synced (unchanged in free time or
        with quantize off); never earlier than `not_before` (e.g. now plus the output latency)."""
        s, g = self.state, self.grid_beats  # one snapshot for the whole computation
        if g <= 0 or not _synced(s, now):
            return t
        q = _time_of(s, round(_position(s, t) / g) * g)
        if q is None:
            return t
        if not_before is not None and q < not_before:
            q = _next_grid(s, not_before - 1e-9, g) or max(t, not_before)
        return q


# Queries work on one ClockState, so a tick published by the feeding thread mid-query cannot mix
# two fits into one answer.

def _synced(s: ClockState, now: float) -> bool:
    return s.locked and s.period > 0 and now - s.last_tick <= ClockFollower._lost_after(s.period)


def _position(s: ClockState, t: float) -> float:
    if not s.locked or s.period <= 0:
        return s.stopped_tick / PPQN
    return (s.anchor_tick + (t - s.anchor_time) / s.period) / PPQN


def _time_of(s: ClockState, beats: float) -> float | None:
    if not s.locked or s.period <= 0:
        return None
    return s.anchor_time + (beats * PPQN - s.anchor_tick) * s.period


def _next_grid(s: ClockState, after: float, grid_beats: float) -> float | None:
    if not s.locked or s.period <= 0 or grid_beats <= 0:
        return None
    k = math.floor(_position(s, after) / grid_beats + 1e-9) + 1
    t = s.anchor_time + (k * grid_beats * PPQN - s.anchor_tick) * s.period
    return t if t > after else t + grid_beats * PPQN * s.period

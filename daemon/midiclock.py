"""Follow a DAW's MIDI clock: tempo, transport, song position, and the times of beats to come.

MIDI clock is 24 ticks per quarter note (0xF8), with transport messages Start (0xFA: the next
tick is the downbeat of position 0), Continue (0xFB: the next tick is at the current position),
Stop (0xFC) and Song Position Pointer (0xF2, in sixteenths, only meaningful while stopped).

Position comes from time, not from counting. JACK loses a late client's cycle of events, repeats
one now and then, and delivers a stalled client's ticks late and bunched together (DESIGN.md 2),
so a follower that counts ticks drifts a tick per loss. Here every tick gets its index on the
fitted tempo line: the index whose line time lies nearest to the tick's arrival, never the index
of the tick before. A tick that lands where the previous one already stands is a repeat or one of
a late bunch, and is not counted; a tick two periods after the last is the one after a lost one.
The song position is then the line itself, anchored by the last Start, Continue or Song Position
Pointer, so ticks delivered late move neither the position nor the tempo.

Tempo is a least-squares line through the last `window` on-line ticks (index, time), so one
tick's jitter moves it by ~1/window of that jitter. "Off the line" scales with the jitter seen
(rtmidi stamps a JACK tick when the cycle after it runs: with 256-frame periods up to 5.3 ms
late). A young line (under SLOPE_MIN_TICKS ticks) has too rough a slope to index by, so its ticks
are indexed by their intervals. Ticks off the line are left out of the fit; OFF_RUN successive
ticks off the line on one side are a tempo change (or the source's own clock moving), and the line
restarts from them. A tick early on the line after another short interval is a faster tempo, not
a repeat; one late after another as long interval a slower tempo, not a lost tick. A change so large
that the line would index its ticks wrongly shows in the raw intervals: OFF_RUN successive
intervals that agree with each other but not with the line restart it with consecutive indices.

Without any transport message (a clock source joined while its transport already rolled, or a
DAW that sends no Start) ticks alone are taken as the transport running, beats counted from the
first tick heard: the tempo is right, the bar is a guess (`assumed` says so).

`feed` is called by one thread (the one that sees input first). After each message the result is
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

# A tick this far off the line (or a tenth of a tick period, or JITTER_K times the mean distance
# of recent ticks from the line, if more; at most OFF_LINE_MAX of a period) counts as "off". The
# local jitter of JACK's dummy driver here is 0.5 ms median, 2 ms p99 with real-time scheduling,
# several ms without; a USB or network MIDI clock can be worse. OFF_RUN successive offs on one
# side mean the tempo (or the source's clock) moved.
OFF_LINE_S = 0.0025
JITTER_K = 4.0
JITTER_WINDOW = 32  # ticks the mean distance from the line averages over
OFF_LINE_MAX = 0.2
OFF_RUN = 3
# A fit with fewer ticks than this is young: a slope from three jittered ticks can be several % off,
# a beat later tens of ms. After a Start/Continue it keeps the tempo it had and fits only where the
# line lies; a fresh one (no tempo yet, or a new one) indexes its ticks by their intervals.
SLOPE_MIN_TICKS = 12
# Two successive long intervals this close (in periods) are a slower tempo; a late tick followed
# by a lost one gives two unequal ones (seen over JACK: 29 ms then 40 ms at 25 ms a tick).
SAME_INTERVAL = 0.2
# Raw intervals that say "tempo change" must imply a tempo within this factor of the old one:
# shorter ones are a late bunch arriving, longer ones a gap.
TEMPO_JUMP = 2.5
# No tick for this many periods (and at least LOST_MIN_S) means the clock is gone: free time.
# Shorter silences are a stalled graph far more often than a source gone without a Stop, and the
# line's extrapolation is the best beat there is (CI: a stall of over 0.25 s put an answer in free
# time, 0.3 beat off the source's beat).
LOST_PERIODS = 6.0
LOST_MIN_S = 1.0
# A stall only ever delays a tick; a lost tick's successor comes one period after the missing
# slot, give or take the jitter. So a tick this far short of the next-but-one slot still counts
# as following lost ticks; one earlier is a late tick (rounding at half a period read a stall of
# 0.5-0.75 period, common without real-time scheduling, as a lost tick: one tick early for good).
LOST_EARLY = 0.25
# Across a gap longer than this the line's extrapolation is not trusted for the tempo: the fit
# restarts (the position is still re-derived from the line, the best guess there is).
BRIDGE_S = 4.0
# With no tempo known yet, ticks closer than this (a tempo of 1250 bpm) are one tick twice.
MIN_PERIOD_S = 0.002
# A line slower than this (10 bpm) is not a clock's: answers are not placed by it (free time).
MAX_PERIOD_S = 0.25


class ClockState(NamedTuple):
    running: bool  # the transport plays (Start/Continue seen, no Stop since; or ticks with no transport at all)
    locked: bool  # running, and a tick has placed the song position on the time line
    period: float  # seconds per tick from the fit (0.0 until two ticks have been seen)
    anchor_time: float  # the line's time of the latest counted tick
    anchor_tick: int  # song position of the latest counted tick, in ticks (when locked)
    stopped_tick: int  # where the transport stands or will continue from, in ticks (when not locked)
    last_tick: float  # raw timestamp of the latest tick, for loss detection
    fit_ticks: int  # ticks in the current fit: precision grows with it
    assumed: bool  # locked, but beats counted from the first tick heard: no Start/Continue/SPP seen


class ClockConfigError(UserError, ValueError):
    """--beats-per-bar or --quantize out of range."""


_IDLE = ClockState(False, False, 0.0, 0.0, 0, 0, -math.inf, 0, False)


class ClockFollower:
    def __init__(self, beats_per_bar: int = 4, quantize: int = 0, window: int = 48) -> None:
        """`quantize`: answer onsets snap to 1/quantize notes while locked (0: no snapping)."""
        if beats_per_bar < 1:
            raise ClockConfigError(f"--beats-per-bar {beats_per_bar}: must be 1 or more")
        if quantize < 0:
            raise ClockConfigError(f"--quantize {quantize}: use 0 (off) or a note division such as 16")
        if window < OFF_RUN + 1:
            raise ValueError(f"window must hold at least {OFF_RUN + 1} ticks")
        self.beats_per_bar = beats_per_bar
        self.grid_beats = 4.0 / quantize if quantize else 0.0
        self.state = _IDLE
        # The fit: rings of (index, time) of on-line ticks, preallocated.
        self._idx = [0] * window
        self._times = [0.0] * window
        self._head = 0  # slot of the next sample
        self._n = 0  # samples in the fit
        self._period = 0.0  # kept across restarts: the best guess for indexing the next ticks
        self._prior = 0.0  # the tempo a restarted fit keeps until it has SLOPE_MIN_TICKS ticks
        self._jitter = 0.0  # mean distance of recent on-line ticks from the line
        self._line = 0.0  # the line's time at index self._index
        self._index = 0  # index of the latest counted tick (free-running; song position = index + _offset)
        # Raw times of the latest ticks heard (repeats too) and the index each was given, for
        # the interval test; and the current run of counted ticks off the line (index, time, residual).
        self._raw = [0.0] * (OFF_RUN + 1)
        self._raw_idx = [0] * (OFF_RUN + 1)
        self._raw_n = 0
        self._offs: list[tuple[int, float, float]] = []
        self._last_raw = -math.inf
        self._running = False
        self._heard_transport = False
        self._next_tick = 0  # song position the next tick will have (when not locked)
        self._locked = False
        self._offset = 0  # song position minus index, while locked
        # Counters for logs, tests and --stats.
        self.restarts = 0  # the line restarted on a tempo change
        self.lost = 0  # ticks the line says never arrived
        self.repeats = 0  # ticks not counted: a repeat, or one of a late bunch
        self.late = 0  # ticks counted but left out of the fit (off the line)

    # ------------------------------------------------------------------ input (one thread)

    def feed(self, msg: list[int] | tuple[int, ...], t: float) -> bool:
        """Consume one message received at t; False if it is not a clock/transport message."""
        status = msg[0] if msg else 0
        if status == CLOCK:
            self._tick(t)
            return True
        if status == START:
            self._transport(True, 0)
        elif status == CONTINUE:
            self._transport(True, self._stood())
        elif status == STOP:
            self._transport(False, self._stood())
        elif status == SONG_POSITION and len(msg) >= 3:
            self._transport(self._running, ((msg[2] & 0x7F) << 7 | (msg[1] & 0x7F)) * TICKS_PER_SPP_UNIT)
        else:
            return False
        self._publish()
        return True

    def _stood(self) -> int:
        """Where the transport stands: after the last tick played, or where it was put."""
        return self._index + self._offset + 1 if self._locked else self._next_tick

    def _transport(self, running: bool, next_tick: int) -> None:
        self._running, self._locked, self._next_tick = running, False, next_tick
        self._heard_transport = True
        # The next tick re-anchors the song position, and may start a new tick grid (JACK's
        # transport restarts its ticks at the located frame): the fit starts over, tempo kept.
        self._n = 0
        self._prior = self._period
        self._raw_n = 0
        self._offs.clear()

    def _tick(self, t: float) -> None:
        p = self._period
        gap = t - self._last_raw
        self._last_raw = t
        if p <= 0 and 0 < self._n and gap < MIN_PERIOD_S:
            self.repeats += 1  # no tempo yet, and closer than any tempo's ticks: the same tick again
        elif self._n == 0 or p <= 0:
            self._count(1, t)
        else:
            self._raw_push(t)
            young = self._young()
            if young:
                d = gap / p - 1  # a young line's slope is too rough to index by: the interval does
            else:
                d = (t - (self._line + p)) / p  # periods past where the next tick belongs
            if self._tempo_jumped(young):
                self._restart_consecutive()
            elif d < -0.5 and not self._faster(gap, p):
                self.repeats += 1  # a repeat, or one of a late bunch: its index is already counted
                # A bunch means the ticks before it were held back by a stall, not that the line
                # moved: they must not restart the fit from their late times.
                self._offs.clear()
            else:
                if gap > BRIDGE_S:
                    self._n = 0  # keep the position the line gives, but fit the tempo afresh
                    self._prior = 0.0
                self._count(1 if self._slower(gap, p) else 1 + max(0, math.floor(d + LOST_EARLY)), t)
        if self._running and not self._locked:
            self._offset, self._locked = self._next_tick - self._index, True
        elif not self._running and not self._heard_transport:
            # Ticks and no transport message ever: the transport runs, beats count from here.
            self._running, self._locked, self._offset = True, True, -self._index
        self._publish()

    def _count(self, steps: int, t: float) -> None:
        """Tick t is `steps` ticks after the latest counted one."""
        p = self._period
        self.lost += steps - 1
        self._index += steps
        self._line += steps * p  # along the line; a fit below replaces it
        if self._raw_n == 0 or self._raw[-1] != t:
            self._raw_push(t)
        self._raw_idx[-1] = self._index
        res = t - self._line
        if self._n == 0 or p <= 0 or self._young() or abs(res) <= self._off_line(p):
            if self._n > 0 and p > 0:
                self._jitter += (abs(res) - self._jitter) / JITTER_WINDOW
            self._offs.clear()
            self._add(t)
            return
        self.late += 1
        self._jitter += (self._off_line(p) - self._jitter) / JITTER_WINDOW  # off by at least this much
        # A moved line (a stepped clock, a new tempo) shows in successive ticks; a stall's late
        # ticks read as following lost ones, and must not restart the fit from their times.
        if self._offs and ((res > 0) != (self._offs[-1][2] > 0) or self._index != self._offs[-1][0] + 1):
            self._offs.clear()
        self._offs.append((self._index, t, res))
        if len(self._offs) >= OFF_RUN:
            # The line moved: the source's clock stepped, or the tempo changed a little. The
            # indices stand; the fit restarts from these ticks alone.
            self.restarts += 1
            self._n = 0
            for index, tt, _ in self._offs:
                self._put(index, tt)
            self._offs.clear()
            self._fit()

    def _raw_push(self, t: float) -> None:
        self._raw.pop(0)
        self._raw.append(t)
        self._raw_idx.pop(0)
        self._raw_idx.append(self._index)  # a repeat stands at the index it repeats
        self._raw_n = min(self._raw_n + 1, len(self._raw))

    def _tempo_jumped(self, young: bool) -> bool:
        """The latest OFF_RUN raw intervals agree with each other and not with the line: a tempo
        change too large for the line to index its ticks right (a slower one reads as lost ticks,
        a faster one as repeats). A young line's period may come from a single interval that a
        stall stretched or a bunch squeezed (every later tick would then read as a repeat, or as
        several): steady intervals overrule it however far they are from it."""
        raw, p = self._raw, self._period
        if self._raw_n < len(raw):
            return False
        iv = [raw[i + 1] - raw[i] for i in range(len(raw) - 1)]
        lo, hi = min(iv), max(iv)
        if young:
            tol = max(OFF_LINE_S, 0.1 * lo)
            return lo >= MIN_PERIOD_S and hi - lo <= 2 * tol and (lo > p + tol or hi < p - tol)
        tol = self._off_line(p)
        return (hi - lo <= 2 * tol and (lo > p + tol or hi < p - tol)
                and p / TEMPO_JUMP <= lo and hi <= p * TEMPO_JUMP)

    def _restart_consecutive(self) -> None:
        """The raw ring's ticks are consecutive ticks of the new tempo; the first keeps its index."""
        self.restarts += 1
        first = self._raw_idx[0]
        self._n = 0
        self._prior = 0.0  # a new tempo: the raw ticks' own slope
        self._offs.clear()
        for i, t in enumerate(self._raw):
            self._put(first + i, t)
            self._raw_idx[i] = first + i
        self._index = first + len(self._raw) - 1
        self._fit()

    def _prev_interval(self) -> float:
        """The raw interval before the latest one (0.0 until three ticks were heard)."""
        return self._raw[-2] - self._raw[-3] if self._raw_n >= 3 else 0.0

    def _faster(self, gap: float, p: float) -> bool:
        """Early on the line, but a tick's interval after another short one: the tempo went up (a
        repeat or a late bunch arrives with no interval; the first tick after a stall, after a long one)."""
        return gap >= 0.5 * p and 0.5 * p <= self._prev_interval() <= 0.95 * p

    def _slower(self, gap: float, p: float) -> bool:
        """Late on the line, but a tick's interval after another long one as long, neither long
        enough to hold a lost tick: the tempo went down."""
        prev = self._prev_interval()
        return 1.05 * p <= gap <= 1.6 * p and 1.05 * p <= prev <= 1.6 * p and abs(gap - prev) <= SAME_INTERVAL * p

    def _young(self) -> bool:
        """Too few ticks in the fit (and no tempo kept) for its line to say a tick is off or lost."""
        return self._n < SLOPE_MIN_TICKS and self._prior <= 0

    def _off_line(self, p: float) -> float:
        return min(max(OFF_LINE_S, 0.1 * p, JITTER_K * self._jitter), OFF_LINE_MAX * p)

    def _add(self, t: float) -> None:
        self._put(self._index, t)
        self._fit()

    def _put(self, index: int, t: float) -> None:
        w = len(self._times)
        self._idx[self._head] = index
        self._times[self._head] = t
        self._head = (self._head + 1) % w
        self._n = min(self._n + 1, w)

    def _fit(self) -> None:
        n, w, head = self._n, len(self._times), self._head
        new = (head - 1) % w
        x0, y0 = self._idx[new], self._times[new]
        if n == 1:
            self._line = y0 + (self._index - x0) * self._period
            return
        if n >= SLOPE_MIN_TICKS:
            self._prior = 0.0
        # x: index relative to the newest sample, y: time relative to it (small, exact floats)
        sx = sy = sxx = sxy = 0.0
        for k in range(n):
            j = (head - 1 - k) % w
            x, y = self._idx[j] - x0, self._times[j] - y0
            sx += x
            sy += y
            sxx += x * x
            sxy += x * y
        den = n * sxx - sx * sx
        if den <= 0:
            return
        slope = self._prior if self._prior > 0 else (n * sxy - sx * sy) / den
        self._period = slope
        self._line = y0 + (sy - slope * sx) / n + slope * (self._index - x0)

    def _publish(self) -> None:
        locked = self._running and self._locked
        self.state = ClockState(self._running, locked, self._period, self._line,
                                self._index + self._offset if locked else 0, self._next_tick, self._last_raw,
                                self._n, locked and not self._heard_transport)

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
        return synced(self.state, now)

    def position_beats(self, t: float) -> float:
        """Song position at time t in beats (quarter notes) from the song start."""
        return position(self.state, t)

    def time_of(self, beats: float) -> float | None:
        """When song position `beats` plays, extrapolating the current tempo; None if not locked."""
        return time_of(self.state, beats)

    def next_grid(self, after: float, grid_beats: float) -> float | None:
        """The first time strictly after `after` at a multiple of grid_beats from the song start."""
        return next_grid(self.state, after, grid_beats)

    def next_beat(self, after: float) -> float | None:
        return next_grid(self.state, after, 1.0)

    def next_bar(self, after: float) -> float | None:
        return next_grid(self.state, after, float(self.beats_per_bar))

    def snap(self, t: float, now: float, not_before: float | None = None) -> float:
        """Answer onset t moved to the nearest grid point while synced (unchanged in free time or
        with quantize off); never earlier than `not_before` (e.g. now plus the output latency)."""
        s, g = self.state, self.grid_beats  # one snapshot for the whole computation
        if g <= 0 or not synced(s, now):
            return t
        q = time_of(s, round(position(s, t) / g) * g)
        if q is None:
            return t
        if not_before is not None and q < not_before:
            q = next_grid(s, not_before - 1e-9, g) or max(t, not_before)
        return q


# Queries work on one ClockState, so a tick published by the feeding thread mid-query cannot mix
# two fits into one answer.

def synced(s: ClockState, now: float) -> bool:
    return (s.locked and 0 < s.period <= MAX_PERIOD_S
            and now - s.last_tick <= ClockFollower._lost_after(s.period))


def position(s: ClockState, t: float) -> float:
    if not s.locked or s.period <= 0:
        return s.stopped_tick / PPQN
    return (s.anchor_tick + (t - s.anchor_time) / s.period) / PPQN


def time_of(s: ClockState, beats: float) -> float | None:
    if not s.locked or s.period <= 0:
        return None
    return s.anchor_time + (beats * PPQN - s.anchor_tick) * s.period


def next_grid(s: ClockState, after: float, grid_beats: float) -> float | None:
    if not s.locked or s.period <= 0 or grid_beats <= 0:
        return None
    k = math.floor(position(s, after) / grid_beats + 1e-9) + 1
    t = s.anchor_time + (k * grid_beats * PPQN - s.anchor_tick) * s.period
    return t if t > after else t + grid_beats * PPQN * s.period

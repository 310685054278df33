"""Token sampling for the daemon: numpy only, seeded, with a grammar mask from the decoder's ledger.

The mask keeps generated streams inside what the encoder itself produces: the encoder releases a
key before re-striking it, so a NOTE_ON for a sounding key never occurs in training data and is
masked (the model must emit the NOTE_OFF first); NOTE_OFF for a silent key and pedal tokens that
would not change the pedal are no-ops for the decoder and are masked so they cannot waste steps.
"""

from __future__ import annotations

import math

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import Steers
from antiphon.daemon.memory import CLUSTER_STEPS, SessionMemory, mix_pitch, mix_top

# Event kinds as contiguous token ranges (specials, NOTE_ON, NOTE_OFF, TIME_SHIFT, VELOCITY, pedal).
KIND_STARTS = np.array([0, V.NOTE_ON, V.NOTE_OFF, V.TIME_SHIFT, V.VELOCITY, V.SUSTAIN_ON])
KIND_ENDS = np.append(KIND_STARTS[1:], V.VOCAB_SIZE)
NOTE_KINDS = [1, 4]  # NOTE_ON, and VELOCITY, which only ever precedes a NOTE_ON
OFF_KIND, SHIFT_KIND = 2, 3
GROOVE_STEPS = 200  # the rhythm steer looks at inter-onset intervals from GROOVE_MIN steps up to 2 s
GROOVE_FLOOR, GROOVE_CEILING = 1 / 8, 8.0  # the rhythm steer's bounds on the onset odds
GROOVE_MIN = 4  # from 40 ms (at 80 ms, the answers rolled and ornamented twice as often as the calls)
# The dynamics steer's velocity odds are cooled this much before the tilt: the model's spread is
# wider than pianists' (velocity std 1.17 / 1.08 / 0.98 of theirs on three unreported sets of
# training-split performances; at 0.9: 1.08 / 1.0 / 0.90).
VELOCITY_TEMPERATURE = 0.9
# The release steer's gain at --follow-articulation 1. Chosen on four unreported sets, two seeds each
# (docs/model.md): at 3.0, used until 2026-12-02, answers held notes over 1.5 s 1.40-1.50x as often as
# the pianists on steady-pulse calls and 1.3-1.4x on training-split performances; at 6.0: 1.16-1.17x,
# 0.98-1.41x, rhythm, density and key unchanged.
RELEASE_GAIN = 6.0
REGISTER_NEAR = 3  # semitones: an answer note this close to the call's lowest (highest) note reaches it
REGISTER_MAX = 3.0  # nats: the register steer's largest tilt
_SHIFT_STEPS = np.arange(1, V.MAX_SHIFT + 1)
# The rhythm classes: 24 log-spaced, 20 ms .. 2 s. `antiphon eval`'s rhythm metric counts in these
# same classes (ioi_classes), so what the steer aims at is what is measured.
IOI_EDGES = np.geomspace(2, GROOVE_STEPS, 25)
_STEPS = np.arange(GROOVE_STEPS + 1)
_STEP_CLASS = np.clip(np.searchsorted(IOI_EDGES, _STEPS, side="right") - 1, 0, len(IOI_EDGES) - 2)


def ioi_classes(steps: np.ndarray) -> np.ndarray:
    """The rhythm class of each inter-onset interval (in steps; rounded to whole steps, as the
    tokens hold them, so that float seconds never straddle an edge by a rounding error)."""
    return _STEP_CLASS[np.clip(np.rint(np.asarray(steps, dtype=np.float64)), 0, GROOVE_STEPS).astype(np.intp)]

# How many whole steps each class holds: a class's mass is shared among those (its width, 0.75 of a
# step for 40 ms, would give that one step 1.33x its share, and 70 ms, 1.34 steps wide, 0.75x).
_CLASS_STEPS = np.bincount(_STEP_CLASS[_STEPS >= IOI_EDGES[0]], minlength=len(IOI_EDGES) - 1).astype(np.float64)
# The call's rhythm is smoothed with this many intervals' worth of mass spread evenly per step, a
# quarter of one per class. Chosen on four unreported sets (docs/model.md): at half of one, used until
# 2026-12-02, answers to steady-pulse calls kept 0.91 of the pianists' rhythm overlap, the quick
# notes between beats being discouraged no more than 8-fold. (Per class instead of per step, the
# narrow classes of quick intervals outweighed a call's own beat.)
SMOOTHING = 0.25 * (len(IOI_EDGES) - 1)
_EVEN = _CLASS_STEPS / _CLASS_STEPS.sum()
_VELOCITY_BINS = np.arange(V.VELOCITY_BINS, dtype=np.float64)


class Sampler:
    """Temperature and top-p shape which note is played, never when: the event kind is drawn at
    the model's own odds and every kind but NOTE_ON is sampled as the model gives it.

    Plain temperature/top-p over the whole vocabulary skews the rhythm: a TIME_SHIFT's mass is
    spread over 100 bins, so cooling or truncating removes time and leaves notes (measured on
    held-out calls: 2.6x the true note density at T=0.8, top-p 0.9); cooling within the shifts
    favours the commonest, shortest ones, which is no better (4.3x at T=0.85). So the player's
    knob changes adventurousness of pitch, and the answer keeps the model's sense of time.
    temperature <= 0 means greedy.

    `follow_density` w in [0, 1] steers the answer's note rate toward the call's (see `begin`):
    left alone, sampled answers drift busier than what players really play next (+26 % note
    density over the true continuations of held-out performances, which stay within 5 % of their
    calls). The steer is feedback on the odds of the kinds that start notes: after n answer notes
    in s seconds, against the call's rate r, they are scaled by ((r*s + 1) / (n + 1))**(w / (1 - w)).
    Where the model alone would play m notes/s, that settles at m**(1-w) * r**w: w is the call's
    share of the answer's rate, in log space. 0 leaves the model's own odds; 1 is capped at 0.95.
    """

    def __init__(self, seed: int | None, temperature: float, top_p: float, follow_density: float = 0.0,
                 memory: SessionMemory | None = None, memory_scale: float = 1.0, follow_dynamics: float = 0.0,
                 follow_articulation: float = 0.0, follow_rhythm: float = 0.0, follow_register: float = 0.0):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_share("follow_density", follow_density)
        # JamConfig uses -1 for "random seed".
        self.rng = np.random.default_rng(None if seed is None or seed < 0 else seed)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        w = min(float(follow_density), 0.95)
        self.gain = w / (1.0 - w)
        self.rate = 0.0  # the call's notes per second; 0: no steer
        self.notes = self.steps = 0  # the answer's so far, as sampled
        _check_share("follow_dynamics", follow_dynamics)
        self.follow_dynamics = float(follow_dynamics)
        self.call_velocity = -1.0  # the call's mean velocity bin; < 0: no steer
        _check_share("follow_articulation", follow_articulation)
        self.release_gain = RELEASE_GAIN * float(follow_articulation)
        self.hold_steps = 0.0  # the call's long-note length in steps; 0: no steer
        self._age = np.zeros(V.N_PITCH)
        _check_share("follow_rhythm", follow_rhythm)
        self.follow_rhythm = float(follow_rhythm)
        self.groove: np.ndarray | None = None  # per elapsed step: how much the rhythm favours an onset there
        self.since = 0  # steps since the answer's last onset cluster began
        _check_share("follow_register", follow_register)
        self.follow_register = float(follow_register)
        self.call_range = (-1, -1)  # the call's lowest and highest pitch; -1: no register steer
        self.reached = [V.N_PITCH, -1]  # the answer's lowest and highest pitch so far
        # The session memory proposes pitches; memory_scale (the player's --memory, 0: off) scales its weight.
        self.memory, self.memory_scale = memory, float(memory_scale)

    def begin(self, call_notes: int, call_s: float, call_velocity: float = -1.0, call_hold_s: float = -1.0,
              call_onsets: np.ndarray | None = None, call_range: tuple[int, int] = (-1, -1)) -> None:
        """A new answer to a call of `call_notes` notes over `call_s` seconds (a call shorter than
        1 s counts as 1 s: three grace notes are not a rate of ten per second), played at a mean
        MIDI velocity of `call_velocity` (< 0: unknown, no dynamics steer), whose long notes (the
        90th percentile of its key-down lengths) last `call_hold_s` (< 0: unknown, no release steer),
        whose note-ons came at `call_onsets` (seconds; None: no rhythm steer), and whose lowest and
        highest pitches were `call_range` ((-1, -1): unknown, no register steer)."""
        self.call_range = call_range
        self.reached = [V.N_PITCH, -1]
        self.groove = groove(call_rhythm(call_onsets), self.follow_rhythm)
        self.since = 0
        self.rate = call_notes / max(call_s, 1.0)
        self.hold_steps = max(call_hold_s, 0.1) / V.STEP_S if call_hold_s > 0 else 0.0
        self.call_velocity = V.velocity_bin(round(call_velocity)) if call_velocity > 0 else -1.0
        self.notes = self.steps = 0

    def begin_call(self, notes: list[codec.Note], seconds: float) -> None:
        """`begin` from a call given as notes (offline: continue and eval; jam keeps running sums)."""
        self.begin(len(notes), seconds, float(np.mean([n.velocity for n in notes])) if notes else -1.0,
                   long_note_s([n.end - n.start for n in notes]), np.array([n.start for n in notes]),
                   (min(n.pitch for n in notes), max(n.pitch for n in notes)) if notes else (-1, -1))

    def _note_odds(self) -> float:
        if self.gain <= 0.0 or self.rate <= 0.0:
            return 1.0
        expected = self.rate * self.steps * V.STEP_S
        return math.exp(min(max(self.gain * math.log((expected + 1.0) / (self.notes + 1.0)), -4.0), 4.0))

    def _count(self, token: int, decoder: codec.TokenDecoder | None) -> int:
        if decoder is not None:
            token = decoder.capped(token)  # the model hears what will sound: notes end before max_note_s
        if self.memory is not None:
            self.memory.hear_token(token, learn=False)  # context for the next proposal, not material
        if V.NOTE_ON <= token < V.NOTE_OFF:
            self.notes += 1
            pitch = token - V.NOTE_ON
            self.reached[0], self.reached[1] = min(self.reached[0], pitch), max(self.reached[1], pitch)
            if self.since > CLUSTER_STEPS:
                self.since = 0
        elif V.TIME_SHIFT <= token < V.VELOCITY:
            self.steps += token - V.TIME_SHIFT + 1
            self.since += token - V.TIME_SHIFT + 1
        return token

    def _draw(self, weights: np.ndarray) -> int:
        c = np.cumsum(weights)
        return min(int(np.searchsorted(c, self.rng.random() * c[-1], side="right")), len(c) - 1)

    def _release_due(self, decoder: codec.TokenDecoder | None,
                     shifts: np.ndarray) -> tuple[float, np.ndarray, np.ndarray] | None:
        """The release steer's view of the sounding keys, or None when it is off or none sound:
        (how far past the call's long-note length the keys are, summed, in those lengths;
         per key, how much it is due to be let go: that, plus what the model's likely waits add;
         per TIME_SHIFT length, the factor on its odds: exp(-gain x the overdue time, summed over
         the keys, that waiting so long adds)).

        A pianist lets go of a key some time after the call's own long-note length, the more
        likely the longer it is overdue: a hazard in time. Judged per token only, one long
        TIME_SHIFT would carry a key from before that length to far past it unjudged (with sparse
        onsets: held notes 1.65x the pianists'), so waiting is priced by the integral of
        (age / length - 1) over the wait. `shifts`: the model's odds of each shift length."""
        if decoder is None or self.release_gain <= 0.0 or self.hold_steps <= 0.0:
            return None
        onset = np.fromiter(decoder.onset, dtype=np.float64, count=V.N_PITCH)
        sounding = onset >= 0
        if not sounding.any():
            return None
        age = self._age
        age[:] = 0.0
        age[sounding] = (decoder.step - onset[sounding]) / self.hold_steps
        over = np.maximum(age - 1.0, 0.0)
        ends = age[sounding, None] + _SHIFT_STEPS[None, :] / self.hold_steps
        added = 0.5 * (np.maximum(ends - 1.0, 0.0) ** 2 - over[sounding, None] ** 2)
        due = over.copy()
        due[sounding] += added @ (shifts / max(float(shifts.sum()), 1e-300))
        return float(over.sum()), due, np.exp(-self.release_gain * added.sum(axis=0))

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None,
               decoder: codec.TokenDecoder | None = None) -> int:
        """`decoder`: the answer's, whose ledger tells how long each key has been held (for the
        release steer) and when a note reaches max_note_s (a shift that would carry it there is
        cut short, and its NOTE_OFF comes next: `TokenDecoder.capped`); None: neither."""
        x = np.array(logits, dtype=np.float64)  # a copy: the engine reuses its logits buffer
        if mask is not None:
            x[~mask] = -np.inf
        best = int(np.argmax(x))
        if not np.isfinite(x[best]):
            raise ValueError("the mask allows no token")
        if self.temperature <= 0.0:
            return self._count(best, decoder)
        p = np.exp(x - x[best])
        kinds = np.add.reduceat(p, KIND_STARTS)
        odds = self._note_odds()
        if self.groove is not None and self.notes and self.since > CLUSTER_STEPS:
            odds *= float(self.groove[min(self.since, GROOVE_STEPS)])  # onsets where the call has them
        if odds != 1.0:
            # The steer trades notes against time; releases keep the model's share. Boosting note-ons
            # against note-offs too would postpone every release while an answer catches up with a
            # busy call, and the held notes pile up into a drone.
            off_share = kinds[OFF_KIND] / kinds.sum()
            kinds[NOTE_KINDS] *= odds
            if off_share < 1.0:
                kinds[OFF_KIND] = off_share / (1.0 - off_share) * (kinds.sum() - kinds[OFF_KIND])
        model_shifts = p[V.TIME_SHIFT:V.VELOCITY]
        due = self._release_due(decoder, model_shifts)
        if due is not None:
            overdue, keys_due, wait_price = due
            # Every kind but a release is a way of keeping the keys down: past the call's own
            # long-note length its odds shrink the more the keys are overdue, and each wait is
            # priced by what it adds (the model, left alone, lets held notes pile up into a drone;
            # a note it has lost track of would otherwise sound until the cap).
            total = kinds.sum()
            stay = (total - kinds[OFF_KIND]) * math.exp(-0.5 * self.release_gain * overdue)
            kinds *= stay / max(total - kinds[OFF_KIND], 1e-300)
            kinds[SHIFT_KIND] *= float(model_shifts @ wait_price) / max(float(model_shifts.sum()), 1e-300)
            kinds[OFF_KIND] = total - (kinds.sum() - kinds[OFF_KIND])
        kind = self._draw(kinds)
        lo = int(KIND_STARTS[kind])
        if lo == V.NOTE_OFF and due is not None:
            # Prefer releasing the keys that are due, in proportion to how overdue.
            off = p[V.NOTE_OFF:V.TIME_SHIFT]
            w = off * np.exp(np.minimum(self.release_gain * keys_due, 6.0)) + keys_due * off.sum()
            return self._count(lo + self._draw(w), decoder)
        if lo == V.VELOCITY and self.follow_dynamics > 0.0 and self.call_velocity >= 0:
            return self._count(lo + self._draw(self._dynamics(p[lo:int(KIND_ENDS[kind])])), decoder)
        if lo == V.TIME_SHIFT:
            shifts = model_shifts
            if self.groove is not None and self.notes:
                # Land where the call's onsets would land: each shift weighted by the groove where it ends.
                shifts = shifts * np.sqrt(self.groove[np.minimum(self.since + _SHIFT_STEPS, GROOVE_STEPS)])
            if due is not None:
                shifts = shifts * wait_price  # waiting is cut short where it costs
            return self._count(lo + self._draw(shifts), decoder)
        if lo != V.NOTE_ON:
            return self._count(lo + self._draw(p[lo:int(KIND_ENDS[kind])]), decoder)
        return self._count(self._pitch(x[lo:int(KIND_ENDS[kind])]) + lo, decoder)

    def _dynamics(self, q: np.ndarray) -> np.ndarray:
        """Tilt the velocity-bin odds q (unnormalised) so that their mean moves `follow_dynamics` of
        the way from the model's to the call's mean bin: q(b) ** (1 / VELOCITY_TEMPERATURE) *
        exp(theta * b). A tilt moves the loudness and keeps the model's accents (a product with a
        Gaussian would flatten them). The tilted mean grows with theta, so theta is found by bisection."""
        q = q / q.sum()
        bins = _VELOCITY_BINS
        model_mean = float(q @ bins)
        target = model_mean + self.follow_dynamics * (self.call_velocity - model_mean)
        lo, hi = -4.0, 4.0
        logq = np.log(np.maximum(q, 1e-300)) / VELOCITY_TEMPERATURE
        for _ in range(24):
            theta = 0.5 * (lo + hi)
            z = logq + theta * bins
            w = np.exp(z - z.max())
            w /= w.sum()
            if float(w @ bins) < target:
                lo = theta
            else:
                hi = theta
        return w

    def pitch_logits(self, y: np.ndarray) -> np.ndarray:
        """The NOTE_ON logits (masked: -inf) with the session memory's proposal mixed in."""
        if self.memory is None or self.memory_scale <= 0.0:
            return y
        weight, proposal = self.memory.propose()
        y = mix_pitch(y, weight * self.memory_scale, proposal)
        weight, proposal, above, last = self.memory.propose_top()
        return mix_top(y, weight * self.memory_scale, proposal, above, last)

    def _register(self, y: np.ndarray) -> np.ndarray:
        """Pitch logits tilted toward the ends of the call's range that the answer has not reached:
        +follow_register nats per second of answer, up to REGISTER_MAX, on the pitches within
        REGISTER_NEAR of the call's lowest (highest) note. Left alone, 42 % of answers to calls from
        training-split performances never came within 3 semitones of the call's lowest note (the
        pianists: 19 %): a one-handed answer to a two-handed call."""
        lo, hi = self.call_range
        gain = min(self.follow_register * self.steps * V.STEP_S, REGISTER_MAX)
        if lo < 0 or gain <= 0.0:
            return y
        y = np.array(y, dtype=np.float64)
        if self.reached[0] > lo + REGISTER_NEAR:
            y[max(lo - 2, 0):lo + REGISTER_NEAR + 1] += gain
        if self.reached[1] < hi - REGISTER_NEAR:
            y[max(hi - REGISTER_NEAR, 0):hi + 3] += gain
        return y

    def _pitch(self, y: np.ndarray) -> int:
        y = self._register(self.pitch_logits(y))
        y = (y - y.max()) / self.temperature
        q = np.exp(y, out=y)
        if self.top_p < 1.0:
            order = np.argsort(-q, kind="stable")
            mass = np.cumsum(q[order])
            # Smallest prefix whose mass reaches top_p (always at least the best token).
            kept = order[:int(np.searchsorted(mass, self.top_p * mass[-1])) + 1]
            return int(kept[self._draw(q[kept])])
        return self._draw(q)


def _check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def call_rhythm(onsets: np.ndarray | None) -> np.ndarray | None:
    """The call's inter-onset intervals (between onset clusters) as a distribution over the
    rhythm classes (IOI_EDGES), with a little mass spread evenly over all steps so that no step is
    ruled out; None: fewer than 4 intervals to go by."""
    if onsets is None or len(onsets) < 5:
        return None
    t = np.sort(np.asarray(onsets, dtype=np.float64)) / V.STEP_S
    starts = t[np.concatenate([[True], np.diff(t) > CLUSTER_STEPS])]
    iois = np.diff(starts)
    if iois.size < 4:
        return None
    hist = np.bincount(ioi_classes(iois), minlength=len(_EVEN))
    mass = hist + SMOOTHING * _EVEN
    return mass / mass.sum()


def groove(rhythm: np.ndarray | None, strength: float) -> np.ndarray | None:
    """Per elapsed step since an onset cluster: how much likelier the distribution of intervals
    `rhythm` (over the classes IOI_EDGES) makes an onset there than a steady random player with
    the same mean interval would, to the power `strength`, within [1/8, 8] (None: no rhythm to go
    by). That is the hazard (the share of intervals that end at this step, of those that have not
    ended before) over the flat hazard of the same mean: a call with a steady beat makes onsets
    likely on that beat and unlikely before it. (The interval density alone, used until
    2026-12-02, left a step between beats almost as likely as the beat: on held-out performances
    the answers' onsets fell on the call's pulse half as often as the pianists' own.)"""
    if strength <= 0.0 or rhythm is None:
        return None
    pmf = (rhythm / np.maximum(_CLASS_STEPS, 1.0))[_STEP_CLASS]
    pmf[:GROOVE_MIN] = 0.0
    pmf /= pmf.sum()
    survival = 1.0 - np.concatenate([[0.0], np.cumsum(pmf)[:-1]])
    hazard = pmf / np.maximum(survival, 1e-3)
    ratio = np.clip(hazard * float(pmf @ _STEPS), GROOVE_FLOOR, GROOVE_CEILING) ** strength
    ratio[:GROOVE_MIN] = 1.0  # the notes of a rolled chord: the model's own business
    return ratio


def long_note_s(holds) -> float:
    """The player's long-note length: the 90th percentile of their recent key-down lengths (-1: none yet)."""
    return float(np.percentile(holds, 90)) if len(holds) >= 4 else -1.0


def jam_sampler(seed: int | None, steers: Steers, with_memory: bool = True) -> Sampler:
    """The jam's sampler, as jam, continue and eval all use it. The session memory always learns
    (a live control may turn it up later); `steers.memory` scales how much it is heard, 0: not at
    all. with_memory=False: no memory at all (eval's Markov baseline)."""
    _check_share("memory", steers.memory)
    return Sampler(seed, steers.temperature, steers.top_p, steers.follow_density,
                   SessionMemory() if with_memory else None, steers.memory, steers.follow_dynamics,
                   steers.follow_articulation, steers.follow_rhythm, steers.follow_register)


_BASE = np.ones(V.VOCAB_SIZE, dtype=bool)
_BASE[V.PAD] = _BASE[V.BOS] = False


def grammar_mask(decoder: codec.TokenDecoder, out: np.ndarray | None = None) -> np.ndarray:
    """Fill `out` (bool, (VOCAB_SIZE,)) with the tokens allowed after the decoder's current state."""
    if out is None:
        out = np.empty(V.VOCAB_SIZE, dtype=bool)
    out[:] = _BASE
    sounding = np.fromiter((o >= 0 for o in decoder.onset), dtype=bool, count=V.N_PITCH)
    out[V.NOTE_ON:V.NOTE_OFF] = ~sounding
    out[V.NOTE_OFF:V.TIME_SHIFT] = sounding
    out[V.SUSTAIN_ON] = not decoder.sustain
    out[V.SUSTAIN_OFF] = decoder.sustain
    return out

"""MIDI ↔ timed events ↔ tokens, in batch (files) and streaming (live bytes) form.

One encoder serves both: a file is turned into the same timed events a live keyboard would
send, in time order, and fed through `TokenEncoder` exactly as the daemon feeds live bytes.
The decoder is streaming too and keeps a ledger of sounding notes, so no token sequence,
however malformed, can leave a note on: a note held longer than `max_note_s` is closed, and
`close()` closes everything that is still sounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError

NOTE_OFF_STATUS, NOTE_ON_STATUS, CC_STATUS = 0x80, 0x90, 0xB0
CC_SUSTAIN, CC_ALL_SOUND_OFF, CC_ALL_NOTES_OFF = 64, 120, 123

# Event kinds, ordered so that at equal times offs come before ons (a re-struck key is
# released before it is struck again) and the pedal changes between them.
OFF, SUSTAIN, ON = 0, 1, 2


class Note(NamedTuple):
    pitch: int
    start: float  # seconds
    end: float
    velocity: int


class Event(NamedTuple):
    time: float  # seconds
    kind: int  # OFF, SUSTAIN or ON
    value: int  # pitch, or 0/1 for the pedal
    velocity: int = 0


class TimedMessage(NamedTuple):
    time: float  # seconds from the decoder's origin
    status: int
    data1: int
    data2: int

    def bytes(self) -> list[int]:
        return [self.status, self.data1, self.data2]


class Performance(NamedTuple):
    notes: list[Note]
    sustain: list[tuple[float, bool]]  # pedal changes (time, down)

    @property
    def duration(self) -> float:
        return max((n.end for n in self.notes), default=0.0)


class MidiFileError(UserError, ValueError):
    """A MIDI file that cannot be read; the message says which file and why."""


# --------------------------------------------------------------------------- files

def load_midi(path: str | Path) -> Performance:
    """Read a MIDI file: tracks merged, drums dropped, tempo map honoured (times in seconds)."""
    import symusic  # imported here so that `antiphon --help` stays fast

    path = Path(path)
    if not path.is_file():
        raise MidiFileError(f"{path}: no such file")
    try:
        score = symusic.Score(str(path)).to("second")
    except Exception as e:  # symusic raises bare ValueError/RuntimeError on bad bytes
        raise MidiFileError(f"{path}: not a readable MIDI file ({e}); check that it is a .mid/.midi file") from e
    notes: list[Note] = []
    sustain: list[tuple[float, bool]] = []
    for track in score.tracks:
        if track.is_drum:
            continue
        notes.extend(Note(n.pitch, float(n.time), float(n.time + n.duration), n.velocity)
                     for n in track.notes if n.velocity > 0)
        sustain.extend((float(c.time), c.value >= 64) for c in track.controls if c.number == CC_SUSTAIN)
    notes.sort(key=lambda n: (n.start, n.pitch))
    sustain.sort(key=lambda s: s[0])
    return Performance(notes, sustain)


def _release_before_restrike(notes: list[Note]) -> list[Note]:
    """A key struck again while still sounding is released at the new strike, as on a piano,
    so that the later release of the first note cannot cut the second one short."""
    out: list[Note] = []
    last: dict[int, int] = {}  # pitch -> index in out of its latest note
    for n in sorted(notes, key=lambda n: (n.start, n.pitch)):
        i = last.get(n.pitch)
        if i is not None and out[i].end > n.start:
            out[i] = out[i]._replace(end=n.start)
        last[n.pitch] = len(out)
        out.append(n)
    return out


def to_events(perf: Performance) -> list[Event]:
    """Timed events in canonical order: by grid step, then offs, pedal, ons, then pitch.

    Ordering within a 10 ms step by kind and pitch (not by sub-grid time) makes the encoding
    of a file a fixed point of decode/encode. A note that starts and ends within one step is
    the exception: its release must follow its own strike or it would never be released.
    """
    pedal: list[tuple[float, bool]] = []
    for t, down in perf.sustain:  # keep only real changes: a redundant one would move the origin
        if down != (pedal[-1][1] if pedal else False):
            pedal.append((t, down))
    if not perf.notes and not pedal:
        return []
    origin = min([n.start for n in perf.notes] + [t for t, _ in pedal])

    def step(t: float) -> int:
        return math.floor((t - origin) / V.STEP_S + 0.5)

    keyed: list[tuple[tuple[int, int, int], Event]] = []
    for n in _release_before_restrike(perf.notes):
        on_step, off_step = step(n.start), step(n.end)
        keyed.append(((on_step, ON, n.pitch), Event(n.start, ON, n.pitch, n.velocity)))
        keyed.append(((off_step, OFF if off_step > on_step else ON + 1, n.pitch), Event(n.end, OFF, n.pitch)))
    keyed += [((step(t), SUSTAIN, int(down)), Event(t, SUSTAIN, int(down))) for t, down in pedal]
    keyed.sort(key=lambda ke: ke[0])
    return [e for _, e in keyed]


def write_midi(tracks: dict[str, Performance], path: str | Path, tempo_bpm: float = 120.0,
               channels: dict[str, int] | None = None) -> None:
    """Write named performances as tracks of one standard MIDI file (times in seconds)."""
    import symusic

    score = symusic.Score(480, ttype="second")
    score.tempos.append(symusic.Tempo(0.0, tempo_bpm, ttype="second"))
    for i, (name, perf) in enumerate(tracks.items()):
        track = symusic.Track(name=name, program=0, is_drum=False, ttype="second")
        for n in perf.notes:
            track.notes.append(symusic.Note(n.start, max(n.end - n.start, 0.0), n.pitch, n.velocity,
                                            ttype="second"))
        for t, down in perf.sustain:
            track.controls.append(symusic.ControlChange(t, CC_SUSTAIN, 127 if down else 0, ttype="second"))
        score.tracks.append(track)
    del channels  # symusic assigns one channel per track on write
    score.dump_midi(str(path))


# --------------------------------------------------------------------------- encoding

class TokenEncoder:
    """Timed MIDI events in, tokens out, incrementally.

    Times are seconds on any monotonic clock; the first event sets the origin, and every later
    time is rounded to the grid relative to it, so rounding never accumulates drift.
    """

    __slots__ = ("origin", "sounding", "step", "sustain", "velocity_bin")

    def __init__(self) -> None:
        self.origin: float | None = None
        self.step = 0
        self.velocity_bin = -1
        self.sounding = bytearray(V.N_PITCH)
        self.sustain = False

    def advance_to(self, t: float, out: list[int] | None = None) -> list[int]:
        """Emit TIME_SHIFT tokens up to time t (never backwards)."""
        out = [] if out is None else out
        if self.origin is None:
            self.origin = t
            return out
        target = math.floor((t - self.origin) / V.STEP_S + 0.5)
        gap = target - self.step
        while gap > 0:
            k = min(gap, V.MAX_SHIFT)
            out.append(V.time_shift(k))
            gap -= k
        self.step = max(self.step, target)
        return out

    def note_on(self, t: float, pitch: int, velocity: int, out: list[int] | None = None) -> list[int]:
        out = self.advance_to(t, out)
        if self.sounding[pitch]:
            out.append(V.note_off(pitch))  # re-strike: release first, as a one-voice-per-key synth does
        vbin = V.velocity_bin(velocity)
        if vbin != self.velocity_bin:
            out.append(V.VELOCITY + vbin)
            self.velocity_bin = vbin
        out.append(V.note_on(pitch))
        self.sounding[pitch] = 1
        return out

    # Events that change nothing (releasing a silent key, a pedal already in that state) emit
    # nothing and do not advance time, so that they cannot split a gap or set the origin.

    def note_off(self, t: float, pitch: int, out: list[int] | None = None) -> list[int]:
        out = [] if out is None else out
        if self.sounding[pitch]:
            self.advance_to(t, out)
            out.append(V.note_off(pitch))
            self.sounding[pitch] = 0
        return out

    def pedal(self, t: float, down: bool, out: list[int] | None = None) -> list[int]:
        out = [] if out is None else out
        if down != self.sustain:
            self.advance_to(t, out)
            out.append(V.SUSTAIN_ON if down else V.SUSTAIN_OFF)
            self.sustain = down
        return out

    def all_off(self, t: float, out: list[int] | None = None) -> list[int]:
        out = [] if out is None else out
        if not any(self.sounding):
            return out
        self.advance_to(t, out)
        for pitch in range(V.N_PITCH):
            if self.sounding[pitch]:
                out.append(V.note_off(pitch))
                self.sounding[pitch] = 0
        return out

    def event(self, e: Event, out: list[int] | None = None) -> list[int]:
        if e.kind == ON:
            return self.note_on(e.time, e.value, e.velocity, out)
        if e.kind == OFF:
            return self.note_off(e.time, e.value, out)
        return self.pedal(e.time, bool(e.value), out)

    def midi(self, data: Iterable[int], t: float, out: list[int] | None = None) -> list[int]:
        """Encode one raw MIDI message (as python-rtmidi delivers it) received at time t.

        Messages that carry no musical event for the model (clock, other CCs, SysEx) emit
        nothing and do not advance time.
        """
        out = [] if out is None else out
        msg = list(data)
        if len(msg) < 3:
            return out
        status, d1, d2 = msg[0] & 0xF0, msg[1] & 0x7F, msg[2] & 0x7F
        if status == NOTE_ON_STATUS and d2 > 0:
            return self.note_on(t, d1, d2, out)
        if status == NOTE_OFF_STATUS or status == NOTE_ON_STATUS:
            return self.note_off(t, d1, out)
        if status == CC_STATUS and d1 == CC_SUSTAIN:
            return self.pedal(t, d2 >= 64, out)
        if status == CC_STATUS and d1 in (CC_ALL_SOUND_OFF, CC_ALL_NOTES_OFF):
            return self.all_off(t, out)
        return out


def encode_events(events: Iterable[Event]) -> list[int]:
    events = list(events)
    enc = TokenEncoder()
    out: list[int] = []
    if events:
        # Canonical order is by step, then kind: the first event need not be the earliest, and
        # the grid must start where to_events started it.
        enc.origin = min(e.time for e in events)
    for e in events:
        enc.event(e, out)
    return out


def encode_performance(perf: Performance) -> list[int]:
    return encode_events(to_events(perf))


def encode_file(path: str | Path) -> list[int]:
    return encode_performance(load_midi(path))


# --------------------------------------------------------------------------- decoding

class TokenDecoder:
    """Tokens in, timed MIDI messages out, with a ledger of sounding notes.

    Any token sequence is accepted: a NOTE_OFF for a silent key and special tokens are
    ignored, a NOTE_ON for a sounding key re-strikes it, and a note held longer than
    `max_note_s` is released at exactly that length.
    """

    __slots__ = ("channel", "max_steps", "onset", "step", "sustain", "velocity")

    def __init__(self, channel: int = 0, max_note_s: float = 4.0) -> None:
        self.channel = channel & 0x0F
        self.max_steps = max(1, round(max_note_s / V.STEP_S))
        self.step = 0
        self.velocity = 64
        self.onset = [-1] * V.N_PITCH  # step at which each key was struck, -1 when silent
        self.sustain = False

    @property
    def time(self) -> float:
        return self.step * V.STEP_S

    def sounding(self) -> list[int]:
        return [p for p in range(V.N_PITCH) if self.onset[p] >= 0]

    def _off(self, pitch: int, step: int, out: list[TimedMessage]) -> None:
        out.append(TimedMessage(step * V.STEP_S, NOTE_OFF_STATUS | self.channel, pitch, 0))
        self.onset[pitch] = -1

    def _advance(self, steps: int, out: list[TimedMessage]) -> None:
        target = self.step + steps
        due = sorted((self.onset[p] + self.max_steps, p) for p in range(V.N_PITCH)
                     if self.onset[p] >= 0 and self.onset[p] + self.max_steps <= target)
        for step, pitch in due:
            self._off(pitch, step, out)
        self.step = target

    def capped(self, token: int) -> int:
        """`token`, or what to generate in its place so that the token stream itself ends every note
        before `max_note_s`: a TIME_SHIFT that would carry a note to its limit stops one step short,
        and from there the note's NOTE_OFF is the token. Generators feed this, not what they sampled,
        to the model: a note the decoder closed inside a shift would sound off while the model's
        context still held it, and a player cutting in would be placed after the whole shift."""
        if not V.TIME_SHIFT <= token < V.VELOCITY:
            return token
        oldest = min(((onset, p) for p, onset in enumerate(self.onset) if onset >= 0), default=None)
        if oldest is None:
            return token
        first_onset, pitch = oldest
        last_step = first_onset + self.max_steps - 1  # the last step the oldest note may still sound
        if self.step + token - V.TIME_SHIFT + 1 <= last_step:
            return token
        return V.time_shift(last_step - self.step) if last_step > self.step else V.note_off(pitch)

    def feed(self, token: int, out: list[TimedMessage] | None = None) -> list[TimedMessage]:
        out = [] if out is None else out
        if V.NOTE_ON <= token < V.NOTE_OFF:
            pitch = token - V.NOTE_ON
            if self.onset[pitch] >= 0:
                self._off(pitch, self.step, out)
            out.append(TimedMessage(self.time, NOTE_ON_STATUS | self.channel, pitch, self.velocity))
            self.onset[pitch] = self.step
        elif V.NOTE_OFF <= token < V.TIME_SHIFT:
            pitch = token - V.NOTE_OFF
            if self.onset[pitch] >= 0:
                self._off(pitch, self.step, out)
        elif V.TIME_SHIFT <= token < V.VELOCITY:
            self._advance(token - V.TIME_SHIFT + 1, out)
        elif V.VELOCITY <= token < V.SUSTAIN_ON:
            self.velocity = V.bin_velocity(token - V.VELOCITY)
        elif token == V.SUSTAIN_ON or token == V.SUSTAIN_OFF:
            down = token == V.SUSTAIN_ON
            if down != self.sustain:
                out.append(TimedMessage(self.time, CC_STATUS | self.channel, CC_SUSTAIN, 127 if down else 0))
                self.sustain = down
        return out

    def close(self, out: list[TimedMessage] | None = None) -> list[TimedMessage]:
        """Release every sounding note and the pedal, at the current time."""
        out = [] if out is None else out
        for pitch in range(V.N_PITCH):
            if self.onset[pitch] >= 0:
                self._off(pitch, self.step, out)
        if self.sustain:
            out.append(TimedMessage(self.time, CC_STATUS | self.channel, CC_SUSTAIN, 0))
            self.sustain = False
        return out


def decode_messages(tokens: Iterable[int], channel: int = 0, max_note_s: float = 4.0) -> list[TimedMessage]:
    dec = TokenDecoder(channel, max_note_s)
    out: list[TimedMessage] = []
    for tok in tokens:
        dec.feed(int(tok), out)
    dec.close(out)
    return out


def messages_to_performance(messages: Iterable[TimedMessage]) -> Performance:
    """Pair note-ons with note-offs (the decoder guarantees every on has its off)."""
    open_notes: dict[int, tuple[float, int]] = {}
    notes: list[Note] = []
    sustain: list[tuple[float, bool]] = []
    for m in messages:
        kind = m.status & 0xF0
        if kind == NOTE_ON_STATUS and m.data2 > 0:
            open_notes[m.data1] = (m.time, m.data2)
        elif kind in (NOTE_ON_STATUS, NOTE_OFF_STATUS) and m.data1 in open_notes:
            start, vel = open_notes.pop(m.data1)
            notes.append(Note(m.data1, start, m.time, vel))
        elif kind == CC_STATUS and m.data1 == CC_SUSTAIN:
            sustain.append((m.time, m.data2 >= 64))
    notes.sort(key=lambda n: (n.start, n.pitch))
    return Performance(notes, sustain)


def decode_performance(tokens: Iterable[int], max_note_s: float = 4.0) -> Performance:
    return messages_to_performance(decode_messages(tokens, max_note_s=max_note_s))

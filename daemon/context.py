"""What the KV cache holds, and the call/answer state machine that keeps it true to what was heard.

The cache holds one performance: the player's notes and antiphon's answers, interleaved in
time order, as one TokenEncoder timeline. Everything the player plays is prefilled the moment
it arrives. As soon as no key is down, antiphon *speculates*: it appends the pause that would
end the phrase (wait_ms) and generates the answer from there, handing its messages to the
scheduler timed from that phrase end. If the player goes on before then, nothing has sounded:
the speculation is rolled back. Once the answer plays, the next player event asks the
scheduler how much of it was really sent (`cancel` → `on_heard`); the cache is rolled back to
exactly that, the notes the barge-in cut are closed at that moment, and the player's new
events follow in time order.

All of this runs in the engine thread; it never blocks and never reads a clock, so the unit
tests drive it with a fake engine and chosen timestamps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.answer import (
    ANSWER_MASK,
    OPENING_MASK,
    Answer,
    absorb,
    answer_decoder,
    answer_seconds,
    clone_encoder,
    free_time,
    same_time,
)
from antiphon.daemon.config import JamConfig
from antiphon.daemon.sampling import long_note_s
from antiphon.daemon.scheduler import Item

# How the log says that held keys were taken as released (tests and rigs look for it: a late answer
# is then by design).
LOST_NOTE_OFF = "taking them as released (a lost note-off?)"


class Conversation:
    """The engine thread's state: feed it player messages and scheduler replies; call `step` when idle."""

    def __init__(self, engine: Any, sampler: Any, grammar_mask: Callable, cfg: JamConfig,
                 submit: Callable[[int, list[Item], float | None], None], cancel: Callable[[int], None],
                 log: Callable[[str], None] = print, align: Callable[[float], float | None] = free_time,
                 snap: Callable[[float], float] = same_time) -> None:
        """`align`: where an answer planned to start at t really starts (the next beat under MIDI
        clock; None: at t, in free time); `snap`: where an answer note-on due at t is played
        (quantization; defaults to t). `submit` gets each answer's start when it was put on a beat."""
        self.align, self.snap = align, snap
        self.answer_scale = cfg.answer_scale  # live controls change these two
        self.enabled = True
        self.end_at: float | None = None  # a requested phrase end, applied once the cancelled speculation is back
        self.cut_at: float | None = None  # when a control (not a player note) stopped the answer
        self.replaying = False  # on_heard is replaying held-back input
        self.engine, self.sampler, self.grammar_mask, self.cfg = engine, sampler, grammar_mask, cfg
        self.submit, self.cancel, self.log = submit, cancel, log
        self.wait_s = cfg.wait_ms / 1000.0
        self.out_channel = (cfg.out_channel - 1) & 0x0F
        self.enc = codec.TokenEncoder()
        self.keys_down: set[int] = set()
        self.phrase_start: float | None = None
        self.call_notes = 0  # note-ons since phrase_start: the answer's note rate follows the call's
        self.call_loudness = 0  # their velocities summed: the answer's dynamics follow the call's
        self.key_down_at: dict[int, float] = {}  # when each held key was struck
        self.call_holds: deque[float] = deque(maxlen=64)  # recent key-down lengths: the answer's articulation
        self.call_onsets: deque[float] = deque(maxlen=256)  # this call's note-on times: the answer's rhythm
        self.call_range = (-1, -1)  # this call's lowest and highest pitch: the answer's register
        self.last_event = 0.0
        self.answer: Answer | None = None
        self.awaiting: int | None = None  # gen whose `heard` reply we wait for
        self.backlog: list[tuple[float, list[int]]] = []  # player events held until that reply
        self.deferred: list[tuple[float, list[int]]] = []  # pedal/offs that arrived during an answer
        self.gen = 0
        self.note_id = 0
        self.answers = 0
        self._mask = np.ones(V.VOCAB_SIZE, dtype=bool)
        self.engine.rollback(0)
        self._commit(self.engine.prefill([V.BOS]))

    # ------------------------------------------------------------------ cache bookkeeping

    def _commit(self, logits: np.ndarray) -> None:
        self.committed = self.engine.length
        self.logits = np.array(logits, dtype=np.float32)  # the engine's view is overwritten by the next call

    def _room(self, needed: int) -> None:
        """Slide the window when `needed` more tokens would not fit: keep the recent half."""
        e = self.engine
        if e.length + needed > e.context:
            keep = max(1, min(e.length, e.context // 2, e.context - needed))
            self._commit(e.slide(keep))

    def _prefill(self, tokens: list[int]) -> None:
        if tokens:
            self._room(len(tokens))
            self._commit(self.engine.prefill(tokens))

    # ------------------------------------------------------------------ player side

    def on_midi(self, t: float, msg: list[int]) -> None:
        if not is_musical(msg):
            return  # a mod-wheel sweep must not keep cancelling the answer being prepared
        if self.awaiting is not None:
            self.backlog.append((t, msg))
            return
        a = self.answer
        if a is not None:
            if t >= a.start and not _is_note_on(msg):
                self.deferred.append((t, msg))  # a pedal lift during the answer is no reason to stop it
                return
            self.awaiting = a.gen
            self.backlog.append((t, msg))
            self.cancel(a.gen)
            return
        self._encode(t, msg)

    def _encode(self, t: float, msg: list[int]) -> None:
        tokens = self.enc.midi(msg, t)
        memory = getattr(self.sampler, "memory", None)
        if memory is not None and tokens:
            memory.hear_tokens(tokens)  # the player's material, learned the moment it is heard
        status, d1, d2 = (msg[0] & 0xF0, msg[1], msg[2]) if len(msg) >= 3 else (0, 0, 0)
        if status == codec.NOTE_ON_STATUS and d2 > 0:
            self.keys_down.add(d1)
            self.key_down_at[d1] = t
            if self.phrase_start is None:
                self.phrase_start, self.call_notes, self.call_loudness = t, 0, 0
                self.call_onsets.clear()
                self.call_range = (d1, d1)
            self.call_onsets.append(t)
            self.call_range = (min(self.call_range[0], d1), max(self.call_range[1], d1))
            self.call_notes += 1
            self.call_loudness += d2
        elif status in (codec.NOTE_OFF_STATUS, codec.NOTE_ON_STATUS):
            self.keys_down.discard(d1)
            struck = self.key_down_at.pop(d1, None)
            if struck is not None:
                self.call_holds.append(t - struck)
        elif status == codec.CC_STATUS and d1 in (codec.CC_ALL_NOTES_OFF, codec.CC_ALL_SOUND_OFF):
            self.keys_down.clear()
        if not tokens:  # e.g. the release of a key pressed before antiphon started
            if self.answer is None and not self.keys_down and self.phrase_start is not None and not self.replaying:
                self._speculate()  # the phrase end it ends at is unchanged
            return
        self.last_event = t
        self._prefill(tokens)
        if not self.keys_down and self.phrase_start is not None and not self.replaying:
            self._speculate()

    def on_heard(self, gen: int, index: int) -> None:
        """The scheduler's account of answer `gen`: tokens up to `index` were sent (-1: none)."""
        a = self.answer
        if a is None or gen != a.gen:
            return
        t_cut = self.backlog[0][0] if self.backlog else max(self.cut_at or a.start, a.start)
        self.cut_at = None
        memory = getattr(self.sampler, "memory", None)
        if memory is not None:  # what the memory looks up must be what was heard, not what was generated
            memory.restore(a.memory_mark)
            if index >= 0:  # the pause before the answer, then what of it sounded
                memory.hear_tokens(a.prefix, learn=False)
                memory.hear_tokens(a.tokens[:index + 1], learn=False)
        if index < 0:
            self.engine.rollback(self.committed)
        else:
            self.engine.rollback(a.base + index + 1)
            self.enc.advance_to(a.start)
            heard = absorb(self.enc, a.tokens[:index + 1], self.cfg.max_note_s)
            closing: list[int] = []
            for p in heard.sounding():  # the scheduler closed these when the player came in
                self.enc.note_off(t_cut, p, closing)
            if heard.sustain:
                self.enc.pedal(t_cut, False, closing)
            self._commit_after_answer(closing)
            self.phrase_start = None  # the player's next note starts a new call
            whole = a.done and index == len(a.tokens) - 1
            self.log(f"answer {a.gen}: {a.notes} notes in {a.decoder.time:.2f} s, temperature "
                     f"{self.sampler.temperature:.2f}"
                     + ("" if whole else f", cut by the player after {t_cut - a.start:.2f} s"))
        self.answer, self.awaiting = None, None
        backlog, deferred = self.backlog, self.deferred
        self.backlog, self.deferred = [], []
        # Replayed input is already in the past: a phrase end followed by more of it is no phrase
        # end. Speculating there would start (and at once cancel) an answer per event, and a flood
        # would replay its whole backlog once per event.
        events = deferred + backlog
        end_at, self.end_at = self.end_at, None
        if end_at is not None and (not self.enabled or any(t > end_at for t, _ in events)):
            end_at = None  # the call went on after the end-of-call press
        self.replaying = True
        try:
            for i, (t, msg) in enumerate(events):
                self.replaying = end_at is not None or i < len(events) - 1  # the press is the phrase end
                self.on_midi(t, msg)
        finally:
            self.replaying = False
        if end_at is not None:
            self.end_call(end_at)

    def check_held(self, now: float) -> None:
        """Keys down with no player event for max_note_s are taken as released: under a flood or
        xruns JACK can lose a note-off, and one lost note-off must not stop antiphon answering."""
        if not self.keys_down or self.answer is not None or self.awaiting is not None:
            return
        if now - self.last_event < self.cfg.max_note_s:
            return
        stuck = sorted(self.keys_down)
        self.log(f"input: keys {stuck} held {now - self.last_event:.1f} s with no other event; {LOST_NOTE_OFF}")
        for p in stuck:
            self._encode(now, [codec.NOTE_OFF_STATUS, p, 0])

    # ------------------------------------------------------------------ live controls

    def _may_answer(self) -> bool:
        return self.answer is None and self.awaiting is None and not self.keys_down and self.phrase_start is not None

    def cancel_answer(self, t: float) -> None:
        """Stop the current answer (or the one being prepared) for a control, not a player note:
        the call it answered is over, and the cache keeps what was heard, cut at t."""
        a = self.answer
        self.end_at = None
        if a is None:
            self.phrase_start = None  # a phrase under way when answering stopped is not answered later
            return
        if self.awaiting is not None:
            return
        self.awaiting, self.cut_at = a.gen, t
        self.phrase_start = None  # when nothing of it sounded, on_heard leaves this alone: no re-answer
        self.cancel(a.gen)

    def end_call(self, t: float) -> None:
        """The player says the call is over at t: answer from t, without waiting wait_ms."""
        if not self.enabled:
            return
        if self.awaiting is not None:
            # An answer is being dropped (the call's first notes cut in on the last one, or its last
            # notes on a speculation) and the call waits in the backlog: the press applies once the
            # scheduler's reply is in. Ignored until 2026-12-02: a press right after the call's last
            # note was lost whenever the reply was slow (CI, no real-time scheduling).
            self.end_at = t
            return
        if self.phrase_start is None:
            return
        a = self.answer
        if a is None:
            self.keys_down.clear()  # a foot switch ends the call even over held keys
            self._speculate(t)
            return
        if a.start <= t:
            return  # already answering
        self.awaiting, self.end_at = a.gen, t  # re-plan once the scheduler has dropped the speculation
        self.cancel(a.gen)

    def _commit_after_answer(self, closing: list[int]) -> None:
        if closing:
            self._prefill(closing)
        else:
            # No new tokens: the cache ends on a heard token whose logits we did not keep.
            last = int(self.engine.tokens[self.engine.length - 1])
            self.engine.rollback(self.engine.length - 1)
            self._commit(self.engine.prefill([last]))

    # ------------------------------------------------------------------ answer side

    def _speculate(self, at: float | None = None) -> None:
        if not self.enabled:
            return
        e = self.engine
        call_s = max(self.last_event - (self.phrase_start or self.last_event), 0.0)
        if e.length > e.context * 3 // 4:
            self._commit(e.slide(e.context // 2))  # make room for the answer before it is due
        spec_enc = clone_encoder(self.enc)
        planned = self.last_event + self.wait_s if at is None else max(at, self.last_event)
        on_beat = self.align(planned)
        start = planned if on_beat is None else on_beat
        prefix = spec_enc.advance_to(start)
        self.gen += 1
        logits = e.prefill(prefix) if prefix else self.logits
        self.answer = Answer(self.gen, start, answer_seconds(call_s, self.cfg, self.answer_scale), prefix, e.length,
                             answer_decoder(spec_enc, self.out_channel, self.cfg.max_note_s), on_beat=on_beat is not None)
        self.spec_logits = np.array(logits, dtype=np.float32)
        memory = getattr(self.sampler, "memory", None)
        if memory is not None:
            self.answer.memory_mark = memory.mark()
            memory.hear_tokens(prefix, learn=False)  # the pause: the answer's first notes are a new cluster
        self.sampler.begin(self.call_notes, call_s, self.call_loudness / max(self.call_notes, 1),
                           long_note_s(self.call_holds), np.array(self.call_onsets), self.call_range)

    def wants_work(self) -> bool:
        return self.answer is not None and not self.answer.done and self.awaiting is None

    def step(self) -> None:
        """Generate one answer token and hand what it sounds like to the scheduler."""
        a, e = self.answer, self.engine
        if a is None or a.done:
            return
        dec = a.decoder
        closing = dec.sounding()
        if e.length + len(closing) + 2 >= e.context:
            self._close(a)  # the window is full: end the answer here rather than slide mid-answer
            return
        mask = self.grammar_mask(dec, self._mask)
        mask &= OPENING_MASK if a.notes == 0 else ANSWER_MASK  # the answer's length is ours to decide: no EOS
        tok = int(self.sampler.sample(self.spec_logits, mask, dec))
        if V.TIME_SHIFT <= tok < V.VELOCITY:
            left = round(a.seconds / V.STEP_S) - dec.step
            if left <= 0:
                self._close(a)
                return
            tok = V.time_shift(min(tok - V.TIME_SHIFT + 1, left))
        self._feed(a, tok)
        if dec.step * V.STEP_S >= a.seconds - 1e-9:
            self._close(a)

    def _feed(self, a: Answer, tok: int) -> None:
        index = len(a.tokens)
        items = []
        for m in a.decoder.feed(tok):
            kind = m.status & 0xF0
            if kind == codec.NOTE_ON_STATUS:
                self.note_id += 1
                a.note_ids[m.data1] = self.note_id
                a.notes += 1
            due = a.start + m.time
            if kind == codec.NOTE_ON_STATUS and m.data2 > 0:
                snapped = self.snap(due)
                a.shifts[m.data1] = snapped - due
                due = snapped
            elif kind in (codec.NOTE_OFF_STATUS, codec.NOTE_ON_STATUS):
                due += a.shifts.get(m.data1, 0.0)  # the note keeps its length
            nid = a.note_ids.get(m.data1, -1) if kind in (codec.NOTE_ON_STATUS, codec.NOTE_OFF_STATUS) else -1
            items.append(Item(due, index, m.status, m.data1, m.data2, nid))
        a.tokens.append(tok)
        self.spec_logits = self.engine.decode(tok)
        if items:
            self.submit(a.gen, items, a.start if a.on_beat else None)

    def _close(self, a: Answer) -> None:
        """Release every answer note at the answer's end, in the cache as in the output."""
        for p in a.decoder.sounding():
            self._feed(a, V.note_off(p))
        if a.decoder.sustain:
            self._feed(a, V.SUSTAIN_OFF)
        a.done = True
        self.answers += 1


def is_musical(msg: list[int]) -> bool:
    """What the model hears: notes, the sustain pedal, all-notes-off. Other controllers, pitch
    bend and aftertouch are not in the vocabulary."""
    if len(msg) < 3:
        return False
    kind = msg[0] & 0xF0
    return kind in (codec.NOTE_ON_STATUS, codec.NOTE_OFF_STATUS) or (
        kind == codec.CC_STATUS and msg[1] in (codec.CC_SUSTAIN, codec.CC_ALL_SOUND_OFF, codec.CC_ALL_NOTES_OFF))


def _is_note_on(msg: list[int]) -> bool:
    return len(msg) >= 3 and msg[0] & 0xF0 == codec.NOTE_ON_STATUS and msg[2] > 0

"""The call/answer state machine: phrase ends, speculation, rollback to what was heard (fake engine)."""

from __future__ import annotations

import numpy as np
import pytest

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import JamConfig
from antiphon.daemon.context import Conversation
from antiphon.daemon.sampling import Sampler, grammar_mask

ON, OFF = 0x90, 0x80


class FakeEngine:
    """The Engine API over a token list; logits are a seeded function of the last token, so a
    continuation is reproducible, and lean to notes and short pauses like music does."""

    def __init__(self, context: int = 512) -> None:
        self.context, self.length = context, 0
        self.tokens = np.zeros(context, np.int64)
        self.slides: list[int] = []

    def _logits(self) -> np.ndarray:
        rng = np.random.default_rng(int(self.tokens[self.length - 1]) * 7919 + self.length)
        x = rng.normal(0, 1, V.VOCAB_SIZE).astype(np.float32)
        x[V.NOTE_ON + 55:V.NOTE_ON + 75] += 4
        x[V.NOTE_OFF + 55:V.NOTE_OFF + 75] += 5
        x[V.TIME_SHIFT + 5:V.TIME_SHIFT + 20] += 5
        return x

    def prefill(self, tokens) -> np.ndarray:
        assert len(tokens) > 0 and self.length + len(tokens) <= self.context
        self.tokens[self.length:self.length + len(tokens)] = tokens
        self.length += len(tokens)
        return self._logits()

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length

    def slide(self, keep: int) -> np.ndarray:
        self.slides.append(keep)
        window = self.tokens[self.length - keep:self.length].copy()
        self.length = 0
        return self.prefill(window)

    def cache(self) -> list[int]:
        return [int(t) for t in self.tokens[:self.length]]


class Harness:
    """A Conversation wired to a fake scheduler that answers `cancel` with what was due by then."""

    def __init__(self, context: int = 512, **cfg) -> None:
        self.engine = FakeEngine(context)
        self.submitted: list[tuple[int, list]] = []
        self.cancelled: list[int] = []
        self.cfg = JamConfig(quiet=True, **cfg)
        self.conv = Conversation(self.engine, Sampler(3, 1.0, 1.0), grammar_mask, self.cfg,
                                 lambda g, items, start=None: self.submitted.append((g, items)), self.cancelled.append)

    def play(self, t: float, status: int, pitch: int, vel: int = 0, reply: bool = True) -> None:
        asked = len(self.cancelled)
        self.conv.on_midi(t, [status, pitch, vel])
        if reply and len(self.cancelled) > asked:
            gen = self.cancelled[-1]
            self.conv.on_heard(gen, max((it.index for it in self.items(gen) if it.due <= t), default=-1))

    def generate(self) -> None:
        while self.conv.wants_work():
            self.conv.step()

    def items(self, gen: int) -> list:
        return [it for g, items in self.submitted if g == gen for it in items]


def call(h: Harness, t0: float = 10.0) -> float:
    """Two notes, 10.0 .. 10.6 s; returns the last note-off's time."""
    h.play(t0, ON, 60, 90)
    h.play(t0 + 0.3, OFF, 60)
    h.play(t0 + 0.3, ON, 64, 90)
    h.play(t0 + 0.6, OFF, 64)
    return t0 + 0.6


def test_the_answer_starts_exactly_at_the_phrase_end_and_matches_the_call_length():
    h = Harness(wait_ms=400, answer_min_s=0.5, answer_scale=2.0)
    end = call(h)
    assert h.conv.answer is not None and h.conv.answer.start == end + 0.4
    h.generate()
    items = h.items(h.conv.answer.gen)
    first = min(items, key=lambda it: it.due)
    assert first.due == end + 0.4 and first.status == ON  # no leading pause
    assert max(it.due for it in items) <= end + 0.4 + 1.2 + 1e-9  # 2 x the 0.6 s call
    ons = sum(1 for it in items if it.status == ON)
    offs = sum(1 for it in items if it.status == OFF)
    assert ons == offs > 0 and all(it.status & 0x0F == 0 for it in items)


def test_no_answer_while_a_key_is_down_or_before_anything_was_played():
    h = Harness()
    h.play(1.0, 0xB0, 64, 127)  # pedal alone is no call
    assert h.conv.answer is None
    h.play(1.1, ON, 60, 90)
    h.play(1.2, ON, 64, 90)
    h.play(1.3, OFF, 60)
    assert h.conv.answer is None  # 64 is still held
    h.play(1.4, OFF, 64)
    assert h.conv.answer is not None and h.conv.answer.start == pytest.approx(1.8)


def test_playing_on_before_the_phrase_end_rolls_the_speculation_back():
    h = Harness()
    end = call(h)
    committed = h.engine.cache()
    h.generate()
    assert h.engine.length > len(committed)
    gen = h.conv.gen
    h.play(end + 0.2, ON, 67, 90, reply=False)  # before end + wait: the call goes on
    assert h.cancelled[-1] == gen and h.conv.awaiting == gen
    h.play(end + 0.25, OFF, 67)  # held back until the scheduler has answered
    h.conv.on_heard(gen, -1)
    expect = codec.TokenEncoder()
    want: list[int] = [V.BOS]
    for t, st, p, v in [(10.0, ON, 60, 90), (10.3, OFF, 60, 0), (10.3, ON, 64, 90), (10.6, OFF, 64, 0),
                        (10.8, ON, 67, 90), (10.85, OFF, 67, 0)]:
        expect.midi([st, p, v], t, want)
    assert h.engine.cache()[:len(want)] == want
    assert h.conv.phrase_start == 10.0  # still one call
    assert h.conv.answer is not None and h.conv.answer.gen == gen + 1 and h.conv.answer.start == 10.85 + 0.4


def test_barge_in_keeps_exactly_the_heard_part_then_the_players_note():
    h = Harness()
    call(h)
    before = h.conv.committed
    h.generate()
    a = h.conv.answer
    items = h.items(a.gen)
    t_barge = a.start + 0.35
    cut = max(it.index for it in items if it.due <= t_barge)  # what the scheduler had sent by then
    assert 0 <= cut < len(a.tokens) - 1
    h.play(t_barge, ON, 72, 100)
    cache = h.engine.cache()
    prefix = a.prefix
    assert cache[before:before + len(prefix)] == prefix == [V.time_shift(40)]
    heard = a.tokens[:cut + 1]
    assert cache[before + len(prefix):before + len(prefix) + len(heard)] == heard
    rest = cache[before + len(prefix) + len(heard):]
    # Then: the pause up to the barge-in, offs for answer notes still sounding, the player's note.
    dec = codec.TokenDecoder()
    for tok in heard:
        dec.feed(tok)
    assert rest[-1] == V.note_on(72)
    assert [t for t in rest if V.NOTE_OFF <= t < V.TIME_SHIFT] == [V.note_off(p) for p in dec.sounding()]
    shifts = sum(t - V.TIME_SHIFT + 1 for t in rest if V.TIME_SHIFT <= t < V.VELOCITY)
    assert dec.step + shifts == round((t_barge - a.start) / V.STEP_S), rest
    assert h.conv.phrase_start == t_barge and h.conv.answer is None


def test_an_answer_heard_to_the_end_stays_whole_in_the_context():
    h = Harness()
    call(h)
    h.generate()
    a = h.conv.answer
    assert a.done and a.decoder.sounding() == []
    last = max(it.index for it in h.items(a.gen))
    assert last == len(a.tokens) - 1
    start_len = a.base
    h.play(a.start + 5.0, ON, 50, 70)
    cache = h.engine.cache()
    assert cache[start_len:start_len + len(a.tokens[:last + 1])] == a.tokens[:last + 1]
    tail = cache[start_len + last + 1:]
    assert tail[-1] == V.note_on(50) and all(V.TIME_SHIFT <= t < V.SUSTAIN_ON for t in tail[:-1])


def test_pedal_during_the_answer_does_not_stop_it():
    h = Harness()
    call(h)
    h.generate()
    a = h.conv.answer
    asked = len(h.cancelled)
    h.play(a.start + 0.1, 0xB0, 64, 0)
    assert len(h.cancelled) == asked and h.conv.answer is a


def test_a_full_window_slides_before_the_answer_not_during_it():
    h = Harness(context=64)
    for i in range(12):
        end = call(h, 10.0 + 3 * i)
        h.generate()
        assert h.engine.length <= 64
        h.play(end + 0.2, ON, 40, 50)  # each call goes on, cutting the speculation
        h.play(end + 0.3, OFF, 40)
        h.generate()
    assert h.engine.slides and all(k == 32 for k in h.engine.slides)


def test_messages_the_model_cannot_hear_do_not_disturb_the_answer_being_prepared():
    h = Harness()
    end = call(h)
    a = h.conv.answer
    asked = len(h.cancelled)
    for i in range(20):  # a mod-wheel sweep and pitch bend during the wait
        h.conv.on_midi(end + 0.01 * i, [0xB0, 1, i])
        h.conv.on_midi(end + 0.01 * i, [0xE0, 0, 64 + i])
    assert len(h.cancelled) == asked and h.conv.answer is a
    h.play(end + 0.25, OFF, 90)  # the release of a key we never saw pressed: no tokens
    assert h.conv.answer is not None and h.conv.answer.start == a.start


def test_the_input_channel_filter_and_what_counts_as_music():
    from antiphon.daemon.jam import listens_to

    assert listens_to([0x93, 60, 90], 0) and listens_to([0x93, 60, 90], 4) and not listens_to([0x93, 60, 90], 3)
    assert listens_to([0xB0, 64, 127], 1) and listens_to([0xB0, 123, 0], 1)
    assert not listens_to([0xB0, 1, 64], 0)  # mod wheel
    assert not listens_to([0xE0, 0, 64], 0) and not listens_to([0xF8], 0) and not listens_to([0xD0, 40], 0)


def test_the_answer_sampler_is_told_each_calls_rate_loudness_lengths_onsets_and_range():
    h = Harness(wait_ms=400)
    told = []
    begin = h.conv.sampler.begin
    h.conv.sampler.begin = lambda notes, seconds, loud, hold, onsets, span: (
        told.append((notes, round(seconds, 6), loud, hold, list(onsets), span)),
        begin(notes, seconds, loud, hold, onsets, span))
    call(h)  # two notes over 0.6 s
    assert told[-1][:2] == (2, 0.6)
    h.generate()
    gen = h.conv.answer.gen
    for i, t in enumerate((20.0, 20.1, 20.2)):  # a new call of three quick notes, then its releases
        h.play(t, ON, 60 + i, 90)
    for i in range(3):
        h.play(20.5, OFF, 60 + i)
    assert h.conv.answer.gen > gen and told[-1][:3] == (3, 0.5, 90.0)  # and their mean velocity
    # The key-down lengths heard so far (0.3, 0.3; 0.5, 0.4, 0.3): the long-note length is their 90th percentile.
    assert told[-1][3] == pytest.approx(np.percentile([0.3, 0.3, 0.5, 0.4, 0.3], 90))
    assert told[-1][4] == [20.0, 20.1, 20.2]  # this call's onsets: the answer's rhythm follows them
    assert told[-1][5] == (60, 62)  # this call's lowest and highest pitch: the answer's register


def test_end_of_call_pressed_while_a_speculation_is_being_dropped_still_ends_the_call():
    """The call's last note cancels the speculation made at the note before; the end-of-call press
    comes before the scheduler has said what of it was sent (CI, no real-time scheduling). The
    press must not be lost: once the reply is in, the answer starts at the press."""
    h = Harness(wait_ms=400)
    end = call(h)
    gen = h.conv.gen
    h.play(end + 0.1, ON, 67, 90, reply=False)  # the call goes on: the speculation is cancelled
    h.play(end + 0.2, OFF, 67, reply=False)  # held back until the scheduler replies
    assert h.conv.awaiting == gen
    h.conv.end_call(end + 0.21)
    h.conv.on_heard(gen, -1)
    assert h.conv.answer is not None and h.conv.answer.start == pytest.approx(end + 0.21)
    # A note after the press: the call went on, the press is void; its phrase end + wait stands.
    h = Harness(wait_ms=400)
    end = call(h)
    gen = h.conv.gen
    h.play(end + 0.1, ON, 67, 90, reply=False)
    h.conv.end_call(end + 0.15)
    h.play(end + 0.2, OFF, 67, reply=False)
    h.conv.on_heard(gen, -1)
    assert h.conv.answer is not None and h.conv.answer.start == pytest.approx(end + 0.2 + 0.4)

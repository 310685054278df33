"""Properties of the token codec: the contract between training and the live daemon."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import assume, example, given, settings

from antiphon.daemon import codec
from antiphon.daemon import vocab as V

STEP = V.STEP_S


@pytest.fixture
def real_midi_file() -> Path:
    return Path(__file__).parent / "data" / "satie_gymnopedie1_hannds.mid"


@st.composite
def performances(draw, max_notes: int = 40) -> codec.Performance:
    """Random note lists without overlapping notes of one pitch, on a 1 ms grid."""
    n = draw(st.integers(1, max_notes))
    notes: list[codec.Note] = []
    free_at: dict[int, float] = {}
    t = 0.0
    for _ in range(n):
        t += draw(st.integers(0, 2500)) / 1000.0
        pitch = draw(st.integers(0, 127))
        start = max(t, free_at.get(pitch, 0.0) + 0.05)
        length = draw(st.integers(1, 3000)) / 1000.0
        notes.append(codec.Note(pitch, start, start + length, draw(st.integers(1, 127))))
        free_at[pitch] = start + length
    pedal: list[tuple[float, bool]] = []
    if draw(st.booleans()):
        down = False
        for ms in sorted(draw(st.lists(st.integers(0, int(t * 1000) + 1000), max_size=6, unique=True))):
            down = not down
            pedal.append((ms / 1000.0, down))
    notes.sort(key=lambda x: (x.start, x.pitch))
    return codec.Performance(notes, pedal)


def live_bytes(perf: codec.Performance, clock_origin: float) -> list[tuple[list[int], float]]:
    """The messages a keyboard would send for perf, stamped on a monotonic clock."""
    msgs = []
    for e in codec.to_events(perf):
        if e.kind == codec.ON:
            msgs.append(([0x90, e.value, e.velocity], clock_origin + e.time))
        elif e.kind == codec.OFF:
            msgs.append(([0x80 if e.value % 2 else 0x90, e.value, 0], clock_origin + e.time))  # both note-off forms
        else:
            msgs.append(([0xB0, 64, 127 if e.value else 0], clock_origin + e.time))
    return msgs


@settings(max_examples=200, deadline=None)
@given(performances())
def test_streaming_encode_equals_batch_encode(perf):
    # Batch sorts each 10 ms step by kind and pitch; a keyboard sends in time order. The stream
    # below is the canonical order, which a keyboard could send only if its first message is also
    # the earliest: the first message sets the live grid's origin, the earliest event the batch one.
    events = codec.to_events(perf)
    assume(not events or events[0].time == min(e.time for e in events))
    batch = codec.encode_performance(perf)
    enc = codec.TokenEncoder()
    streamed: list[int] = []
    for data, t in live_bytes(perf, clock_origin=0.0):
        enc.midi(data, t, streamed)
        enc.midi([0xF8], t, streamed)  # clock ticks between events carry no music
    assert streamed == batch


@settings(max_examples=200, deadline=None)
@given(performances())
# The pedal sorts first within its step but is not the earliest event: the grid starts earlier.
@example(codec.Performance(notes=[codec.Note(0, 0.05, 0.051, 1), codec.Note(1, 0.056, 0.057, 1)],
                           sustain=[(0.052, True)]))
def test_round_trip_reproduces_notes_up_to_grid_and_velocity_bin(perf):
    decoded = codec.decode_performance(codec.encode_performance(perf), max_note_s=1e9)
    assert len(decoded.notes) == len(perf.notes)
    origin = perf.notes[0].start if not perf.sustain else min(perf.notes[0].start, perf.sustain[0][0])
    by_key = sorted(perf.notes, key=lambda n: (n.pitch, n.start))
    got = sorted(decoded.notes, key=lambda n: (n.pitch, n.start))
    for want, have in zip(by_key, got):
        assert have.pitch == want.pitch
        assert abs((have.start + origin) - want.start) <= STEP / 2 + 1e-9
        assert abs((have.end + origin) - want.end) <= STEP / 2 + 1e-9
        assert abs(have.velocity - want.velocity) <= (128 // V.VELOCITY_BINS) // 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, V.VOCAB_SIZE - 1), max_size=400), st.floats(0.05, 8.0))
def test_any_token_sequence_decodes_without_stuck_notes(tokens, max_note_s):
    msgs = codec.decode_messages(tokens, channel=3, max_note_s=max_note_s)
    sounding: dict[int, float] = {}
    pedal = False
    last_t = 0.0
    for m in msgs:
        assert m.time >= last_t - 1e-9, "messages come out in time order"
        last_t = m.time
        assert m.status & 0x0F == 3
        kind = m.status & 0xF0
        if kind == codec.NOTE_ON_STATUS:
            assert m.data1 not in sounding, "a re-strike is preceded by its note-off"
            sounding[m.data1] = m.time
        elif kind == codec.NOTE_OFF_STATUS:
            start = sounding.pop(m.data1)
            assert m.time - start <= max_note_s + STEP
        else:
            pedal = m.data2 >= 64
    assert not sounding and not pedal


def test_decoder_closes_long_notes_at_max_length_while_time_passes():
    dec = codec.TokenDecoder(max_note_s=0.5)
    out = dec.feed(V.note_on(60)) + dec.feed(V.time_shift(100))
    assert [(m.status & 0xF0, m.data1, round(m.time, 3)) for m in out] == [(0x90, 60, 0.0), (0x80, 60, 0.5)]
    assert dec.sounding() == [] and dec.time == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, V.VOCAB_SIZE - 1), max_size=400), st.floats(0.05, 3.0))
def test_capped_tokens_end_every_note_in_the_stream_itself(sampled, max_note_s):
    """What a generator feeds the model is what sounds: no note outlives max_note_s inside a shift."""
    dec = codec.TokenDecoder(max_note_s=max_note_s)
    for tok in sampled:
        tok = dec.capped(tok)
        offs = [m for m in dec.feed(tok) if m.status & 0xF0 == codec.NOTE_OFF_STATUS]
        if V.TIME_SHIFT <= tok < V.VELOCITY:
            assert offs == [], "a note was closed by the decoder's limit, not by a token"
        for p in dec.sounding():
            assert (dec.step - dec.onset[p]) * STEP <= max_note_s - STEP / 2 + 1e-9


def test_a_shift_past_the_limit_stops_a_step_short_then_the_note_off_is_the_token():
    dec = codec.TokenDecoder(max_note_s=0.5)
    dec.feed(V.note_on(60))
    dec.feed(V.note_on(64))
    assert dec.capped(V.time_shift(30)) == V.time_shift(30)  # well inside the limit
    assert dec.capped(V.time_shift(100)) == V.time_shift(49)
    dec.feed(V.time_shift(49))
    assert dec.capped(V.time_shift(1)) == V.note_off(60)
    dec.feed(V.note_off(60))
    assert dec.capped(V.time_shift(5)) == V.note_off(64)  # its limit too, struck at the same step
    assert dec.capped(V.note_on(67)) == V.note_on(67)  # only shifts are ever replaced


def test_long_silences_and_resets():
    enc = codec.TokenEncoder()
    toks = enc.note_on(10.0, 60, 100) + enc.note_off(12.345, 60) + enc.midi([0xB0, 123, 0], 13.0)
    assert toks == [V.VELOCITY + V.velocity_bin(100), V.note_on(60), V.time_shift(100), V.time_shift(100),
                    V.time_shift(35), V.note_off(60)]
    enc.note_on(13.0, 61, 100)
    assert enc.midi([0xB0, 123, 0], 13.5)[-1] == V.note_off(61), "all-notes-off releases what is sounding"


def test_real_file_round_trip(tmp_path, real_midi_file):
    perf = codec.load_midi(real_midi_file)
    tokens = codec.encode_performance(perf)
    out = tmp_path / "rt.mid"
    codec.write_midi({"tokens": codec.decode_performance(tokens, max_note_s=600)}, out)
    again = codec.load_midi(out)
    assert len(again.notes) == len(perf.notes) > 100
    assert codec.encode_performance(again) == tokens, "encoding is a fixed point after one round trip"


def test_corrupt_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06garbage")
    try:
        codec.load_midi(bad)
    except codec.MidiFileError as e:
        assert "bad.mid" in str(e) and "MIDI" in str(e)
    else:
        raise AssertionError("a corrupt file must raise MidiFileError")

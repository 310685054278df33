"""The torch-free engine: cache semantics, refusal of foreign models, sampling and grammar."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from antiphon.daemon import codec
from antiphon.daemon import engine as engine_mod
from antiphon.daemon import vocab as V
from antiphon.daemon.engine import Engine
from antiphon.daemon.errors import UserError
from antiphon.daemon.sampling import Sampler, call_rhythm, grammar_mask, groove
from antiphon.export.onnx_export import set_metadata


@pytest.fixture()
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model.onnx), log=lambda s: None)


def torch_logits(tiny_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return tiny_model.model(torch.tensor([list(tokens)]))[0][0].numpy()


def test_prefill_and_decode_match_torch(engine, tiny_model):
    seq = tiny_model.tokens[:100]
    ref = torch_logits(tiny_model, seq)
    assert np.abs(engine.prefill(seq[:40]) - ref[39]).max() < 1e-4
    for i in range(40, 100):
        assert np.abs(engine.decode(seq[i]) - ref[i]).max() < 1e-4
    assert engine.length == 100 and list(engine.tokens[:100]) == seq


def test_rollback_is_as_if_never_decoded(engine, tiny_model):
    seq = tiny_model.tokens
    engine.prefill(seq[:30])
    never = engine.decode(seq[30]).copy()
    engine.rollback(30)
    for t in seq[40:55]:  # a discarded speculative continuation
        engine.decode(t)
    engine.rollback(30)
    assert engine.length == 30
    assert np.array_equal(engine.decode(seq[30]), never)
    with pytest.raises(ValueError):
        engine.rollback(engine.length + 1)


def test_slide_matches_fresh_prefill(engine, tiny_model):
    seq = tiny_model.tokens
    engine.prefill(seq[:120])
    last = engine.slide(50).copy()
    assert engine.length == 50 and list(engine.tokens[:50]) == seq[70:120]
    fresh = Engine(str(tiny_model.onnx), log=lambda s: None)
    assert np.array_equal(last, fresh.prefill(seq[70:120]))
    assert np.abs(engine.decode(seq[120]) - torch_logits(tiny_model, seq[70:121])[-1]).max() < 1e-4


def test_cache_full_is_an_error_not_a_wraparound(engine, tiny_model):
    engine.prefill(tiny_model.tokens[:engine.context])
    with pytest.raises(ValueError, match="slide"):
        engine.decode(5)


def test_logits_for_leaves_the_cache_alone(engine, tiny_model):
    seq = tiny_model.tokens
    engine.prefill(seq[:20])
    full = engine.logits_for(seq[:64])
    assert full.shape == (64, V.VOCAB_SIZE) and engine.length == 20
    assert np.abs(full - torch_logits(tiny_model, seq[:64])).max() < 1e-4
    assert np.abs(engine.decode(seq[20]) - full[20]).max() < 1e-4


def test_int8_engine_runs_with_the_same_api(tiny_model):
    eng = Engine(str(tiny_model.int8), log=lambda s: None)
    assert eng.meta["precision"] == "int8" and eng.meta["model_config"]["context"] == 128
    seq = tiny_model.tokens[:64]
    eng.prefill(seq[:32])
    step = [int(np.argmax(eng.decode(t))) for t in seq[32:]]
    ref = np.argmax(torch_logits(tiny_model, seq)[32:], -1)
    assert np.mean(np.array(step) == ref) >= 0.9


def test_other_vocabulary_is_refused(tiny_model, tmp_path):
    proto = onnx.load(str(tiny_model.onnx))
    set_metadata(proto, {"vocab": '{"version": 2, "time_step_ms": 8, "max_shift_steps": 100, "velocity_bins": 32}'})
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(V.VocabMismatch, match="time_step_ms"):
        Engine(str(tmp_path / "other.onnx"), log=lambda s: None)


def test_corrupt_missing_and_foreign_files_are_user_errors(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="antiphon export"):
        Engine(str(tmp_path / "bad.onnx"), log=lambda s: None)
    with pytest.raises(UserError, match="does not exist"):
        Engine(str(tmp_path / "missing.onnx"), log=lambda s: None)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8),
              str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="not an antiphon model"):
        Engine(str(tmp_path / "foreign.onnx"), log=lambda s: None)


def test_missing_default_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_mod, "ASSETS", tmp_path)
    with pytest.raises(UserError, match="--model"):
        engine_mod.default_model_path()


def test_the_shipped_default_model_loads_and_speaks_this_vocabulary():
    engine = Engine(None, threads=1, log=lambda s: None)
    assert Path(engine.model_path).name == "default.int8.onnx", "CPU machines run the int8 model"
    assert engine.context == 1024 and engine.vocab_size == V.VOCAB_SIZE
    logits = engine.prefill([V.BOS, V.VELOCITY + 20, V.note_on(60), V.time_shift(30), V.note_off(60)])
    assert logits.shape == (V.VOCAB_SIZE,) and np.isfinite(logits).all()


def test_engine_logs_one_line_and_imports_without_torch(tiny_model):
    code = ("import sys; from antiphon.daemon.engine import Engine; "
            f"e = Engine({str(tiny_model.onnx)!r}); e.prefill([1, 5, 9]); "
            "assert 'torch' not in sys.modules, 'engine imported torch'")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "engine: tiny.onnx on CPU" in run.stdout
    assert run.stderr == "", "ONNX Runtime should not warn on a CPU-only machine"


def test_sampler_is_seeded_and_honours_temperature_top_p_and_mask():
    logits = np.linspace(-3, 3, V.VOCAB_SIZE).astype(np.float32)
    a = [Sampler(7, 1.0, 0.95).sample(logits) for _ in range(3)]
    s1, s2 = Sampler(7, 1.0, 0.95), Sampler(7, 1.0, 0.95)
    assert [s1.sample(logits) for _ in range(50)] == [s2.sample(logits) for _ in range(50)]
    assert len(set(a)) == 1
    assert Sampler(0, 0.0, 1.0).sample(logits) == V.VOCAB_SIZE - 1
    only_notes = np.zeros(V.VOCAB_SIZE, bool)
    only_notes[V.NOTE_ON:V.NOTE_OFF] = True
    assert Sampler(0, 1.0, 1e-6).sample(logits, only_notes) == V.NOTE_OFF - 1  # nucleus of one token


def test_sampler_keeps_the_models_odds_of_each_event_kind_at_any_temperature():
    """Cooling the sampler sharpens pitch choice but must not starve the 100-bin TIME_SHIFT range."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[V.note_on(60)] = 0.0  # one likely note ...
    logits[V.TIME_SHIFT:V.VELOCITY] = np.log(1.0 / 100)  # ... and as much mass spread over every shift
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (0.3, 0.5)):
        s = Sampler(11, temperature, top_p)
        draws = [s.sample(logits) for _ in range(2000)]
        shifts = sum(V.TIME_SHIFT <= t < V.VELOCITY for t in draws) / len(draws)
        assert 0.45 < shifts < 0.55, (temperature, top_p, shifts)
    mask = np.zeros(V.VOCAB_SIZE, bool)
    mask[[10, 20]] = True
    draws = {Sampler(i, 5.0, 1.0).sample(logits, mask) for i in range(40)}
    assert draws == {10, 20}
    with pytest.raises(ValueError):
        Sampler(0, 1.0, 1.0).sample(logits, np.zeros(V.VOCAB_SIZE, bool))


def _notes_per_second(sampler: Sampler, logits: np.ndarray, seconds: float) -> float:
    notes = steps = 0
    while steps * V.STEP_S < seconds:
        t = sampler.sample(logits)
        notes += V.NOTE_ON <= t < V.NOTE_OFF
        steps += t - V.TIME_SHIFT + 1 if V.TIME_SHIFT <= t < V.VELOCITY else 0
    return notes / (steps * V.STEP_S)


def test_follow_density_settles_between_the_models_rate_and_the_calls():
    """A model that wants 10 notes/s, answering calls of 3 and 20 notes/s: the rate settles at
    10**(1-w) * call**w, as documented, for w = 0 (the model's own), 0.5 and 0.75."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[V.note_on(60)] = 0.0
    logits[V.time_shift(10)] = 0.0  # a note or 100 ms of time at even odds: 10 notes per second
    for w in (0.0, 0.5, 0.75):
        for call_rate in (3.0, 20.0):
            s = Sampler(5, 1.0, 1.0, follow_density=w)
            s.begin(int(call_rate * 8), 8.0)
            got, want = _notes_per_second(s, logits, 120.0), 10.0 ** (1 - w) * call_rate ** w
            assert abs(got / want - 1.0) < 0.15, (w, call_rate, got, want)
    s = Sampler(5, 1.0, 1.0, follow_density=0.75)
    s.begin(0, 8.0)  # a call without notes sets no rate: the model's own odds
    assert 8.5 < _notes_per_second(s, logits, 120.0) < 11.5
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            Sampler(0, 1.0, 1.0, follow_density=bad)


def test_follow_density_never_postpones_releases():
    """Catching up with a busy call trades time for notes; the odds of a release stay the model's."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[[V.note_on(60), V.note_off(60), V.time_shift(10)]] = 0.0
    for w in (0.0, 0.75):
        s = Sampler(4, 1.0, 1.0, follow_density=w)
        s.begin(160, 8.0)  # 20 notes/s against the model's 10
        drawn = [s.sample(logits) for _ in range(3000)]
        offs = np.mean([t == V.note_off(60) for t in drawn])
        assert abs(offs - 1 / 3) < 0.04, (w, offs)
        ons = sum(t == V.note_on(60) for t in drawn)
        if w:
            assert ons > 1.3 * sum(t == V.time_shift(10) for t in drawn)  # the steer still works


def test_follow_articulation_lets_go_of_keys_held_past_the_calls_long_notes():
    """A model that would hold a key forever (its release odds 1e-6 of a time step's): with the
    steer, the key is let go soon after the call's long-note length; without it, never."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[V.time_shift(1)] = 0.0
    logits[V.note_off(60)] = np.log(1e-6)

    def held_for(w: float, seed: int) -> float:
        s = Sampler(seed, 1.0, 1.0, follow_articulation=w)
        s.begin(8, 8.0, 64.0, 0.5)  # the call's long notes last 0.5 s
        dec = codec.TokenDecoder(max_note_s=60.0)
        dec.feed(V.note_on(60))
        mask = np.ones(V.VOCAB_SIZE, bool)
        while dec.step < 800:
            tok = s.sample(logits, grammar_mask(dec, mask), dec)
            dec.feed(tok)
            if tok == V.note_off(60):
                return dec.time
        return math.inf

    steered = [held_for(1.0, i) for i in range(30)]
    assert all(0.5 <= t < 0.9 for t in steered), steered
    assert held_for(0.0, 0) == math.inf
    # A model that only ever waits a whole second: one wait would carry the key from before the
    # call's long-note length to twice past it. Waiting is priced by the overdue time it adds, so
    # the key is let go before the wait or right after it, never a second wait later (judged per
    # token only, it was held on past 1.5 s about one time in five).
    logits[V.time_shift(1)] = -30.0
    logits[V.time_shift(100)] = 0.0
    waits = [held_for(1.0, i) for i in range(30)]
    assert all(t <= 1.0 for t in waits) and any(t == 0.0 for t in waits), waits
    with pytest.raises(ValueError):
        Sampler(0, 1.0, 1.0, follow_articulation=2.0)


def test_follow_rhythm_puts_onsets_on_the_calls_beat():
    """A model with no sense of beat (a note or a 10-500 ms pause at flat odds), answering a call
    with a steady 0.5 s pulse: with the steer, most inter-onset intervals land near 0.5 s."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[[V.note_on(60), V.note_on(64)]] = 0.0
    logits[V.TIME_SHIFT:V.TIME_SHIFT + 50] = np.log(2.0 / 50)
    mask = np.ones(V.VOCAB_SIZE, bool)
    beat = np.arange(16) * 0.5

    def near_beat(w: float) -> float:
        s = Sampler(2, 1.0, 1.0, follow_rhythm=w)
        s.begin(16, 8.0, call_onsets=beat)
        t, onsets = 0, []
        for _ in range(3000):
            tok = s.sample(logits, mask)
            if V.NOTE_ON <= tok < V.NOTE_OFF:
                if not onsets or t - onsets[-1] > 3:
                    onsets.append(t)
            elif V.TIME_SHIFT <= tok < V.VELOCITY:
                t += tok - V.TIME_SHIFT + 1
        iois = np.diff(onsets) * V.STEP_S
        return float(np.mean((iois > 0.4) & (iois < 0.6)))

    steered, own = near_beat(1.0), near_beat(0.0)
    assert steered > 0.4 and steered > 2 * own and own < 0.25, (steered, own)
    with pytest.raises(ValueError):
        Sampler(0, 1.0, 1.0, follow_rhythm=-1.0)
    # The intervals the call never had are disfavoured, the quick ones too (their narrow bins once
    # got a smoothing count each, which made 150 ms likelier than the call's own 500 ms).
    g = groove(call_rhythm(beat), 1.0)
    assert g[15] < 0.6 and g[30] < 0.6 and g[50] > 2.0, (g[15], g[30], g[50])


def test_follow_dynamics_moves_the_loudness_toward_the_calls_and_keeps_the_spread():
    """A model that plays around velocity bin 20 (MIDI ~82) with some spread, answering a soft call
    (MIDI 40, bin 10): w of the way there, the spread kept within 20 %."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[V.VELOCITY:V.SUSTAIN_ON] = -0.5 * ((np.arange(V.VELOCITY_BINS) - 20) / 2.0) ** 2
    mask = np.zeros(V.VOCAB_SIZE, bool)
    mask[V.VELOCITY:V.SUSTAIN_ON] = True

    def draw(w: float, call_velocity: float) -> np.ndarray:
        s = Sampler(9, 1.0, 1.0, follow_dynamics=w)
        s.begin(10, 8.0, call_velocity)
        return np.array([s.sample(logits, mask) - V.VELOCITY for _ in range(3000)])

    own, half, most = draw(0.0, 40.0), draw(0.5, 40.0), draw(0.75, 40.0)
    assert abs(own.mean() - 20) < 0.2
    call_bin = V.velocity_bin(40)
    for w, got in ((0.5, half), (0.75, most)):
        assert abs(got.mean() - (20 + w * (call_bin - 20))) < 0.6, (w, got.mean())
        assert 0.8 < got.std() / own.std() < 1.2
    assert abs(draw(0.75, -1.0).mean() - 20) < 0.2  # no call loudness known: the model's own
    with pytest.raises(ValueError):
        Sampler(0, 1.0, 1.0, follow_dynamics=1.5)


def test_grammar_mask_follows_the_decoder_ledger():
    dec = codec.TokenDecoder()
    mask = grammar_mask(dec, np.empty(V.VOCAB_SIZE, bool))
    assert not mask[V.PAD] and not mask[V.BOS] and mask[V.time_shift(5)]
    assert mask[V.note_on(60)] and not mask[V.note_off(60)] and not mask[V.SUSTAIN_OFF] and mask[V.SUSTAIN_ON]
    for t in (V.note_on(60), V.SUSTAIN_ON):
        dec.feed(t)
    grammar_mask(dec, mask)
    assert not mask[V.note_on(60)] and mask[V.note_off(60)] and not mask[V.note_off(61)]
    assert mask[V.SUSTAIN_OFF] and not mask[V.SUSTAIN_ON]
    dec.feed(V.time_shift(100))
    dec.feed(V.time_shift(100))
    dec.feed(V.time_shift(100))  # past max_note_s (4 s in total): the ledger closed the note
    dec.feed(V.time_shift(100))
    dec.feed(V.time_shift(1))
    assert grammar_mask(dec)[V.note_on(60)]


def test_follow_register_reaches_the_ends_of_the_calls_range():
    """A model that keeps to the middle (pitches 55-65 at 55x the odds of the rest of 40-80),
    answering a call that spanned 40-80: with the steer most answers reach both ends within 6 s,
    and once an end is reached it is left to the model again."""
    logits = np.full(V.VOCAB_SIZE, -30.0)
    logits[V.note_on(40):V.note_on(81)] = -4.0
    logits[V.note_on(55):V.note_on(66)] = 0.0
    logits[V.time_shift(20)] = 2.0
    mask = np.ones(V.VOCAB_SIZE, bool)

    def answer(w: float, seed: int) -> tuple[bool, list[int]]:
        s = Sampler(seed, 1.0, 1.0, follow_register=w)
        s.begin(20, 4.0, call_range=(40, 80))
        pitches = []
        while s.steps < 600:
            tok = s.sample(logits, mask)
            if V.NOTE_ON <= tok < V.NOTE_OFF:
                pitches.append(tok - V.NOTE_ON)
        return min(pitches) <= 43 and max(pitches) >= 77, pitches

    steered = [answer(1.0, i) for i in range(40)]
    own = [answer(0.0, i) for i in range(40)]
    # Measured: 0.85 of the steered answers reach both ends, 0.025 of the model's own.
    assert np.mean([r for r, _ in steered]) > 0.6 and np.mean([r for r, _ in own]) < 0.2
    # Reaching is what it asks, not living there: the middle keeps most notes.
    middle = np.mean([55 <= p <= 65 for _, ps in steered for p in ps])
    assert middle > 0.5, middle
    with pytest.raises(ValueError):
        Sampler(0, 1.0, 1.0, follow_register=1.5)

"""The session memory: learns the player's notes as heard, proposes what followed, mixes into pitch."""

from __future__ import annotations

import numpy as np
import pytest

from antiphon.daemon import vocab as V
from antiphon.daemon.config import Steers
from antiphon.daemon.memory import FLOOR, TOP_BAND, SessionMemory, mix_pitch, mix_top, note_on_logprob
from antiphon.daemon.sampling import Sampler, jam_sampler

MOTIF = [60, 64, 67, 72, 71, 67, 64, 62]


def test_proposes_what_followed_the_longest_matching_context():
    m = SessionMemory(max_order=4)
    for p in MOTIF * 3:
        m.hear(p)
    for p in MOTIF[:3]:
        m.hear(p, learn=False)  # antiphon's own notes steer the lookup, they are not learned
    weight, p = m.propose()
    assert p is not None and p.sum() == pytest.approx(1.0)
    assert int(np.argmax(p)) == 72 and p[72] > 0.8
    assert weight == pytest.approx(m.weight * 4 / (4 + m.half_order))  # the longest order matched
    assert m.heard == len(MOTIF) * 3 - 1  # intervals: the first note only sets where they start
    fresh = SessionMemory()
    assert fresh.propose() == (0.0, None)
    # The interval viewpoint hears the motif moved up a fifth as the same motif.
    moved = SessionMemory(max_order=4)
    for p in MOTIF * 3:
        moved.hear(p)
    for p in MOTIF[:3]:
        moved.hear(p + 7, learn=False)
    assert int(np.argmax(moved.propose()[1])) == 72 + 7
    exact = SessionMemory(max_order=4, viewpoint="pitch")
    for p in MOTIF * 3:
        exact.hear(p)
    for p in MOTIF[:3]:
        exact.hear(p + 7, learn=False)
    assert exact.propose() == (0.0, None)  # those pitches never followed each other


def test_mark_restore_takes_generated_notes_back():
    m = SessionMemory(max_order=3)
    for p in MOTIF * 2:
        m.hear(p)
    mark = m.mark()
    before = m.propose()[1].copy()
    for p in (30, 31, 32):
        m.hear(p, learn=False)
    assert m.propose()[1] is None or not np.allclose(m.propose()[1], before)
    m.restore(mark)
    assert np.allclose(m.propose()[1], before)


def test_memory_is_bounded_and_constant_time_per_note():
    m = SessionMemory(max_order=6, max_contexts=500)
    rng = np.random.default_rng(0)
    for p in rng.integers(21, 109, size=20000):
        m.hear(int(p))
    assert all(len(t) <= 500 for t in m.tables)
    for p in MOTIF * 3:  # recent material is still there after the oldest was dropped
        m.hear(p)
    m.hear(60, learn=False)
    assert int(np.argmax(m.propose()[1])) == 64


def test_mixing_is_a_product_of_experts_and_a_distribution():
    model = np.full(V.N_PITCH, -np.log(V.N_PITCH))
    mem = np.zeros(V.N_PITCH)
    mem[67] = 1.0
    mixed = np.exp(mix_pitch(model, 0.5, mem))
    mixed /= mixed.sum()
    lift = np.sqrt((1 + FLOOR) / FLOOR)  # (p_mem + floor) ** 0.5, relative
    assert mixed[67] == pytest.approx(lift / (lift + 127))
    # The model's veto: a pitch it rules out stays out, however sure the memory is.
    vetoed = mix_pitch(np.where(np.arange(V.N_PITCH) == 67, -np.inf, model), 1.0, mem)
    assert vetoed[67] == -np.inf
    logits = np.zeros(V.VOCAB_SIZE)
    logp = logits - np.log(V.VOCAB_SIZE)
    lp = note_on_logprob(logp, V.note_on(67), 0.5, mem)
    # P(note-on) = 128/393 is the model's; the pitch within it is mixed.
    assert np.exp(lp) == pytest.approx(128 / V.VOCAB_SIZE * mixed[67])
    assert note_on_logprob(logp, V.time_shift(3), 0.5, mem) == pytest.approx(logp[0])
    total = sum(np.exp(note_on_logprob(logp, t, 0.5, mem)) for t in range(V.VOCAB_SIZE))
    assert total == pytest.approx(1.0)


def test_sampler_takes_up_the_players_motif_only_when_asked():
    logits = np.zeros(V.VOCAB_SIZE, dtype=np.float32)
    logits[V.NOTE_ON:V.NOTE_OFF] = 5.0  # a flat pitch choice: the model has no opinion
    mask = np.zeros(V.VOCAB_SIZE, dtype=bool)
    mask[V.NOTE_ON:V.NOTE_OFF] = True

    def next_note(memory: float, seed: int) -> int:
        s = jam_sampler(seed, Steers(memory=memory))
        s.memory.hear_tokens([V.note_on(p) for p in MOTIF * 4])
        for p in MOTIF[:6]:
            s.memory.hear(p, learn=False)  # antiphon has played the motif's first six notes
        return s.sample(logits, mask) - V.NOTE_ON

    # 1000 draws: one standard error is about 0.012 at these odds, well inside the 0.05 asked below
    # (300 draws missed by 0.053 at odds of 0.15).
    with_memory = np.mean([next_note(1.0, i) == MOTIF[6] for i in range(1000)])
    without = np.mean([next_note(0.0, i) == MOTIF[6] for i in range(1000)])
    # What the mixing promises at this point: the memory's proposal to the power of its weight.
    m = SessionMemory()
    m.hear_tokens([V.note_on(p) for p in MOTIF * 4])
    for p in MOTIF[:6]:
        m.hear(p, learn=False)
    weight, proposal = m.propose()
    expected = np.exp(mix_pitch(np.zeros(V.N_PITCH), weight, proposal))
    expected = expected[MOTIF[6]] / expected.sum()
    assert expected > 0.05 and abs(with_memory - expected) < 0.05 and without < 0.03
    # A key the grammar forbids (sounding) is never proposed by the memory either.
    s = jam_sampler(3, Steers(memory=1.0))
    s.memory.hear_tokens([V.note_on(p) for p in [60, 64] * 8])
    s.memory.hear(60, learn=False)
    masked = mask.copy()
    masked[V.note_on(64)] = False
    assert all(s.sample(logits, masked) != V.note_on(64) for _ in range(50))
    with pytest.raises(ValueError, match="memory"):
        jam_sampler(0, Steers(memory=1.5))
    assert Sampler(0, 1.0, 1.0).memory is None


def melody_over_bass(melody: list[int], bass: int = 36) -> list[int]:
    """Each melody note struck with a bass note a step (10 ms) under it, 200 ms apart: the top
    voice is the melody, while successive note-ons alternate bass and tune."""
    out = []
    for p in melody:
        out += [V.note_on(bass), V.time_shift(1), V.note_on(p), V.time_shift(19)]
    return out


def test_top_voice_memory_follows_the_tune_above_the_bass():
    m = SessionMemory()
    m.hear_tokens(melody_over_bass(MOTIF * 3))
    assert m.top.heard == len(MOTIF) * 3 - 2  # intervals between cluster tops; the last cluster is still open
    m.hear_tokens(melody_over_bass(MOTIF[:3]), learn=False)  # antiphon plays the tune's first three notes
    weight, p, above, last = m.propose_top()
    assert (above, last) == (-1, MOTIF[2])  # a new cluster: its next note-on may be the top
    assert weight > 0 and int(np.argmax(p)) == MOTIF[3] and p[MOTIF[3]] > 0.8
    # The bass of the next cluster is struck: only a note above it can be the cluster's top.
    m.hear_token(V.note_on(36), learn=False)
    assert m.propose_top()[2] == 36


def test_top_voice_state_is_marked_and_restored():
    m = SessionMemory()
    m.hear_tokens(melody_over_bass(MOTIF * 3))
    mark = m.mark()  # the player's last cluster is still open: antiphon's first note closes it
    _, before, above, last = m.propose_top()
    m.hear_tokens(melody_over_bass([80, 90, 85]), learn=False)
    assert m.propose_top()[3] == 85
    m.restore(mark)
    _, after, above2, last2 = m.propose_top()
    assert (above2, last2) == (above, last) and np.allclose(after, before)
    assert m.top.heard == len(MOTIF) * 3 - 1  # the player's last top once, nothing antiphon played


def test_mix_top_reshapes_only_the_tune_and_keeps_its_total():
    model = np.log(np.full(V.N_PITCH, 1.0 / V.N_PITCH))
    proposal = np.zeros(V.N_PITCH)
    proposal[67] = 1.0
    mixed = mix_top(model, 1.0, proposal, -1, 64)
    band = slice(64 - TOP_BAND, 64 + TOP_BAND + 1)
    outside = np.ones(V.N_PITCH, dtype=bool)
    outside[band] = False
    assert np.array_equal(mixed[outside], model[outside])  # bass and far voices keep the model's odds
    assert np.exp(mixed[band]).sum() == pytest.approx(np.exp(model[band]).sum())
    assert np.exp(mixed[67]) > 0.9 * np.exp(model[band]).sum()
    # Above a cluster's top so far only: what lies under it cannot become the top.
    over = mix_top(model, 1.0, proposal, 66, 64)
    assert np.array_equal(over[:67], model[:67])
    assert mix_top(model, 1.0, None, -1, 64) is model and mix_top(model, 0.0, proposal, -1, 64) is model


def test_sampler_takes_up_the_players_tune_over_a_bass():
    logits = np.zeros(V.VOCAB_SIZE, dtype=np.float32)
    logits[V.NOTE_ON:V.NOTE_OFF] = 5.0  # a flat pitch choice
    mask = np.zeros(V.VOCAB_SIZE, dtype=bool)
    mask[V.NOTE_ON:V.NOTE_OFF] = True

    def next_top(memory: float, seed: int) -> int:
        s = jam_sampler(seed, Steers(memory=memory))
        s.memory.hear_tokens(melody_over_bass(MOTIF * 4))
        s.memory.hear_tokens(melody_over_bass(MOTIF[:5]), learn=False)
        s.memory.hear_token(V.note_on(36), learn=False)  # the next cluster's bass is down
        return s.sample(logits, mask) - V.NOTE_ON

    with_memory = np.mean([next_top(1.0, i) == MOTIF[5] for i in range(300)])
    without = np.mean([next_top(0.0, i) == MOTIF[5] for i in range(300)])
    assert with_memory > 0.08 and without < 0.03


def test_a_single_line_is_not_proposed_twice():
    """Where the recent notes are the top voice itself, the notes memory already proposes the
    line's next step: the top voice stays out (a doubled proposal over-weighted folk tunes)."""
    line = [t for p in MOTIF * 3 for t in (V.note_on(p), V.time_shift(20))]
    m = SessionMemory()
    m.hear_tokens(line)
    assert m.top.heard == len(MOTIF) * 3 - 2 and m.propose()[1] is not None
    weight, p, _, _ = m.propose_top()
    assert weight == 0.0 and p is None
    m.hear_tokens(melody_over_bass(MOTIF[:3]), learn=False)  # now with a bass under the tune
    assert m.propose_top()[1] is not None

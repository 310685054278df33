"""The session memory: learns the player's notes as heard, proposes what followed, mixes into pitch."""

from __future__ import annotations

import numpy as np
import pytest

from antiphon.daemon import vocab as V
from antiphon.daemon.config import Steers
from antiphon.daemon.memory import FLOOR, SessionMemory, mix_pitch, note_on_logprob
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

    with_memory = np.mean([next_note(1.0, i) == MOTIF[6] for i in range(300)])
    without = np.mean([next_note(0.0, i) == MOTIF[6] for i in range(300)])
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

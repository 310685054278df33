"""The neural cache measured offline (models/neural_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from antiphon.daemon import vocab as V
from antiphon.models import neural_cache as NC


def test_the_cache_proposes_what_followed_the_same_state_within_its_reach():
    a, b = np.eye(4, dtype=np.float32)[0] * 3, np.eye(4, dtype=np.float32)[1] * 3
    H = np.stack([a, b, a, b, a])
    y = np.array([7, 9, 7, 9, 7])
    p = NC.cache_p(H, y, theta=10.0, entries=16)
    assert np.isnan(p[0])  # nothing remembered yet
    assert p[1] == pytest.approx(0.0)  # state b never seen before: all weight on a, which led to 7
    assert p[2] == pytest.approx(1.0, abs=1e-6) and p[4] == pytest.approx(1.0, abs=1e-6)
    # within one entry's reach only the position just before counts: another state, another token
    assert NC.cache_p(H, y, theta=10.0, entries=1)[4] == pytest.approx(0.0)
    logp = np.log(np.full(5, 0.25))
    assert NC.mixed_nll(logp, p, 0.0) == pytest.approx(np.log(4))
    assert NC.mixed_nll(logp, p, 0.5) < np.log(4)  # a cache that is right lowers the NLL


def test_states_score_each_token_with_the_context_jams_slide_gives():
    from antiphon.daemon.config import ModelConfig
    from antiphon.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, context=8, vocab_size=V.VOCAB_SIZE)).eval()
    doc = np.random.default_rng(0).integers(V.PAD + 1, 100, 15)
    H, lp = NC.states(model, doc)
    assert H.shape == (14, 32) and lp.shape == (14,)
    with torch.no_grad():  # positions 8..11 are predicted from the window doc[4:12], the recent half kept
        logits, _ = model(torch.from_numpy(doc[4:12][None]))
    want = torch.log_softmax(logits[0].double(), -1).numpy()[np.arange(4, 8), doc[9:13]]
    assert lp[8:12] == pytest.approx(want, abs=1e-6)
    assert np.abs(H).sum(1).min() > 0  # every position got its hidden state

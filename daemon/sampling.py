"""Token sampling for the daemon: numpy only, seeded, with a grammar mask from the decoder's ledger.

The mask keeps generated streams inside what the encoder itself produces: the encoder releases a
key before re-striking it, so a NOTE_ON for a sounding key never occurs in training data and is
masked (the model must emit the NOTE_OFF first); NOTE_OFF for a silent key and pedal tokens that
would not change the pedal are no-ops for the decoder and are masked so they cannot waste steps.
"""

from __future__ import annotations

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V


class Sampler:
    """Temperature + nucleus (top-p) sampling. temperature <= 0 means greedy."""

    def __init__(self, seed: int | None, temperature: float, top_p: float):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        # JamConfig uses -1 for "random seed".
        self.rng = np.random.default_rng(None if seed is None or seed < 0 else seed)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None) -> int:
        x = np.array(logits, dtype=np.float64)  # a copy: the engine reuses its logits buffer
        if mask is not None:
            x[~mask] = -np.inf
        best = int(np.argmax(x))
        if not np.isfinite(x[best]):
            raise ValueError("the mask allows no token")
        if self.temperature <= 0.0:
            return best
        x -= x[best]
        x /= self.temperature
        p = np.exp(x, out=x)
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            mass = np.cumsum(p[order])
            # Smallest prefix whose mass reaches top_p (always at least the best token).
            cut = int(np.searchsorted(mass, self.top_p * mass[-1])) + 1
            kept = order[:cut]
            c = np.cumsum(p[kept])
            return int(kept[min(int(np.searchsorted(c, self.rng.random() * c[-1], side="right")), cut - 1)])
        c = np.cumsum(p)
        return min(int(np.searchsorted(c, self.rng.random() * c[-1], side="right")), len(c) - 1)


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

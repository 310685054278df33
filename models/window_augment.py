"""Vary a real performance the way another take of it would vary, on the fly, on token windows.

The 14 hours of real piano are the data that most resemble the player, so training sees them
far more often than their share of tokens (see `--perf-share`); each view gets a fresh
variation so that repeated passes do not memorise them:

* tempo: a global factor within ±10 % and a slow sinusoidal drift of a few per cent,
* dynamics: velocity scaled by 0.8-1.2 and bent by a gamma curve (soft and loud players),
* timing: small onset jitter (events move together, order never changes).

Working on tokens (not notes) keeps windows cheap to make: a window is walked once, its
times warped and re-gridded, its velocity tokens remapped. Nothing here touches the held-out
splits: only `sample_batch` calls it, on training windows.
"""

from __future__ import annotations

import numpy as np

from antiphon.daemon import vocab as V

TEMPO_RANGE = 0.10  # global tempo factor within ±10 %
DRIFT_MAX = 0.04  # slow tempo drift depth
VELOCITY_SCALE = (0.8, 1.2)
GAMMA_RANGE = (0.8, 1.25)
JITTER_STEPS = 0.6  # onset jitter, standard deviation in 10 ms steps

_BIN_VELOCITY = np.array([V.bin_velocity(b) for b in range(V.VELOCITY_BINS)], dtype=np.float64)


def velocity_map(rng: np.random.Generator) -> np.ndarray:
    """bin -> bin under one random velocity curve (monotonic, so the dynamics keep their shape)."""
    scale = rng.uniform(*VELOCITY_SCALE)
    gamma = float(np.exp(rng.uniform(np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1]))))
    vel = np.clip(127.0 * (_BIN_VELOCITY / 127.0) ** gamma * scale, 1, 127)
    return np.array([V.velocity_bin(round(float(v))) for v in vel], dtype=np.int64)


def vary(window: np.ndarray, rng: np.random.Generator) -> list[int]:
    """One variation of a token window (any length; the result's length differs a little)."""
    factor = float(np.exp(rng.uniform(np.log(1 - TEMPO_RANGE), np.log(1 + TEMPO_RANGE))))
    depth, period = rng.uniform(0.0, DRIFT_MAX), rng.uniform(8.0, 40.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    vmap = velocity_map(rng)
    out: list[int] = []
    src = 0.0  # source time in steps
    emitted = 0  # output grid step reached
    pending = False  # a time shift happened since the last event: the next event gets jitter
    last_bin = -1
    omega = 2 * np.pi * V.STEP_S / period
    for tok in window.tolist():
        if V.TIME_SHIFT <= tok < V.VELOCITY:
            src += tok - V.TIME_SHIFT + 1
            pending = True
            continue
        if pending:
            # Played time = integral of 1 / (factor * (1 + depth sin)) ≈ src / factor with a slow wobble.
            warped = (src + depth / omega * (np.cos(omega * src + phase) - np.cos(phase))) / factor
            target = max(emitted + 1, round(float(warped + rng.normal(0.0, JITTER_STEPS))))
            gap = target - emitted
            while gap > 0:
                k = min(gap, V.MAX_SHIFT)
                out.append(V.time_shift(k))
                gap -= k
            emitted, pending = target, False
        if V.VELOCITY <= tok < V.SUSTAIN_ON:
            b = int(vmap[tok - V.VELOCITY])
            if b == last_bin:
                continue  # the encoder writes a velocity only when its bin changes
            last_bin = b
            tok = V.VELOCITY + b
        elif tok in (V.BOS, V.EOS):
            last_bin = -1  # a new document starts with no velocity in force
        out.append(tok)
    return out

"""Make quantized scores sound a little more like someone playing them.

Scores arrive with exact grid timing and flat velocity; a model trained only on them would
answer like a sequencer. Each augmented copy of a score work gets, drawn from a generator
seeded by (seed, work, copy) so that builds are reproducible and independent of scheduling:

* a transposition (kept inside the piano range where the work allows it),
* a global tempo change and a slow sinusoidal tempo drift (a time warp, monotonic),
* onset and release jitter of a few milliseconds per note,
* a velocity curve: a base dynamic, slow phrase swells, a lift for the top voice, and noise.
"""

from __future__ import annotations

import hashlib

import numpy as np

from antiphon.daemon.codec import Note, Performance

PIANO_LO, PIANO_HI = 21, 108


def work_rng(seed: int, key: str, copy: int) -> np.random.Generator:
    """A generator that depends only on (seed, key, copy)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{copy}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _transpose(pitch: np.ndarray, rng: np.random.Generator) -> int:
    lo, hi = int(pitch.min()), int(pitch.max())
    allowed = [k for k in range(-5, 7) if lo + k >= PIANO_LO and hi + k <= PIANO_HI]
    if not allowed:
        allowed = [k for k in range(-5, 7) if lo + k >= 0 and hi + k <= 127] or [0]
    return int(rng.choice(allowed))


def _time_warp(t_max: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(score seconds grid, played seconds): a tempo factor with slow drift, for np.interp."""
    factor = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))  # >1: faster
    depth = rng.uniform(0.0, 0.08)
    period = rng.uniform(15.0, 60.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    end = t_max + 1.0
    grid = np.arange(0.0, end + 0.05, 0.05)
    rate = factor * (1.0 + depth * np.sin(2 * np.pi * grid / period + phase))  # score s per played s
    played = np.concatenate([[0.0], np.cumsum(0.05 / rate[:-1])])
    return grid, played


def _velocities(start: np.ndarray, pitch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(50.0, 90.0)
    curve = np.zeros_like(start)
    for _ in range(2):
        amp, period, phase = rng.uniform(4.0, 12.0), rng.uniform(4.0, 20.0), rng.uniform(0, 2 * np.pi)
        curve += amp * np.sin(2 * np.pi * start / period + phase)
    onset = np.round(start / 0.01).astype(np.int64)
    top = np.zeros(len(start), dtype=bool)
    order = np.lexsort((-pitch, onset))  # within each onset, highest pitch first
    first = np.ones(len(order), dtype=bool)
    first[1:] = onset[order][1:] != onset[order][:-1]
    top[order[first]] = True
    vel = base + curve + np.where(top, rng.uniform(3.0, 10.0), 0.0) + rng.normal(0.0, 5.0, len(start))
    return np.clip(np.round(vel), 1, 127).astype(np.int64)


def augment(perf: Performance, rng: np.random.Generator) -> Performance:
    """One humanized copy of a score performance (sustain pedal events are warped too)."""
    if not perf.notes:
        return perf
    arr = np.array([(n.pitch, n.start, n.end) for n in perf.notes], dtype=np.float64)
    pitch = arr[:, 0].astype(np.int64)
    pitch = pitch + _transpose(pitch, rng)
    t_max = max(float(arr[:, 2].max()), max((t for t, _ in perf.sustain), default=0.0))
    grid, played = _time_warp(t_max, rng)
    start, end = np.interp(arr[:, 1], grid, played), np.interp(arr[:, 2], grid, played)
    sigma = rng.uniform(0.004, 0.02)
    start = np.maximum(start + rng.normal(0.0, sigma, len(start)), 0.0)
    end = end + rng.normal(0.0, sigma, len(end))
    end = np.maximum(end, start + 0.03)
    vel = _velocities(start, pitch, rng)
    notes = [Note(int(p), float(s), float(e), int(v)) for p, s, e, v in zip(pitch, start, end, vel)]
    notes.sort(key=lambda n: (n.start, n.pitch))
    sustain = []
    if perf.sustain:
        times = np.interp(np.array([t for t, _ in perf.sustain]), grid, played)
        sustain = [(float(t), d) for t, (_, d) in zip(times, perf.sustain)]
    return Performance(notes, sustain)

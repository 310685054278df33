"""Musical metrics of a response to a call, on token streams (numpy only, no model).

Each number compares a response (generated, or the true continuation) with the call it answers:

  key_agreement  share of response notes in the call's best-fitting major/minor scale
                 (key found by Krumhansl–Kessler profile correlation, duration-weighted)
  density_ratio  response notes/s over call notes/s
  range_overlap  intersection over union of the call's and response's pitch ranges
  closed         share of response NOTE_ONs that the response also releases
  repetition     share of pitch-interval 4-grams that repeat an earlier one in the response
  motif_echo     share of the response's top-voice 3-interval grams found in the call's (the top
                 voice: the highest pitch of each onset cluster within 30 ms)
  held_share     share of response notes sounding longer than 1.5 s (clipped at the window end)
  velocity_mean  mean note-on velocity of the response
  velocity_std   spread (standard deviation) of the response's note-on velocities
  rhythm         overlap of the response's and the call's inter-onset-interval histograms
                 (onset clusters; the rhythm steer's 24 log-spaced classes from 20 ms to 2 s,
                 sampling.ioi_classes)
  copied         share of response notes inside an exact copy of 8 or more consecutive call
                 notes (pitch and relative onset time): plagiarism, not development
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.sampling import IOI_EDGES, ioi_classes

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10, 11)  # natural minor plus the raised leading tone of harmonic minor
METRICS = ("key_agreement", "density_ratio", "range_overlap", "closed", "repetition", "motif_echo", "held_share",
           "velocity_mean", "velocity_std", "rhythm", "copied")
CLUSTER_S = 0.03  # onsets this close form one cluster (a chord, a spread chord), 30 ms itself included
# Onsets are sums of 10 ms steps in float: 1.23 - 1.20 is 0.030000000000000027. Without this slack
# whether two notes 30 ms apart were one cluster depended on where in the piece they fell (until
# 2026-12-02: motif echo and rhythm counted some 30 ms spreads as intervals, the daemon never does).
_CLUSTER_SLACK = 1e-6
HELD_S = 1.5
COPY_RUN = 8


def notes_of(tokens: Sequence[int]) -> list[codec.Note]:
    return [n for n in codec.decode_performance(list(tokens)).notes]


def split_at(tokens: Sequence[int], seconds: float) -> int:
    """Index of the first token at or after `seconds` of TIME_SHIFTs (len(tokens) if never)."""
    steps, target = 0, round(seconds / V.STEP_S)
    for i, t in enumerate(tokens):
        if steps >= target:
            return i
        if V.TIME_SHIFT <= t < V.VELOCITY:
            steps += t - V.TIME_SHIFT + 1
    return len(tokens)


def duration_s(tokens: Sequence[int]) -> float:
    return V.STEP_S * sum(t - V.TIME_SHIFT + 1 for t in tokens if V.TIME_SHIFT <= t < V.VELOCITY)


def best_key(notes: Sequence[codec.Note]) -> tuple[int, str, float]:
    """(tonic pitch class, 'major'|'minor', correlation) of the best-fitting key profile."""
    hist = np.zeros(12)
    for n in notes:
        hist[n.pitch % 12] += max(n.end - n.start, 0.05)  # duration-weighted, as Krumhansl–Schmuckler
    if not hist.any():
        return 0, "major", 0.0
    best = (0, "major", -2.0)
    for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR)):
        for tonic in range(12):
            r = float(np.corrcoef(hist, np.roll(profile, tonic))[0, 1])
            if np.isfinite(r) and r > best[2]:
                best = (tonic, mode, r)
    return best


def key_agreement(call: Sequence[codec.Note], response: Sequence[codec.Note]) -> float:
    if not response:
        return float("nan")
    tonic, mode, _ = best_key(call)
    scale = {(tonic + d) % 12 for d in (MAJOR_SCALE if mode == "major" else MINOR_SCALE)}
    return float(np.mean([n.pitch % 12 in scale for n in response]))


def range_overlap(call: Sequence[codec.Note], response: Sequence[codec.Note]) -> float:
    if not call or not response:
        return float("nan")
    a = (min(n.pitch for n in call), max(n.pitch for n in call))
    b = (min(n.pitch for n in response), max(n.pitch for n in response))
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
    return inter / (max(a[1], b[1]) - min(a[0], b[0]) + 1)


def closed_share(response_tokens: Sequence[int]) -> float:
    """Share of the response's NOTE_ONs released within it (a re-strike counts as a release)."""
    open_at: dict[int, int] = {}
    struck = closed = 0
    for t in response_tokens:
        if V.NOTE_ON <= t < V.NOTE_OFF:
            p = t - V.NOTE_ON
            struck += 1
            closed += p in open_at
            open_at[p] = 1
        elif V.NOTE_OFF <= t < V.TIME_SHIFT and (t - V.NOTE_OFF) in open_at:
            del open_at[t - V.NOTE_OFF]
            closed += 1
    return closed / struck if struck else float("nan")


def repetition(notes: Sequence[codec.Note], n: int = 4) -> float:
    """Share of interval n-grams (onset order) already seen earlier in the same response."""
    pitches = [x.pitch for x in sorted(notes, key=lambda x: (x.start, x.pitch))]
    intervals = np.diff(pitches)
    grams = [tuple(intervals[i:i + n]) for i in range(len(intervals) - n + 1)]
    if not grams:
        return float("nan")
    seen: set[tuple] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def onset_clusters(notes: Sequence[codec.Note]) -> list[list[codec.Note]]:
    """Notes grouped by onset: a note within CLUSTER_S of its cluster's first onset joins it."""
    clusters: list[list[codec.Note]] = []
    for n in sorted(notes, key=lambda x: (x.start, x.pitch)):
        if clusters and n.start - clusters[-1][0].start <= CLUSTER_S + _CLUSTER_SLACK:
            clusters[-1].append(n)
        else:
            clusters.append([n])
    return clusters


def interval_grams(notes: Sequence[codec.Note], n: int = 3) -> list[tuple[int, ...]]:
    """The top voice's successive intervals, as n-grams."""
    top = [max(c, key=lambda x: x.pitch).pitch for c in onset_clusters(notes)]
    steps = np.diff(top).tolist()
    return [tuple(steps[i:i + n]) for i in range(len(steps) - n + 1)]


def motif_echo(call: Sequence[codec.Note], response: Sequence[codec.Note]) -> float:
    grams = interval_grams(response)
    if not grams:
        return float("nan")
    known = set(interval_grams(call))
    return float(np.mean([g in known for g in grams]))


def held_share(response: Sequence[codec.Note], window_s: float) -> float:
    if not response:
        return float("nan")
    return float(np.mean([min(n.end, window_s) - n.start > HELD_S for n in response]))


def ioi_histogram(notes: Sequence[codec.Note]) -> np.ndarray:
    onsets = [c[0].start for c in onset_clusters(notes)]
    hist = np.bincount(ioi_classes(np.diff(onsets) / V.STEP_S), minlength=len(IOI_EDGES) - 1)
    return hist / hist.sum() if hist.sum() else hist.astype(float)


def rhythm_overlap(call: Sequence[codec.Note], response: Sequence[codec.Note]) -> float:
    a, b = ioi_histogram(call), ioi_histogram(response)
    if not a.any() or not b.any():
        return float("nan")
    return float(np.minimum(a, b).sum())


def copied_share(call: Sequence[codec.Note], response: Sequence[codec.Note], run: int = COPY_RUN) -> float:
    """Share of response notes in a run of >= `run` notes that repeats consecutive call notes exactly:
    same pitches, same onset gaps (to the 10 ms grid)."""
    if not response:
        return float("nan")
    key = lambda ns: [(n.pitch, round(n.start / V.STEP_S)) for n in sorted(ns, key=lambda x: (x.start, x.pitch))]
    a, b = key(call), key(response)
    copied = np.zeros(len(b), dtype=bool)
    for i in range(len(b)):
        for j in range(len(a)):
            k = 0
            while (i + k < len(b) and j + k < len(a) and b[i + k][0] == a[j + k][0]
                   and (k == 0 or b[i + k][1] - b[i][1] == a[j + k][1] - a[j][1])):
                k += 1
            if k >= run:
                copied[i:i + k] = True
    return float(copied.mean())


def phrase_metrics(call_tokens: Sequence[int], response_tokens: Sequence[int],
                   call_s: float, response_s: float) -> dict[str, float]:
    call, resp = notes_of(call_tokens), notes_of(response_tokens)
    call_density = len(call) / max(call_s, 1e-6)
    density = len(resp) / max(response_s, 1e-6)
    return {
        "key_agreement": key_agreement(call, resp),
        "density_ratio": density / call_density if call_density else float("nan"),
        "range_overlap": range_overlap(call, resp),
        "closed": closed_share(response_tokens),
        "repetition": repetition(resp),
        "motif_echo": motif_echo(call, resp),
        "held_share": held_share(resp, response_s),
        "velocity_mean": float(np.mean([n.velocity for n in resp])) if resp else float("nan"),
        "velocity_std": float(np.std([n.velocity for n in resp])) if len(resp) > 1 else float("nan"),
        "rhythm": rhythm_overlap(call, resp),
        "copied": copied_share(call, resp),
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over phrases, ignoring undefined (NaN) values."""
    out = {}
    for m in METRICS:
        vals = np.array([r[m] for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[m] = float(vals.mean()) if vals.size else float("nan")
    return out

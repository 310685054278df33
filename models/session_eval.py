"""Streamed session NLL: a whole work fed token by token the way the daemon hears a session.

The window slides as in jam (a full cache keeps its recent half and re-prefills), and the
session memory (daemon/memory.py) learns every note as it is heard. Per note-on we keep what
the mixing needs (the model's pitch log-odds, and for each memory variant its match length and
whole proposal), so the memory's constants are fitted on one set without running the model
again, and then reported on another.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from antiphon.daemon import memory as MEM
from antiphon.daemon import vocab as V
from antiphon.daemon.memory import SessionMemory

VARIANTS = (("interval", 4), ("interval", 6), ("pitch", 6))
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
HALF_ORDERS = (0.5, 1.0, 2.0, 4.0)
TOP_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64 (eval's windows and the streamed tokens alike)."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def stream(lm, docs: Sequence[Sequence[int]], variants: Sequence[tuple[str, int]] = VARIANTS) -> dict:
    """Per scored token: model log p. Per note-on: the model's pitch log-odds given a note-on
    (128, float32), the played pitch, and per memory variant (viewpoint, max order) its match
    length and proposal (128, float32; zeros where nothing matched)."""
    logp_all, pitch_logp, target, match, mem_p, top = [], [], [], [], [], []
    for doc in docs:
        memories = [SessionMemory(max_order=k, weight=1.0, half_order=0.0, viewpoint=v, top_voice=False)
                    for v, k in variants]
        jam = SessionMemory(top_weight=1.0)  # its top voice at unit weight: `nll` scales it as jam mixes it
        lm.reset()
        logits = lm.prefill([doc[0]])
        window = [doc[0]]
        for tok in doc[1:]:
            logp = log_softmax(np.asarray(logits))
            logp_all.append(logp[tok])
            if V.NOTE_ON <= tok < V.NOTE_OFF:
                on = logp[V.NOTE_ON:V.NOTE_OFF]
                pitch_logp.append((on - (on.max() + math.log(np.exp(on - on.max()).sum()))).astype(np.float32))
                target.append(tok - V.NOTE_ON)
                row_k, row_p = [], []
                for m in memories:
                    _, proposal = m.propose()
                    row_k.append(m.match())
                    row_p.append(proposal.astype(np.float32) if proposal is not None else np.zeros(V.N_PITCH, np.float32))
                    m.hear(tok - V.NOTE_ON)
                match.append(row_k)
                mem_p.append(row_p)
                w, proposal, above, last = jam.propose_top()
                add = np.full(V.N_PITCH, np.nan, np.float32)  # what mix_top adds in its band (NaN: outside)
                if proposal is not None and w > 0.0:
                    lo, hi = MEM.top_band(above, last)
                    add[lo:hi] = w * np.log(proposal[lo:hi] + MEM.FLOOR)
                top.append(add)
            jam.hear_token(tok)
            if len(window) >= lm.context:  # jam's slide: keep the recent half, prefill it afresh
                window = window[-(lm.context // 2):]
                lm.reset()
                lm.prefill(window)
            logits = lm.decode(tok)
            window.append(tok)
    n = len(variants)
    return {"logp": np.array(logp_all), "pitch_logp": np.array(pitch_logp, np.float32).reshape(-1, V.N_PITCH),
            "target": np.array(target, dtype=np.int64), "match": np.array(match, dtype=float).reshape(-1, n),
            "mem_p": np.array(mem_p, np.float32).reshape(-1, n, V.N_PITCH), "variants": [tuple(v) for v in variants],
            "top_add": np.array(top, np.float32).reshape(-1, V.N_PITCH)}


def nll(s: dict, variant: tuple[str, int] | None = None, weight: float = 0.0, half_order: float = 1.0,
        top_weight: float = MEM.TOP_WEIGHT) -> float:
    """Mean nats/token with the memory `variant` mixed in as jam mixes it at `weight`, and the top
    voice at `top_weight` (variant None, or both weights 0: the model alone). The top voice's
    proposals were recorded at unit weight and its own half order; `top_weight` scales them."""
    total = -s["logp"].sum()
    if variant is None or (weight <= 0.0 and top_weight <= 0.0) or s["target"].size == 0:
        return float(total / s["logp"].size)
    return float((total - note_on_gain(s, variant, weight, half_order, top_weight).sum()) / s["logp"].size)


def note_on_gain(s: dict, variant: tuple[str, int], weight: float, half_order: float, top_weight: float) -> np.ndarray:
    """Per note-on, in stream order: log p of the played pitch with the memory mixed in as `nll`
    describes, minus the model's alone."""
    j = s["variants"].index(tuple(variant))
    k = np.maximum(s["match"][:, j], 0.0)
    w = np.where(k >= 1, weight * k / (k + half_order), 0.0)[:, None]
    mixed = s["pitch_logp"].astype(np.float64) + w * np.log(s["mem_p"][:, j].astype(np.float64) + MEM.FLOOR)
    if top_weight > 0.0:
        mixed = _mix_top(mixed, s["top_add"].astype(np.float64) * top_weight)
    mixed -= mixed.max(axis=1, keepdims=True)
    mixed -= np.log(np.exp(mixed).sum(axis=1, keepdims=True))
    rows = np.arange(s["target"].size)
    return mixed[rows, s["target"]] - s["pitch_logp"][rows, s["target"]]


def _mix_top(mixed: np.ndarray, add: np.ndarray) -> np.ndarray:
    """memory.mix_top for every row at once: `add` in its band (not NaN), rescaled to keep the band's total."""
    band = ~np.isnan(add) & np.isfinite(mixed)
    rows = band.any(axis=1)
    if not rows.any():
        return mixed
    m, a, b = mixed[rows], add[rows], band[rows]

    def total(x: np.ndarray) -> np.ndarray:
        x = np.where(b, x, -np.inf)
        top = x.max(axis=1, keepdims=True)
        return top[:, 0] + np.log(np.exp(x - top).sum(axis=1))

    mixed[rows] = np.where(b, m + a + (total(m) - total(m + a))[:, None], m)
    return mixed


def shipped_constants() -> tuple[tuple[str, int], float, float, float]:
    return (MEM.VIEWPOINT, MEM.MAX_ORDER), MEM.WEIGHT, MEM.HALF_ORDER, MEM.TOP_WEIGHT


Grid = dict[tuple[float, float, float], float]


def grids(s: dict) -> dict[tuple[str, int], Grid]:
    """Per memory variant, the streamed NLL at every (weight, half order, top-voice weight) on the
    search grid: computed once, for `fit` and `rule` both (each point costs a pass over the set)."""
    return {tuple(v): {c: nll(s, v, *c) for c in itertools.product(WEIGHTS, HALF_ORDERS, TOP_WEIGHTS)}
            for v in s["variants"]}


def rule(s: dict, grid: Grid | None = None, variant: tuple[str, int] = (MEM.VIEWPOINT, MEM.MAX_ORDER)) -> dict:
    """How the shipped constants are chosen (docs/model.md), on `valid_score`: at each top-voice
    weight the NLL-best notes memory; the largest top-voice weight whose NLL is still below the
    model alone (as much pull toward the player's tune as still predicts the music better).
    `grid`: the variant's entry of `grids(s)`, if already computed."""
    g = grid if grid is not None else grids(s)[tuple(variant)]
    without = nll(s)
    rows = {}
    for top in TOP_WEIGHTS:
        w, h, _ = min((c for c in g if c[2] == top), key=g.__getitem__)
        rows[top] = {"weight": w, "half_order": h, "nll": g[w, h, top]}
    below = [top for top, r in rows.items() if r["nll"] < without]
    chosen = max(below) if below else 0.0
    return {"variant": list(variant), "nll_without": without, "by_top_weight": {str(k): v for k, v in rows.items()},
            "top_weight": chosen, **({k: rows[chosen][k] for k in ("weight", "half_order")} if below
                                     else {"weight": 0.0, "half_order": HALF_ORDERS[0]})}


def fit(s: dict, by_variant: dict[tuple[str, int], Grid] | None = None) -> dict:
    """The memory variant and mixing constants with the lowest streamed NLL on this set, and the
    best of each variant (to compare viewpoints and orders). `by_variant`: `grids(s)`, if already
    computed."""
    by_variant = by_variant if by_variant is not None else grids(s)
    per_variant = {}
    for v, g in by_variant.items():
        c = min(g, key=g.__getitem__)
        per_variant[f"{v[0]}/{v[1]}"] = {"weight": c[0], "half_order": c[1], "top_weight": c[2], "nll": g[c]}
    name, best = min(per_variant.items(), key=lambda kv: kv[1]["nll"])
    viewpoint, order = name.split("/")
    return {"viewpoint": viewpoint, "max_order": int(order), **{k: best[k] for k in ("weight", "half_order", "top_weight")},
            "nll": best["nll"], "nll_without": nll(s), "variants": per_variant}

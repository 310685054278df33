"""Streamed session NLL: a whole work fed token by token the way the daemon hears a session.

The window slides as in jam (a full cache keeps its recent half and re-prefills), and the
session memory (daemon/memory.py) learns every note as it is heard. Per note-on we keep what
the mixing needs (the model's kind and pitch log-odds, the memory's match length and proposal
for the played pitch at each maximum order), so the memory's constants are fitted on one
set without running the model again, and then reported on another.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from antiphon.daemon import memory as MEM
from antiphon.daemon import vocab as V
from antiphon.daemon.memory import SessionMemory

VARIANTS = tuple((v, k) for v in ("interval", "pitch") for k in (2, 4, 6, 8))
WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
HALF_ORDERS = (0.5, 1.0, 2.0, 4.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - math.log(np.exp(x).sum())


def stream(lm, docs: Sequence[Sequence[int]], variants: Sequence[tuple[str, int]] = VARIANTS) -> dict[str, np.ndarray]:
    """Per scored token: model log p; per note-on: log P(kind), log p(pitch | on), and per memory
    variant (viewpoint, max order) its match length and proposed p(pitch) (NaN where none)."""
    logp_all, on_kind, on_pitch, match, mem_p = [], [], [], [], []
    for doc in docs:
        memories = [SessionMemory(max_order=k, weight=1.0, half_order=0.0, viewpoint=v) for v, k in variants]
        lm.reset()
        logits = lm.prefill([doc[0]])
        window = [doc[0]]
        for tok in doc[1:]:
            logp = _log_softmax(np.asarray(logits))
            logp_all.append(logp[tok])
            if V.NOTE_ON <= tok < V.NOTE_OFF:
                on = logp[V.NOTE_ON:V.NOTE_OFF]
                kind = on.max() + math.log(np.exp(on - on.max()).sum())
                on_kind.append(kind)
                on_pitch.append(logp[tok] - kind)
                row_k, row_p = [], []
                for m in memories:
                    _, proposal = m.propose()
                    row_k.append(m.match())
                    row_p.append(proposal[tok - V.NOTE_ON] if proposal is not None else np.nan)
                    m.hear(tok - V.NOTE_ON)
                match.append(row_k)
                mem_p.append(row_p)
            if len(window) >= lm.context:  # jam's slide: keep the recent half, prefill it afresh
                window = window[-(lm.context // 2):]
                lm.reset()
                lm.prefill(window)
            logits = lm.decode(tok)
            window.append(tok)
    n = len(variants)
    return {"logp": np.array(logp_all), "on_kind": np.array(on_kind), "on_pitch": np.array(on_pitch),
            "match": np.array(match, dtype=float).reshape(-1, n), "mem_p": np.array(mem_p, dtype=float).reshape(-1, n),
            "variants": list(variants)}


def nll(s: dict[str, np.ndarray], variant: tuple[str, int] | None = None, weight: float = 0.0,
        half_order: float = 1.0) -> float:
    """Mean nats/token with the memory `variant` mixed in (None or weight 0: the model alone)."""
    total = -s["logp"].sum()
    if variant is None or weight <= 0.0 or s["on_kind"].size == 0:
        return float(total / s["logp"].size)
    j = s["variants"].index(tuple(variant))
    k, p = s["match"][:, j], s["mem_p"][:, j]
    use = (k >= 1) & np.isfinite(p)
    kk = np.maximum(k, 0.0)
    w = np.where(use, weight * kk / (kk + half_order), 0.0)
    mixed = (1 - w) * np.exp(s["on_pitch"]) + w * np.where(use, p, 0.0)
    delta = -(s["on_kind"] + np.log(mixed)).sum() + (s["on_kind"] + s["on_pitch"]).sum()
    return float((total + delta) / s["logp"].size)


def shipped_constants() -> tuple[tuple[str, int], float, float]:
    return (MEM.VIEWPOINT, MEM.MAX_ORDER), MEM.WEIGHT, MEM.HALF_ORDER


def fit(s: dict[str, np.ndarray]) -> dict:
    """The memory variant and mixing constants with the lowest streamed NLL on this set, and the
    best of each variant (to compare viewpoints and orders)."""
    per_variant = {}
    for v in s["variants"]:
        w, h = min(itertools.product(WEIGHTS, HALF_ORDERS), key=lambda c: nll(s, v, *c))
        per_variant[f"{v[0]}/{v[1]}"] = {"weight": w, "half_order": h, "nll": nll(s, v, w, h)}
    name, best = min(per_variant.items(), key=lambda kv: kv[1]["nll"])
    viewpoint, order = name.split("/")
    return {"viewpoint": viewpoint, "max_order": int(order), "weight": best["weight"],
            "half_order": best["half_order"], "nll": best["nll"], "nll_without": nll(s), "variants": per_variant}

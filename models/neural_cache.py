"""The other session memory issue 10 names, measured offline: a neural cache (Grave et al.'s
continuous cache, the kNN-LM's idea). Every position of the session so far is remembered as
(the model's last hidden state there, the token that followed); the next token's cache
distribution is a softmax of theta * (now . then) over the remembered states, summed per token,
and mixed with the model's as (1 - lam) p_model + lam p_cache. Works are streamed as
`session_eval` streams them (jam's slide: a full window keeps its recent half), on top of the
shipped session memory or alone; (theta, lam) are chosen on valid_score, reported on valid_perf:

    python -m antiphon.models.neural_cache models/assets/default.pt --data data/corpus

Not in the daemon (docs/model.md: what it measured, and what building it would take).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

THETAS = (0.05, 0.1, 0.2)
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.3)
ENTRIES = (16384, 4096, 1024)  # how many past positions the cache keeps


def states(model, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted position of `doc`: the last hidden state (after the final LayerNorm) and
    the model's log p of the token that followed, with the context jam's slide gives."""
    import torch

    hidden: dict = {}
    hook = model.ln_f.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    C, half, n = model.cfg.context, model.cfg.context // 2, doc.size - 1
    H, lp = np.zeros((n, model.cfg.d_model), np.float32), np.zeros(n)
    s = 0
    try:
        while True:
            w = doc[s:s + C + 1]
            with torch.no_grad():
                logits, _ = model(torch.from_numpy(w[:-1].astype(np.int64))[None])
            logp = torch.log_softmax(logits[0].double(), -1).numpy()
            idx = np.arange(0 if s == 0 else half, w.size - 1)
            H[s + idx] = hidden["h"][0].numpy()[idx]
            lp[s + idx] = logp[idx, w[1:][idx]]
            if s + C >= n:
                return H, lp
            s += half
    finally:
        hook.remove()


def cache_p(H: np.ndarray, y: np.ndarray, theta: float, entries: int) -> np.ndarray:
    """p_cache of each position's actual next token y[t] from positions t-entries..t-1 (NaN at
    t = 0: nothing remembered yet)."""
    n, p = y.size, np.full(y.size, np.nan)
    for t0 in range(0, n, 1024):
        t1, lo = min(n, t0 + 1024), max(0, t0 - entries)
        t, i = np.arange(t0, t1)[:, None], np.arange(lo, t1)[None]
        S = np.where((i < t) & (i >= t - entries), theta * (H[t0:t1] @ H[lo:t1].T), -np.inf)
        top = S.max(1, keepdims=True)
        E = np.exp(S - np.where(np.isfinite(top), top, 0.0))
        den = E.sum(1)
        num = (E * (y[lo:t1][None] == y[t0:t1][:, None])).sum(1)
        p[t0:t1] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return p


def mixed_nll(logp: np.ndarray, pc: np.ndarray, lam: float) -> float:
    pm = np.exp(logp)
    return float(-np.log(np.where(np.isnan(pc), pm, (1 - lam) * pm + lam * np.nan_to_num(pc))).mean())


def memory_logp(engine, docs: list[np.ndarray]) -> np.ndarray:
    """Per token: log p with the shipped session memory mixed as jam mixes it (session_eval)."""
    from antiphon.daemon import vocab as V
    from antiphon.models import session_eval as SE

    constants = SE.shipped_constants()
    s = SE.stream(engine, [d.tolist() for d in docs], variants=[constants[0]])
    out = s["logp"].astype(np.float64)
    ys = np.concatenate([d[1:] for d in docs])
    out[(ys >= V.NOTE_ON) & (ys < V.NOTE_OFF)] += SE.note_on_gain(s, *constants)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m antiphon.models.neural_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--onnx", default="daemon/assets/default.onnx", help="the same model as ONNX, for the session memory's stream")
    p.add_argument("--data", default="data/corpus")
    args = p.parse_args(argv)
    import torch

    from antiphon.daemon.engine import Engine
    from antiphon.models.checkpoint import load_model
    from antiphon.models.data import read_split

    torch.set_num_threads(1)
    model, _, _ = load_model(args.checkpoint)
    engine = Engine(args.onnx, threads=1, log=lambda m: None)
    grid: dict[str, dict[str, float]] = {}
    for split in ("valid_score", "valid_perf"):
        tokens, offsets = read_split(args.data, split)
        docs = [np.asarray(tokens[a:b]) for a, b in itertools.pairwise(offsets) if b - a >= 2]
        per_doc = [states(model, d) for d in docs]
        alone = np.concatenate([lp for _, lp in per_doc])
        bases = {"cache": alone, "memory+cache": memory_logp(engine, docs)}
        g = grid[split] = {"model": float(-alone.mean()), "memory": float(-bases["memory+cache"].mean())}
        for entries in ENTRIES:
            for theta in THETAS:
                pc = np.concatenate([cache_p(H, d[1:], theta, entries) for (H, _), d in zip(per_doc, docs)])
                for lam in LAMBDAS:
                    for name, base in bases.items():
                        g[f"{name} entries={entries} theta={theta} lam={lam}"] = mixed_nll(base, pc, lam)
    score, perf = grid["valid_score"], grid["valid_perf"]
    rows = {"model alone": {"valid_score": score["model"], "valid_perf": perf["model"]},
            "session memory (shipped)": {"valid_score": score["memory"], "valid_perf": perf["memory"]}}
    for name in ("cache", "memory+cache"):
        for entries in ENTRIES:
            keys = [k for k in score if k.startswith(f"{name} entries={entries} ")]
            best = min(keys, key=score.__getitem__)
            rows[best] = {"valid_score": score[best], "valid_perf": perf[best]}
    print(json.dumps({k: {s: round(v, 4) for s, v in r.items()} for k, r in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

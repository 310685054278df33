"""What the jam's sampler adds per token, side by side with the plain sampler and a decode step.

    python bench/sampler.py [--tokens 4000] [--json]

The jam sampler (session memory after two hours of heard notes, density, dynamics, articulation
and rhythm steers) against the plain one (temperature and top-p only), on the same logits, and
the shipped int8 model's decode step at context 1024 as the yardstick: the answer is generated
ahead of its playing, so what matters is that sampling stays small beside decoding.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import JamConfig, Steers
from antiphon.daemon.engine import Engine
from antiphon.daemon.sampling import Sampler, grammar_mask, jam_sampler


def per_token(step, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        step()
        out[i] = time.perf_counter() - t
    return out * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    engine = Engine(None, threads=1, log=lambda _: None)
    logits = np.array(engine.prefill(rng.integers(3, 300, size=engine.context - 1).tolist()), dtype=np.float32)
    decoder = codec.TokenDecoder()
    for tok in (V.note_on(60), V.note_on(64), V.time_shift(80)):
        decoder.feed(tok)
    mask = grammar_mask(decoder)
    plain = Sampler(0, 0.85, 0.9)
    jam = jam_sampler(0, Steers.of(JamConfig()))
    # 2 h at 10 notes/s, 100 ms apart: every note its own cluster, so the top voice holds as much
    jam.memory.hear_tokens([t for p in rng.integers(36, 96, size=72000) for t in (V.note_on(int(p)), V.time_shift(10))])
    jam.begin(40, 8.0, 64.0, 0.8, np.cumsum(rng.uniform(0.1, 0.6, size=40)))

    def decode() -> None:
        engine.rollback(engine.context - 1)
        engine.decode(60)

    rows = {"plain sampler": per_token(lambda: plain.sample(logits, mask, decoder), args.tokens),
            "jam sampler (memory + steers)": per_token(lambda: jam.sample(logits, mask, decoder), args.tokens),
            "int8 decode step, context 1024": per_token(decode, args.tokens // 4)}
    result = {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))} for k, v in rows.items()}
    result["jam / plain (p50)"] = result["jam sampler (memory + steers)"]["p50_ms"] / result["plain sampler"]["p50_ms"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result.items():
        print(f"{k:34s} " + (f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f} ms" if isinstance(v, dict) else f"{v:.2f}x"))


if __name__ == "__main__":
    main()

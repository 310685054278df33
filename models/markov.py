"""The variable-order Markov baseline (Continuator style), with PPM-C escape smoothing.

For each order k = 1..max_order it counts (context of the k previous tokens, next token).
A prediction blends orders from short to long, Witten–Bell / PPM-C style (without exclusion):

    P_k(x) = (c_k(x) + u_k * P_{k-1}(x)) / (n_k + u_k)

where n_k is how often the order-k context was seen, c_k(x) how often x followed it and u_k
how many distinct tokens did (the escape count of PPM-C). Unseen contexts pass P_{k-1} through,
so the longest matching context dominates when it has been seen often and backs off smoothly
when not; P_0 is add-one unigram, so every token has a finite NLL.

Contexts are hashed to uint64 (a polynomial rolling hash; collisions among the ~10^7 contexts of
a 1.5M-token corpus are vanishingly rare) and stored as sorted numpy arrays, so counting is a
few np.unique calls per order and scoring a whole file is vectorised searchsorted lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.models.shards import file_sha256, read_split

CACHE_VERSION = 1
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio), spreads the hash
_VBITS = 9  # 2**9 = 512 > VOCAB_SIZE: a (context index, token) pair packs into one int64
assert V.VOCAB_SIZE <= 1 << _VBITS


def context_hashes(tokens: np.ndarray, max_order: int) -> list[np.ndarray]:
    """h[k-1][i] = hash of tokens[i-k+1 .. i] (the k tokens ending at i); valid for i >= k-1."""
    t = tokens.astype(np.uint64) + np.uint64(1)
    h = np.zeros(len(t), dtype=np.uint64)
    out = []
    with np.errstate(over="ignore"):
        for k in range(1, max_order + 1):
            shifted = np.zeros_like(t)
            shifted[k - 1:] = t[:len(t) - k + 1]  # the token k-1 places back: extends the context leftwards
            h = h * _MUL + shifted
            out.append(h.copy())
    return out


@dataclass
class Order:
    ctx: np.ndarray  # sorted unique context hashes (uint64)
    n: np.ndarray  # times each context was seen
    u: np.ndarray  # distinct successors of each context
    pair: np.ndarray  # sorted (context index << 9 | token), int64
    count: np.ndarray  # count of each pair


def blend(c, n, u, lower, discount: float):
    """P_k from the order-k counts and P_{k-1}; both rules give every seen context total mass 1.

    discount 0: PPM-C / Witten–Bell, (c + u P_{k-1}) / (n + u).
    discount D in (0, 1]: interpolated absolute discounting, (max(c - D, 0) + D u P_{k-1}) / n,
    which escapes less from contexts seen often and more from contexts seen once.
    """
    if discount <= 0.0:
        return (c + u * lower) / np.maximum(n + u, 1)
    return (np.maximum(c - discount, 0.0) + discount * u * lower) / np.maximum(n, 1)


class MarkovModel:
    def __init__(self, unigram: np.ndarray, orders: list[Order], discount: float = 0.0):
        self.unigram, self.orders, self.discount = unigram, orders, discount

    @property
    def max_order(self) -> int:
        return len(self.orders)

    @classmethod
    def fit(cls, tokens: np.ndarray, max_order: int = 10, discount: float = 0.0) -> MarkovModel:
        tokens = np.asarray(tokens, dtype=np.int64)
        counts = np.bincount(tokens, minlength=V.VOCAB_SIZE).astype(np.float64) + 1.0
        counts[V.PAD] = 0.0  # PAD never occurs in a document; giving it mass would only waste some
        orders = []
        for k, h in enumerate(context_hashes(tokens, max_order), start=1):
            ctx_h, nxt = h[k - 1:-1], tokens[k:]  # context ending at i predicts token i+1
            ctx, inv, n = np.unique(ctx_h, return_inverse=True, return_counts=True)
            pair, count = np.unique((inv.astype(np.int64) << _VBITS) | nxt, return_counts=True)
            u = np.bincount(pair >> _VBITS, minlength=len(ctx))
            orders.append(Order(ctx, n.astype(np.int32), u.astype(np.int32), pair, count.astype(np.int32)))
        return cls(counts / counts.sum(), orders, discount)

    # ------------------------------------------------------------------ scoring

    def _lookup(self, o: Order, h: np.ndarray, nxt: np.ndarray):
        """(n, u, c) for contexts h followed by nxt; zeros where the context was never seen."""
        idx = np.minimum(np.searchsorted(o.ctx, h), len(o.ctx) - 1)
        seen = o.ctx[idx] == h
        key = (idx.astype(np.int64) << _VBITS) | nxt
        pos = np.minimum(np.searchsorted(o.pair, key), len(o.pair) - 1)
        c = np.where(seen & (o.pair[pos] == key), o.count[pos], 0)
        return np.where(seen, o.n[idx], 0), np.where(seen, o.u[idx], 0), c

    def token_nll(self, tokens: np.ndarray) -> np.ndarray:
        """NLL (nats) of tokens[1:], each given the tokens before it in this sequence."""
        tokens = np.asarray(tokens, dtype=np.int64)
        nxt = tokens[1:]
        p = self.unigram[nxt]
        for k, h in enumerate(context_hashes(tokens, self.max_order), start=1):
            ctx_h = h[:-1]
            n, u, c = self._lookup(self.orders[k - 1], ctx_h, nxt)
            n = np.where(np.arange(len(nxt)) >= k - 1, n, 0)  # fewer than k tokens of history: no order k
            p = np.where(n > 0, blend(c, n, u, p, self.discount), p)
        return -np.log(p)

    def distribution(self, history: np.ndarray) -> np.ndarray:
        """P(next token | history) over the whole vocabulary (for sampling continuations)."""
        history = np.asarray(history, dtype=np.int64)[-self.max_order:]
        p = self.unigram.copy()
        for k in range(1, min(self.max_order, len(history)) + 1):
            o = self.orders[k - 1]
            h = context_hashes(history[-k:], k)[k - 1][-1:]
            idx = min(int(np.searchsorted(o.ctx, h)[0]), len(o.ctx) - 1)
            if o.ctx[idx] != h[0]:
                continue  # longer contexts contain this one, so they are unseen too
            lo, hi = np.searchsorted(o.pair, [idx << _VBITS, (idx + 1) << _VBITS])
            c = np.zeros(V.VOCAB_SIZE)
            c[o.pair[lo:hi] & ((1 << _VBITS) - 1)] = o.count[lo:hi]
            p = blend(c, o.n[idx], o.u[idx], p, self.discount)
        return p

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> None:
        arrays = {"unigram": self.unigram}
        for k, o in enumerate(self.orders):
            arrays.update({f"{f}{k}": getattr(o, f) for f in ("ctx", "n", "u", "pair", "count")})
        tmp = path.with_name(path.name + ".tmp.npz")  # atomic: a killed eval leaves no half cache
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> MarkovModel:
        with np.load(path) as z:
            n_orders = sum(1 for name in z.files if name.startswith("ctx"))
            orders = [Order(*(z[f"{f}{k}"] for f in ("ctx", "n", "u", "pair", "count"))) for k in range(n_orders)]
            return cls(z["unigram"], orders)


def corpus_hash(data_dir: str | Path) -> str:
    """sha256 of the train split's token file: the baseline is a function of exactly that."""
    return file_sha256(Path(data_dir) / "train.bin")


def baseline_for(data_dir: str | Path, max_order: int = 4, discount: float = 0.95,
                 log=lambda msg: None) -> MarkovModel:
    """The baseline trained on data_dir's train split, cached in data_dir by corpus hash.

    The counts do not depend on the discount, so one cache serves every discount.
    """
    tokens, _ = read_split(data_dir, "train")  # raises UserError on a missing/corrupt corpus
    path = Path(data_dir) / f"markov-v{CACHE_VERSION}-o{max_order}-{corpus_hash(data_dir)[:16]}.npz"
    if path.is_file():
        try:
            model = MarkovModel.load(path)
            model.discount = discount
            return model
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt, not trusted
            log(f"ignoring unreadable baseline cache {path.name} ({e})")
    log(f"training the order-{max_order} Markov baseline on {tokens.size:,} tokens")
    model = MarkovModel.fit(np.asarray(tokens), max_order, discount)
    try:
        model.save(path)
    except OSError as e:  # a read-only corpus folder still evaluates, just without the cache
        log(f"could not cache the baseline in {path.parent} ({e})")
    return model

"""Session memory: what this player played, as a variable-order model of their note sequence.

The Transformer knows music in general and, through its window, the last ~1000 tokens. What it
does not do by itself is take up the player's motif (prompting alone does not make a model repeat
a theme). Like the Continuator, the memory learns the player's own note-on pitches as they are
heard, every context of the last 1..max_order steps with the step that followed it, and
proposes what followed the longest context that matches now. Its proposal is mixed into the
pitch choice as a product of experts (`mix_pitch`), weighted by how long the match is: a long
match means the player is replaying material, and the answer is invited to take it up.

Pitches, not whole tokens: timing and velocity vary from one playing of a motif to the next, so
exact token contexts rarely match in real performance; the model keeps deciding *when*.

Constant time per note (max_order dict updates, max_order lookups) and bounded memory: each
order holds at most `max_contexts` contexts, the oldest dropped first. The memory outlives the
window slide: that is the point.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from antiphon.daemon import vocab as V

# Chosen on held-out sets that are not reported (see docs/model.md): the order and viewpoint by
# streamed NLL on valid_score; the weight as the largest that keeps key agreement and register
# (on valid_score's folk tunes its answers' motif echo is 1.27x the players' own, on its
# polyphonic works 0.68x, on training-split piano performances 0.31x; 0.5, chosen on the folk
# tunes alone until 2026-12-02, left the performances at 0.16x). Reported on valid_perf.
MAX_ORDER = 6
WEIGHT = 1.0  # mixing weight of the memory at a long match, before the player's --memory scale
HALF_ORDER = 1.0  # the match length at which the weight is half of WEIGHT
MAX_CONTEXTS = 16384
VIEWPOINT = "interval"
FLOOR = 1e-3  # added to the memory's proposal: an unproposed pitch is discouraged, never forbidden


class SessionMemory:
    """Learns note-ons with `hear`; proposes the next pitch with `propose`.

    `viewpoint`: "interval" models the steps between successive note-ons, so a motif the player
    moved to another pitch is the same motif, and an answer may take it up in another key (a
    variation, where exact pitches would invite a copy); "pitch" models the pitches themselves."""

    def __init__(self, max_order: int = MAX_ORDER, weight: float = WEIGHT, half_order: float = HALF_ORDER,
                 max_contexts: int = MAX_CONTEXTS, viewpoint: str = VIEWPOINT):
        if viewpoint not in ("interval", "pitch"):
            raise ValueError(f"viewpoint must be 'interval' or 'pitch', got {viewpoint!r}")
        self.max_order, self.weight, self.half_order = max_order, weight, half_order
        self.max_contexts, self.intervals = max_contexts, viewpoint == "interval"
        # tables[k]: context of k symbols -> {next symbol: count} (tables[0] unused: see _unigram)
        self.tables: list[dict[tuple[int, ...], dict[int, int]]] = [{} for _ in range(max_order + 1)]
        self.recent: deque[int] = deque(maxlen=max_order)
        self.last = -1  # the last note-on's pitch
        self.heard = 0
        self._p = np.zeros(V.N_PITCH)
        self._sym = np.zeros(2 * V.N_PITCH - 1 if self.intervals else V.N_PITCH)
        self._shift = V.N_PITCH - 1 if self.intervals else 0  # interval i sits at index i + 127
        self._unigram = np.zeros_like(self._sym)
        self._distinct = 0

    def hear(self, pitch: int, learn: bool = True) -> None:
        """A note-on at `pitch`; `learn=False` for antiphon's own notes: they shape the context
        that is looked up but are never learned as the player's material."""
        if self.intervals:
            sym, self.last = (pitch - self.last if self.last >= 0 else None), pitch
            if sym is None:
                return
        else:
            sym = pitch
        if learn:
            ctx = tuple(self.recent)
            i = sym + self._shift
            self._unigram[i] += 1.0  # order 0 as an array: the one context with many successors
            self._distinct += self._unigram[i] == 1.0
            for k in range(1, len(ctx) + 1):
                table = self.tables[k]
                key = ctx[len(ctx) - k:]
                succ = table.get(key)
                if succ is None:
                    if len(table) >= self.max_contexts:
                        del table[next(iter(table))]  # the oldest context
                    succ = table[key] = {}
                succ[sym] = succ.get(sym, 0) + 1
            self.heard += 1
        self.recent.append(sym)

    def hear_tokens(self, tokens, learn: bool = True) -> None:
        for t in tokens:
            if V.NOTE_ON <= t < V.NOTE_OFF:
                self.hear(t - V.NOTE_ON, learn)

    def mark(self) -> tuple[int, ...]:
        """The lookup state, to put back when generated notes are taken back (`restore`)."""
        return (self.last, *self.recent)

    def restore(self, mark: tuple[int, ...]) -> None:
        self.last = mark[0] if mark else -1
        self.recent.clear()
        self.recent.extend(mark[1:])

    def match(self) -> int:
        """Length of the longest context seen before that ends now (-1: none, not even order 0)."""
        ctx = tuple(self.recent)
        order = 0 if self.heard else -1
        for k in range(1, len(ctx) + 1):
            if ctx[len(ctx) - k:] not in self.tables[k]:
                break
            order = k
        return order

    def propose(self) -> tuple[float, np.ndarray | None]:
        """(weight, distribution over pitches), or (0, None) when nothing matches.

        Witten-Bell blending from the session's symbol frequencies up to the longest matching
        context; the weight grows with that context's length."""
        if self.intervals and self.last < 0:
            return 0.0, None
        ctx = tuple(self.recent)
        q = self._sym
        shift = self._shift
        n = self.heard
        if n == 0:
            return 0.0, None
        u = float(self._distinct)
        np.multiply(self._unigram, 1.0 / (n + u), out=q)
        q += u / (n + u) / q.size
        order = 0
        for k in range(1, len(ctx) + 1):
            succ = self.tables[k].get(ctx[len(ctx) - k:])
            if succ is None:
                break
            n, u = sum(succ.values()), len(succ)
            q *= u / (n + u)
            for sym, c in succ.items():
                q[sym + shift] += c / (n + u)
            order = k
        if order < 1 or self.weight <= 0.0:
            return 0.0, None
        p = self._p
        if self.intervals:  # pitch = last + interval, for the intervals that stay on the keyboard
            lo = shift - self.last
            p[:] = q[lo:lo + V.N_PITCH]
            p /= p.sum()
        else:
            p[:] = q
        return self.weight * order / (order + self.half_order), p


def mix_pitch(model_logp: np.ndarray, weight: float, memory_p: np.ndarray | None) -> np.ndarray:
    """The pitch log-odds antiphon plays from: the model's times the memory's to the power `weight`
    (a product of experts, renormalised by the caller). The model keeps a veto: a motif the memory
    would move out of the key lands where the model gives it no chance, and stays unplayed; a
    weighted sum would play it anyway (measured: key agreement 0.76 of the truth's at full weight)."""
    if memory_p is None or weight <= 0.0:
        return model_logp
    return model_logp + weight * np.log(memory_p + FLOOR)


def note_on_logprob(logp: np.ndarray, target: int, weight: float, proposal: np.ndarray | None) -> float:
    """log p(target) under the model's full distribution `logp` (log-softmax over the vocabulary)
    with the memory mixed into the pitch choice: the odds of the event kinds stay the model's."""
    if not V.NOTE_ON <= target < V.NOTE_OFF or proposal is None or weight <= 0.0:
        return float(logp[target])
    on = logp[V.NOTE_ON:V.NOTE_OFF]
    top = on.max()
    kind = top + np.log(np.exp(on - top).sum())  # log P(the next event is a note-on)
    mixed = mix_pitch(on - kind, weight, proposal)
    m = mixed.max()
    return float(kind + mixed[target - V.NOTE_ON] - m - np.log(np.exp(mixed - m).sum()))

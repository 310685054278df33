"""Session memory: what this player played, as a variable-order model of their note sequence.

The Transformer knows music in general and, through its window, the last ~1000 tokens. What it
does not do by itself is take up the player's motif (prompting alone does not make a model repeat
a theme). Like the Continuator, the memory learns the player's own note-on pitches as they are
heard, every context of the last 1..max_order pitches with the pitches that followed it, and
proposes what followed the longest context that matches now. Its proposal is mixed into the
pitch choice (`mix_pitch`), weighted by how long the match is: a long match means the player is
replaying material, and the answer is invited to take it up.

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

# Chosen on valid_score by `antiphon eval --fit-memory` (see docs/model.md); reported on valid_perf.
MAX_ORDER = 6
WEIGHT = 0.5  # mixing weight of the memory at a long match, before the player's --memory scale
HALF_ORDER = 2.0  # the match length at which the weight is half of WEIGHT
MAX_CONTEXTS = 32768


class SessionMemory:
    """Learns note-on pitches with `hear`; proposes the next pitch with `propose`."""

    def __init__(self, max_order: int = MAX_ORDER, weight: float = WEIGHT, half_order: float = HALF_ORDER,
                 max_contexts: int = MAX_CONTEXTS):
        self.max_order, self.weight, self.half_order = max_order, weight, half_order
        self.max_contexts = max_contexts
        self.tables: list[dict[tuple[int, ...], dict[int, int]]] = [{} for _ in range(max_order + 1)]
        self.recent: deque[int] = deque(maxlen=max_order)
        self.heard = 0
        self._p = np.zeros(V.N_PITCH)

    def hear(self, pitch: int, learn: bool = True) -> None:
        """A note-on at `pitch`; `learn=False` for antiphon's own notes: they shape the context
        that is looked up but are never learned as the player's material."""
        if learn:
            ctx = tuple(self.recent)
            for k in range(len(ctx) + 1):
                table = self.tables[k]
                key = ctx[len(ctx) - k:]
                succ = table.get(key)
                if succ is None:
                    if len(table) >= self.max_contexts:
                        del table[next(iter(table))]  # the oldest context
                    succ = table[key] = {}
                succ[pitch] = succ.get(pitch, 0) + 1
            self.heard += 1
        self.recent.append(pitch)

    def hear_tokens(self, tokens, learn: bool = True) -> None:
        for t in tokens:
            if V.NOTE_ON <= t < V.NOTE_OFF:
                self.hear(t - V.NOTE_ON, learn)

    def mark(self) -> tuple[int, ...]:
        """The lookup context, to put back when generated notes are taken back (`restore`)."""
        return tuple(self.recent)

    def restore(self, mark: tuple[int, ...]) -> None:
        self.recent.clear()
        self.recent.extend(mark)

    def propose(self) -> tuple[float, np.ndarray | None]:
        """(weight, distribution over pitches), or (0, None) when nothing matches.

        Witten-Bell blending from the session's pitch frequencies up to the longest matching
        context; the weight grows with that context's length."""
        ctx = tuple(self.recent)
        p = self._p
        p.fill(1.0 / V.N_PITCH)
        order = -1
        for k in range(len(ctx) + 1):
            succ = self.tables[k].get(ctx[len(ctx) - k:])
            if succ is None:
                break
            n, u = sum(succ.values()), len(succ)
            p *= u / (n + u)
            for pitch, c in succ.items():
                p[pitch] += c / (n + u)
            order = k
        if order < 1 or self.weight <= 0.0:
            return 0.0, None
        return self.weight * order / (order + self.half_order), p


def mix_pitch(model_p: np.ndarray, weight: float, memory_p: np.ndarray | None) -> np.ndarray:
    """The pitch distribution antiphon plays from: (1 - w) model + w memory (both sum to 1)."""
    if memory_p is None or weight <= 0.0:
        return model_p
    return (1.0 - weight) * model_p + weight * memory_p


def note_on_logprob(logp: np.ndarray, target: int, weight: float, proposal: np.ndarray | None) -> float:
    """log p(target) under the model's full distribution `logp` (log-softmax over the vocabulary)
    with the memory mixed into the pitch choice: the odds of the event kinds stay the model's."""
    if not V.NOTE_ON <= target < V.NOTE_OFF or proposal is None or weight <= 0.0:
        return float(logp[target])
    on = logp[V.NOTE_ON:V.NOTE_OFF]
    top = on.max()
    kind = top + np.log(np.exp(on - top).sum())  # log P(the next event is a note-on)
    pitch = target - V.NOTE_ON
    return float(kind + np.log((1.0 - weight) * np.exp(on[pitch] - kind) + weight * proposal[pitch]))

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

A second memory of the same kind follows the player's melody: the top voice, the highest note of
each onset cluster (notes within 30 ms), as a listener hears it and as `eval`'s motif echo takes
it. Successive note-ons of piano music interleave bass, chords and tune, so the first memory's
contexts rarely hold the tune's steps. The top-voice memory's proposal reshapes only the odds of
the pitches that would be the cluster's new top note near the tune, keeping their total: the
bass and inner voices keep the model's odds (`mix_top`).

Constant time per note (max_order dict updates, max_order lookups) and bounded memory: each
order holds at most `max_contexts` contexts, the oldest dropped first. The memory outlives the
window slide: that is the point.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from antiphon.daemon import vocab as V

# Chosen on valid_score with the model shipped on 2026-12-02 (models/session_eval.py's grid,
# docs/model.md); reported on valid_perf. The top voice's weight is the largest on the grid that
# keeps the streamed NLL below the model's alone: the pull that takes up the player's tune, as far
# as it still predicts the music better; the notes memory's weight and half order are the NLL-best
# at that top weight. The constants chosen for the previous, weaker model (weight 1.0, half order
# 1.0, top voice 1.5) raised the new model's streamed NLL above no memory (valid_score 1.017 ->
# 1.056); these gave 1.002 (the NLL-best setting, top voice 0.25, gives 0.951 but took motif echo
# on training-split performances from 1.12 to 0.32 of the pianists'). The same rule for the model
# shipped that evening (stage 4): top voice 1.25 now raised valid_score's streamed NLL (0.894 ->
# 0.905); 1.0 with the notes memory at 0.75 gives 0.882.
MAX_ORDER = 6
WEIGHT = 0.75  # mixing weight of the memory at a long match, before the player's --memory scale
HALF_ORDER = 4.0  # the match length at which the weight is half of WEIGHT
MAX_CONTEXTS = 16384
VIEWPOINT = "interval"
FLOOR = 1e-3  # added to the memory's proposal: an unproposed pitch is discouraged, never forbidden
# The top-voice memory: the melody's steps between cluster tops (see the module's doc); weight 1.5
# until 2026-12-02, chosen for motif echo alone with the previous model.
TOP_ORDER = 4
TOP_WEIGHT = 1.0
TOP_HALF_ORDER = 1.0  # its own: the notes memory's half order is fitted apart from it
TOP_BAND = 12  # semitones either side of the tune's last note where its next note is looked for
CLUSTER_STEPS = 3  # note-ons within 30 ms of a cluster's first are one cluster (a chord)
_NO_CLUSTER = (-CLUSTER_STEPS - 1, -1, False)  # (step it began, its top so far, the player's?)


class SessionMemory:
    """Learns note-ons with `hear`; proposes the next pitch with `propose`.

    `viewpoint`: "interval" models the steps between successive note-ons, so a motif the player
    moved to another pitch is the same motif, and an answer may take it up in another key (a
    variation, where exact pitches would invite a copy); "pitch" models the pitches themselves."""

    def __init__(self, max_order: int = MAX_ORDER, weight: float = WEIGHT, half_order: float = HALF_ORDER,
                 max_contexts: int = MAX_CONTEXTS, viewpoint: str = VIEWPOINT, top_voice: bool = True,
                 top_weight: float = TOP_WEIGHT):
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
        # The top voice: its own memory of the intervals between cluster tops, and the open
        # cluster (step it began, its top so far, whether the player's), closed by a later note-on.
        self.top = (SessionMemory(TOP_ORDER, top_weight, TOP_HALF_ORDER, max_contexts, "interval", False)
                    if top_voice else None)
        self._step = 0
        self._cluster = _NO_CLUSTER

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

    def hear_token(self, token: int, learn: bool = True) -> None:
        """One token of the session: note-ons are learned (or, `learn=False`, looked up from);
        time shifts tell which note-ons make one cluster for the top voice."""
        if V.NOTE_ON <= token < V.NOTE_OFF:
            pitch = token - V.NOTE_ON
            self.hear(pitch, learn)
            if self.top is not None:
                self._close_cluster()
                began, top, player = self._cluster
                self._cluster = (began, max(top, pitch), player) if top >= 0 else (self._step, pitch, learn)
        elif V.TIME_SHIFT <= token < V.VELOCITY:
            self._step += token - V.TIME_SHIFT + 1

    def hear_tokens(self, tokens, learn: bool = True) -> None:
        for t in tokens:
            self.hear_token(t, learn)

    def _close_cluster(self) -> None:
        """The open cluster's top joins the top voice once no note-on can join the cluster."""
        began, top, player = self._cluster
        if top >= 0 and self._step - began > CLUSTER_STEPS:
            self.top.hear(top, player)
            self._cluster = (began, -1, False)

    def mark(self) -> tuple:
        """The lookup state, to put back when generated notes are taken back (`restore`)."""
        top = (self.top.mark(), self.top.heard) if self.top else ((), 0)
        return (self.last, tuple(self.recent), self._step, self._cluster, *top)

    def restore(self, mark: tuple) -> None:
        self.last, recent, self._step, self._cluster, top, heard = mark or (-1, (), 0, _NO_CLUSTER, (), 0)
        self.recent.clear()
        self.recent.extend(recent)
        if self.top is not None:
            self.top.restore(top)
            if self.top.heard > heard:  # the player's open cluster was learned since: not twice
                self._cluster = (*self._cluster[:2], False)

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

    def propose_top(self) -> tuple[float, np.ndarray | None, int, int]:
        """(weight, distribution over pitches, the open cluster's top so far or -1, the top voice's
        last note) for the next note-on as the top voice's next note; (0, None, ..) when the top
        voice has no match."""
        if self.top is None:
            return 0.0, None, -1, -1
        self._close_cluster()
        if self._one_line():
            return 0.0, None, self._cluster[1], self.top.last
        weight, p = self.top.propose()
        return weight, p, self._cluster[1], self.top.last

    def _one_line(self) -> bool:
        """The recent notes are the top voice itself (a single line, as in a folk tune): the notes
        memory already proposes the tune's next step, and proposing it twice over-weights it
        (streamed NLL on valid_score's tunes 1.086 -> 1.27, register 0.90 -> 0.81)."""
        k = min(len(self.recent), len(self.top.recent))
        return k > 0 and self.last == self.top.last and list(self.recent)[-k:] == list(self.top.recent)[-k:]


def mix_top(logp: np.ndarray, weight: float, top_p: np.ndarray | None, above: int, last: int) -> np.ndarray:
    """Pitch log-odds with the top voice's proposal mixed in where the tune lies: over the pitches
    that would be the cluster's new top (above `above`, the open cluster's top so far; -1: a new
    cluster) and within TOP_BAND of the tune's `last` note, a product of experts as `mix_pitch`,
    rescaled to keep the model's total odds there. So the model decides whether this note belongs
    to the tune (or the bass, or an inner voice, which keep its odds) and the memory which tune
    note. Mixed over all pitches, the memory took the bass away: register 0.78."""
    lo, hi = top_band(above, last)
    if top_p is None or weight <= 0.0 or lo >= hi:
        return logp
    out = np.array(logp, dtype=np.float64)
    band = out[lo:hi]  # a view: rescaled in place
    finite = np.isfinite(band)
    if not finite.any():
        return out
    before = _logsumexp(band[finite])
    band += weight * np.log(top_p[lo:hi] + FLOOR)
    band += before - _logsumexp(band[finite])
    return out


def top_band(above: int, last: int) -> tuple[int, int]:
    """The pitches [lo, hi) where the top voice's next note is looked for (see `mix_top`)."""
    return max(above + 1, last - TOP_BAND), min(V.N_PITCH, last + TOP_BAND + 1)


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + float(np.log(np.exp(x - m).sum()))


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

"""Training batches: random windows over the flat token file, with transposition augmentation.

Windows may span document boundaries (… EOS BOS …), as in nanoGPT. Most documents (chorales,
exercises, short improvisations) are shorter than a training window, so cutting windows inside
documents would mean padding and wasting most of each batch on PAD; a window that crosses a
boundary instead teaches the model that BOS starts afresh, which is what the daemon feeds it.
The flat file has no padding, so no window can contain a padding artefact.

The sampler is stateless: the windows of step s on rank r are a pure function of
(seed, rank, s). Resuming a run therefore needs only the step to continue the exact stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from antiphon.daemon import vocab as V
from antiphon.daemon.errors import UserError
from antiphon.models import window_augment
from antiphon.models.shards import KINDS, read_kinds, read_split

PERFORMANCE = KINDS.index("performance")

# A transposition of up to ±MAX_TRANSPOSE semitones keeps pieces in a playable register and
# makes every key equally common, so the model does not learn "C major is the default".
MAX_TRANSPOSE = 6


def step_rng(seed: int, rank: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one (run, rank, step): independent streams, reproducible on resume."""
    return np.random.default_rng([seed, rank, step, stream])


def transpose(windows: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_TRANSPOSE) -> np.ndarray:
    """Shift NOTE_ON/NOTE_OFF tokens of each row by one random k, keeping every pitch in 0..127.

    The range of k is cut per row so that no note leaves the keyboard; other tokens are untouched.
    """
    out = windows.astype(np.int64, copy=True)
    is_on = (out >= V.NOTE_ON) & (out < V.NOTE_OFF)
    is_off = (out >= V.NOTE_OFF) & (out < V.TIME_SHIFT)
    is_note = is_on | is_off
    pitch = np.where(is_on, out - V.NOTE_ON, out - V.NOTE_OFF)
    lo = np.where(is_note, pitch, V.N_PITCH).min(axis=1)  # rows without notes: any k is fine
    hi = np.where(is_note, pitch, -1).max(axis=1)
    k_min = np.maximum(-max_shift, -lo)
    k_max = np.minimum(max_shift, V.N_PITCH - 1 - hi)
    k_min, k_max = np.minimum(k_min, 0), np.maximum(k_max, 0)  # pieces spanning 0..127: k = 0
    k = rng.integers(k_min, k_max + 1)
    out[is_note] += np.broadcast_to(k[:, None], out.shape)[is_note]
    return out


@dataclass
class Split:
    name: str
    tokens: np.ndarray  # uint16 memmap
    offsets: np.ndarray
    kinds: np.ndarray | None = None  # uint8 per document, codes into shards.KINDS (None: not loaded)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def load_split(data_dir: str, name: str, min_tokens: int, with_kinds: bool = False) -> Split:
    tokens, offsets = read_split(data_dir, name)
    if tokens.size < min_tokens:
        raise UserError(f"{data_dir}: split '{name}' has {tokens.size} tokens, fewer than one training "
                        f"window ({min_tokens}); use a smaller --seq-len or a larger corpus")
    kinds = read_kinds(data_dir, name, offsets.size - 1) if with_kinds else None
    return Split(name, tokens, offsets, kinds)


class WindowSampler:
    """Random training windows, a stated share of them from real performances.

    Without a share every token is equally likely to start a window (real performance then gets
    its token share, ~15 %). With `perf_share` s, a window starts inside a performance document
    with probability s and elsewhere otherwise, each uniformly over that part's tokens.
    Performance windows get `window_augment.vary` when augmenting; every window is transposed.
    """

    def __init__(self, split: Split, seq_len: int, perf_share: float = 0.0, augment: bool = False):
        if not 0.0 <= perf_share <= 1.0:
            raise UserError(f"--perf-share must be in [0, 1], got {perf_share}")
        self.split, self.seq_len, self.share, self.augment = split, seq_len, perf_share, augment
        self.span = seq_len + 1 + seq_len // 4 + 16  # room for the variation to shorten the window
        last = split.n_tokens - self.span  # the last usable start
        if last < 0:
            self.span, last = seq_len + 1, split.n_tokens - seq_len - 1
        self.last = last
        is_perf = np.zeros(len(split.offsets) - 1, dtype=bool) if split.kinds is None else split.kinds == PERFORMANCE
        if perf_share > 0 and not is_perf.any():
            raise UserError(f"--perf-share {perf_share}: the '{split.name}' split holds no performance documents")
        self.parts = [self._ranges(is_perf), self._ranges(~is_perf)]

    def _ranges(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, cumulative lengths) of the usable start positions of the chosen documents."""
        lo = self.split.offsets[:-1][docs]
        hi = np.minimum(self.split.offsets[1:][docs], self.last + 1)
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        return lo, np.cumsum(hi - lo)

    def _starts(self, part: int, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, cum = self.parts[part]
        if cum.size == 0:
            return rng.integers(0, self.last + 1, size=n)
        u = rng.integers(0, cum[-1], size=n)
        i = np.searchsorted(cum, u, side="right")
        return lo[i] + u - np.concatenate([[0], cum[:-1]])[i]

    def batch(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of shape (batch_size, seq_len), int64."""
        L = self.seq_len + 1
        if self.share <= 0.0:
            perf = np.zeros(batch_size, dtype=bool)
            starts = rng.integers(0, self.split.n_tokens - self.seq_len, size=batch_size)
        else:
            perf = rng.random(batch_size) < self.share
            starts = np.where(perf, self._starts(0, batch_size, rng), self._starts(1, batch_size, rng))
        windows = np.empty((batch_size, L), dtype=np.int64)
        for r, s in enumerate(starts):
            raw = np.asarray(self.split.tokens[s:s + self.span], dtype=np.int64)
            if self.augment and perf[r]:
                varied = window_augment.vary(raw, rng)
                if len(varied) >= L:
                    windows[r] = varied[:L]
                    continue
            windows[r] = raw[:L]
        if self.augment:
            windows = transpose(windows, rng)
        return windows[:, :-1], windows[:, 1:]


def sample_batch(split: Split, batch_size: int, seq_len: int, rng: np.random.Generator,
                 augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of shape (batch_size, seq_len), int64, from random windows of seq_len + 1."""
    return WindowSampler(split, seq_len, 0.0, augment).batch(batch_size, rng)


def eval_windows(split: Split, n_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """Fixed held-out windows (same every evaluation, so the curve compares like with like).

    A split shorter than one window is scored as one shorter window.
    """
    length = min(seq_len + 1, split.n_tokens)
    if length < 2:
        return np.empty((0, 2), dtype=np.int64)
    rng = np.random.default_rng([seed, 0xE7A1])
    starts = rng.integers(0, split.n_tokens - length + 1, size=n_windows)
    idx = starts[:, None] + np.arange(length)[None, :]
    return np.asarray(split.tokens[idx], dtype=np.int64)

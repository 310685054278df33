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
from antiphon.models.shards import read_split

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

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def load_split(data_dir: str, name: str, min_tokens: int) -> Split:
    tokens, offsets = read_split(data_dir, name)
    if tokens.size < min_tokens:
        raise UserError(f"{data_dir}: split '{name}' has {tokens.size} tokens, fewer than one training "
                        f"window ({min_tokens}); use a smaller --seq-len or a larger corpus")
    return Split(name, tokens, offsets)


def sample_batch(split: Split, batch_size: int, seq_len: int, rng: np.random.Generator,
                 augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of shape (batch_size, seq_len), int64, from random windows of seq_len + 1."""
    starts = rng.integers(0, split.n_tokens - seq_len, size=batch_size)  # last start: N - (seq_len + 1)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = np.asarray(split.tokens[idx], dtype=np.int64)
    if augment:
        windows = transpose(windows, rng)
    return windows[:, :-1], windows[:, 1:]


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

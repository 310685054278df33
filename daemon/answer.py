"""One answer in the making, and how the cache's encoder catches up with what was generated.

An answer is generated speculatively from the phrase end and handed to the scheduler as it
grows; the Conversation (context.py) decides when it starts, and how much of it was heard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from antiphon.daemon import codec
from antiphon.daemon import vocab as V
from antiphon.daemon.config import JamConfig

# Until the answer's first note: no pause (it must start exactly at the phrase end), no offs.
OPENING_MASK = np.zeros(V.VOCAB_SIZE, dtype=bool)
OPENING_MASK[V.NOTE_ON:V.NOTE_OFF] = True
OPENING_MASK[V.VELOCITY:V.SUSTAIN_OFF + 1] = True
ANSWER_MASK = np.ones(V.VOCAB_SIZE, dtype=bool)
ANSWER_MASK[[V.PAD, V.BOS, V.EOS]] = False


def clone_encoder(enc: codec.TokenEncoder) -> codec.TokenEncoder:
    c = codec.TokenEncoder()
    c.origin, c.step, c.velocity_bin, c.sustain = enc.origin, enc.step, enc.velocity_bin, enc.sustain
    c.sounding = bytearray(enc.sounding)
    return c


def absorb(enc: codec.TokenEncoder, tokens: list[int], max_note_s: float) -> codec.TokenDecoder:
    """Bring the encoder's state past generated tokens; returns the decoder replayed over them."""
    dec = codec.TokenDecoder(0, max_note_s)
    for tok in tokens:
        dec.feed(tok)
        if V.VELOCITY <= tok < V.SUSTAIN_ON:
            enc.velocity_bin = tok - V.VELOCITY
        elif tok in (V.SUSTAIN_ON, V.SUSTAIN_OFF):
            enc.sustain = tok == V.SUSTAIN_ON
    enc.step += dec.step
    for p in range(V.N_PITCH):
        enc.sounding[p] = 1 if dec.onset[p] >= 0 else 0
    return dec


def answer_decoder(enc: codec.TokenEncoder, channel: int, max_note_s: float) -> codec.TokenDecoder:
    """A decoder for tokens that continue `enc`'s timeline. The velocity in force is the one the
    model has seen last (the player's): a token stream writes a VELOCITY only when it changes, so
    an answer that keeps the player's dynamics writes none, and a decoder starting at its default
    of 64 would play it at mezzo-forte whatever the player did."""
    dec = codec.TokenDecoder(channel, max_note_s)
    if enc.velocity_bin >= 0:
        dec.velocity = V.bin_velocity(enc.velocity_bin)
    return dec


def answer_seconds(call_s: float, cfg: JamConfig, scale: float | None = None) -> float:
    """`scale`: the live answer_scale (a knob may have moved it); cfg's when None."""
    return min(max(call_s * (cfg.answer_scale if scale is None else scale), cfg.answer_min_s), cfg.answer_max_s)


def same_time(t: float) -> float:
    return t


def free_time(t: float) -> float | None:
    """No MIDI clock: an answer starts when planned (None: not moved onto a beat)."""
    return None


@dataclass
class Answer:
    """One speculative-then-played answer generation."""

    gen: int
    start: float  # clock time of the phrase end: the answer's time 0
    seconds: float  # planned length
    prefix: list[int]  # the closing pause, appended before the answer's tokens
    base: int  # cache index of tokens[0]
    decoder: codec.TokenDecoder
    tokens: list[int] = field(default_factory=list)
    note_ids: dict[int, int] = field(default_factory=dict)
    shifts: dict[int, float] = field(default_factory=dict)  # pitch -> how far quantizing moved its note-on
    notes: int = 0
    on_beat: bool = False  # start was put on a beat of the MIDI clock: the scheduler keeps it there
    done: bool = False
    memory_mark: tuple = ()  # the session memory's lookup state at the answer's start

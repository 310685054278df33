"""The token vocabulary: the contract between training and the real-time daemon.

Performance events as in Performance RNN / Music Transformer, so that every incoming MIDI
message becomes tokens the moment it arrives (no durations to wait for):

    PAD BOS EOS | NOTE_ON x128 | NOTE_OFF x128 | TIME_SHIFT x100 (10 ms .. 1 s)
    | VELOCITY x32 | SUSTAIN_ON SUSTAIN_OFF

The layout is offset arithmetic over the named constants below. Changing any of them changes
the meaning of every trained model, so it bumps VOCAB.version; engines refuse models whose
vocabulary config differs from this one. `python -m antiphon.daemon.vocab` prints the table.
"""

from __future__ import annotations

import json
import sys

from antiphon.daemon.config import VocabConfig, to_dict
from antiphon.daemon.errors import UserError

VOCAB = VocabConfig()

N_PITCH = 128
STEP_S = VOCAB.time_step_ms / 1000.0
MAX_SHIFT = VOCAB.max_shift_steps
VELOCITY_BINS = VOCAB.velocity_bins

PAD = 0
BOS = 1
EOS = 2
NOTE_ON = 3
NOTE_OFF = NOTE_ON + N_PITCH
TIME_SHIFT = NOTE_OFF + N_PITCH  # token TIME_SHIFT + k means "advance k+1 steps"
VELOCITY = TIME_SHIFT + MAX_SHIFT
SUSTAIN_ON = VELOCITY + VELOCITY_BINS
SUSTAIN_OFF = SUSTAIN_ON + 1
VOCAB_SIZE = SUSTAIN_OFF + 1

_BIN_WIDTH = 128 // VELOCITY_BINS


def note_on(pitch: int) -> int:
    return NOTE_ON + pitch


def note_off(pitch: int) -> int:
    return NOTE_OFF + pitch


def time_shift(steps: int) -> int:
    """One TIME_SHIFT token for 1 <= steps <= MAX_SHIFT."""
    return TIME_SHIFT + steps - 1


def velocity_bin(velocity: int) -> int:
    """MIDI velocity 1..127 to a bin 0..VELOCITY_BINS-1."""
    return min(max(velocity, 1), 127) // _BIN_WIDTH


def bin_velocity(vbin: int) -> int:
    """The velocity a bin decodes to: its centre, so the round trip is off by at most half a bin."""
    return min(max(vbin * _BIN_WIDTH + _BIN_WIDTH // 2, 1), 127)


def velocity(velocity_: int) -> int:
    return VELOCITY + velocity_bin(velocity_)


def kind(token: int) -> str:
    """The event type of a token, for humans and tests."""
    for name, start, end in RANGES:
        if start <= token < end:
            return name
    raise ValueError(f"token {token} is outside the vocabulary (size {VOCAB_SIZE})")


RANGES: tuple[tuple[str, int, int], ...] = (
    ("PAD", PAD, PAD + 1),
    ("BOS", BOS, BOS + 1),
    ("EOS", EOS, EOS + 1),
    ("NOTE_ON", NOTE_ON, NOTE_OFF),
    ("NOTE_OFF", NOTE_OFF, TIME_SHIFT),
    ("TIME_SHIFT", TIME_SHIFT, VELOCITY),
    ("VELOCITY", VELOCITY, SUSTAIN_ON),
    ("SUSTAIN_ON", SUSTAIN_ON, SUSTAIN_ON + 1),
    ("SUSTAIN_OFF", SUSTAIN_OFF, SUSTAIN_OFF + 1),
)


def describe_token(token: int) -> str:
    name = kind(token)
    if name == "NOTE_ON":
        return f"NOTE_ON({token - NOTE_ON})"
    if name == "NOTE_OFF":
        return f"NOTE_OFF({token - NOTE_OFF})"
    if name == "TIME_SHIFT":
        return f"TIME_SHIFT({(token - TIME_SHIFT + 1) * VOCAB.time_step_ms}ms)"
    if name == "VELOCITY":
        return f"VELOCITY({bin_velocity(token - VELOCITY)})"
    return name


def metadata() -> dict[str, str]:
    """What a checkpoint or ONNX file stores to say which vocabulary it was trained on."""
    return {"vocab": json.dumps(to_dict(VOCAB), sort_keys=True), "vocab_size": str(VOCAB_SIZE)}


class VocabMismatch(UserError, ValueError):
    """A model was trained on a different vocabulary than this code speaks."""


def check_compatible(vocab_json: str | dict | None, vocab_size: int | None, what: str) -> None:
    """Raise VocabMismatch with a message that says what differs and what to do."""
    if vocab_json is None:
        raise VocabMismatch(f"{what} carries no vocabulary description; re-export it with `antiphon export`")
    theirs = json.loads(vocab_json) if isinstance(vocab_json, str) else dict(vocab_json)
    ours = to_dict(VOCAB)
    diffs = [f"{k}: model {theirs.get(k)!r} vs code {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if vocab_size is not None and int(vocab_size) != VOCAB_SIZE:
        diffs.append(f"vocab_size: model {vocab_size} vs code {VOCAB_SIZE}")
    if diffs:
        raise VocabMismatch(
            f"{what} was trained on a different token vocabulary ({'; '.join(diffs)}). "
            "Retrain or re-export it with this version of antiphon, or install the antiphon version it came from."
        )


def table() -> str:
    lines = [(f"antiphon vocabulary v{VOCAB.version}: {VOCAB_SIZE} tokens "
             f"(time step {VOCAB.time_step_ms} ms, max shift {MAX_SHIFT} steps, {VELOCITY_BINS} velocity bins)"),
             f"{'range':>9}  {'count':>5}  event  first .. last"]
    for name, start, end in RANGES:
        first, last = describe_token(start), describe_token(end - 1)
        span = first if start == end - 1 else f"{first} .. {last}"
        lines.append(f"{start:>4}-{end - 1:<4}  {end - start:>5}  {name:<11} {span}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
